"""
Every download picochat makes goes through this module, so the mirror setting, retries,
integrity checks and atomic writes are written (and tested) once.

Source of a file, in order:
  1. the mirror, if one is set: `PICOCHAT_MIRROR` (env) or `set_mirror()` (what `--mirror` flags call).
     Either an http(s) base URL or a local directory laid out like ../shared/data
     (pretrain/shard_NNNNN.parquet, core/core.yaml, gsm8k/test.jsonl, ...); the file is <mirror>/<relpath>.
  2. otherwise the public default URL the caller passes.

Examples:
    PICOCHAT_MIRROR=/work/shared/data picochat data download -n 2
    PICOCHAT_MIRROR=http://127.0.0.1:8000 picochat data download -n 8 -w 4
    python -c "from pathlib import Path; from picochat import fetch; \
fetch.download('gsm8k/test.jsonl', None, Path('/tmp/test.jsonl'), progress=False)"

Integrity: a file counts as present only once it matches its SHA-256 when one is known: passed by the caller
(a mirror manifest's "sha256"), listed in the mirror's SHA256SUMS (`sha256sum` format, paths relative to the
mirror root; `picochat data manifest --sums ROOT` writes it), or published by the host (the Hugging Face hub
sends an LFS file's SHA-256 as X-Linked-Etag). A verified hash is remembered next to the file (.<name>.sha256), so a file corrupted on disk
later is detected on the next run and fetched again. A bad body is retried; a bad file in a local mirror is an
error naming it. An interrupted HTTP download keeps its bytes in <name>.partial and the next attempt (or run)
asks only for the rest (HTTP Range); a server that ignores Range just sends the whole file again.

Env knobs: PICOCHAT_FETCH_BACKOFF (base delay in seconds of the exponential backoff, default 2:
sleeps 2, 4, 8, 16 between the 5 attempts; tests set it tiny).
"""
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import quote

import requests
from filelock import FileLock
from tqdm import tqdm

from picochat.common import logger, file_sha256

CHUNK_SIZE = 1 << 20  # 1 MB reads/writes
HTTP_READ_SIZE = 64 << 10
DEFAULT_BACKOFF = 2.0
MIRROR_HINT = ("set PICOCHAT_MIRROR (or pass --mirror) to an http(s) mirror URL or a local directory "
               "laid out like shared/data, e.g. export PICOCHAT_MIRROR=/path/to/shared/data")

_mirror_override = None  # set by set_mirror(); wins over the environment
_sums_cache = {}         # mirror -> {relpath: sha256} from its SHA256SUMS ({} when it has none)


class DownloadError(RuntimeError):
    """A download that failed for good (all attempts used, or a failure that retrying cannot fix)."""


class _Fatal(Exception):
    """Raised inside an attempt when retrying is pointless (404, missing local file, ...)."""


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _published_sha256(response) -> str | None:
    """The SHA-256 the Hugging Face hub publishes for an LFS file (X-Linked-Etag on the resolve response, before
    the redirect to the CDN); None from hosts that publish none."""
    for r in list(response.history) + [response]:
        tag = r.headers.get("X-Linked-Etag", "").strip().strip('"').removeprefix("W/").strip('"').lower()
        if _HEX64.match(tag):
            return tag
    return None


def parse_sums(text: str) -> dict:
    """`sha256sum` output (`<hex>  <path>` or `<hex> *<path>` per line) -> {path: hex}."""
    sums = {}
    for line in text.splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and _HEX64.match(parts[0].lower()):
            sums[parts[1].lstrip("*").removeprefix("./")] = parts[0].lower()
    return sums


def mirror_sha256(relpath: str) -> str | None:
    """The SHA-256 the active mirror's SHA256SUMS lists for `relpath` (None: no mirror, no file, or not listed)."""
    mirror = get_mirror()
    if mirror is None:
        return None
    if mirror not in _sums_cache:
        text = fetch_text("SHA256SUMS")
        _sums_cache[mirror] = parse_sums(text) if text else {}
    return _sums_cache[mirror].get(relpath.lstrip("/"))


def _hash_record(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.sha256"


def recorded_sha256(dest) -> str | None:
    """The SHA-256 `dest` was verified against when it was downloaded (None: none was known)."""
    try:
        text = _hash_record(Path(dest)).read_text().strip()
    except OSError:
        return None
    return text if _HEX64.match(text) else None


def check_present(dest, sha256=None) -> str | None:
    """Why `dest` cannot count as downloaded (missing, or its bytes differ from the expected or recorded SHA-256);
    None when it is fine. Hashes the file when a hash is known."""
    dest = Path(dest)
    if not dest.is_file():
        return "missing"
    expected = sha256 or recorded_sha256(dest)
    if expected and file_sha256(dest) != expected:
        return f"SHA-256 mismatch (expected {expected[:12]}...): the file is corrupt"
    return None


def _normalize(value):
    if value is None:
        return None
    value = str(value).strip()
    if not value:
        return None
    if value.startswith("file://"):
        value = value[len("file://"):]
    if not value.startswith(("http://", "https://")):
        value = os.path.expanduser(value)
    return value.rstrip("/") or "/"


def set_mirror(value):
    """Use `value` (URL or directory) as the mirror for this process; None goes back to $PICOCHAT_MIRROR."""
    global _mirror_override
    _mirror_override = _normalize(value)


def get_mirror():
    """The active mirror (URL or local directory path) or None."""
    if _mirror_override is not None:
        return _mirror_override
    return _normalize(os.environ.get("PICOCHAT_MIRROR"))


def is_url(value) -> bool:
    return str(value).startswith(("http://", "https://"))


def resolve_source(relpath: str, default_url=None):
    """-> ("url", url) or ("file", Path): where `relpath` comes from right now."""
    mirror = get_mirror()
    if mirror is not None:
        if is_url(mirror):
            return "url", f"{mirror}/{quote(relpath.lstrip('/'))}"
        root = Path(mirror)
        if not root.is_dir():
            raise DownloadError(f"PICOCHAT_MIRROR={mirror!r} is neither an http(s) URL nor an existing directory. "
                                f"Fix the path, or unset PICOCHAT_MIRROR to use the public URLs.")
        return "file", root / relpath
    if default_url is None:
        raise DownloadError(f"No download source for {relpath!r}: it has no public URL, so a mirror is needed; "
                            f"{MIRROR_HINT}.")
    return "url", default_url


def _backoff_base(backoff):
    if backoff is not None:
        return float(backoff)
    return float(os.environ.get("PICOCHAT_FETCH_BACKOFF", DEFAULT_BACKOFF))


def _show_progress(progress: bool) -> bool:
    return bool(progress) and sys.stderr.isatty()


def _stream_http(url, part: Path, timeout, progress, desc) -> str | None:
    """Append the rest of `url` to `part` (asking with Range for what `part` lacks). -> the host's SHA-256, if any."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "picochat", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    # timeout bounds the connect and every gap between received bytes, so a stalled server fails fast
    with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
        if r.status_code in (401, 403, 404, 410):
            raise _Fatal(f"HTTP {r.status_code} {r.reason} for {url}")
        if r.status_code == 416:  # our partial file is no prefix of theirs: start over
            part.unlink(missing_ok=True)
            raise IOError(f"the server refused to resume {url} (HTTP 416); starting over")
        r.raise_for_status()  # 5xx, 408, 429, ... are retried
        if r.status_code != 206:
            have = 0  # the server ignored Range and sends the whole file
        encoding = r.headers.get("Content-Encoding", "identity").lower()
        length = r.headers.get("Content-Length")
        # with a transfer encoding (gzip) the decoded size differs from Content-Length; only check identity
        expected = have + int(length) if length is not None and encoding in ("", "identity") else None
        written = have
        with open(part, "ab" if have else "wb") as f, tqdm(total=expected, initial=have, unit="B", unit_scale=True,
                                                           unit_divisor=1024, desc=desc, leave=False,
                                                           disable=not _show_progress(progress)) as bar:
            # small reads: a read cut by a timeout or reset loses what it had gathered, so keep each one short
            for chunk in r.iter_content(chunk_size=HTTP_READ_SIZE):
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if expected is not None and written != expected:
            raise IOError(f"truncated body from {url}: got {written} of {expected} bytes")
        return _published_sha256(r)


def _copy_local(src: Path, part: Path, progress, desc):
    if not src.is_file():
        raise _Fatal(f"{src} does not exist in the mirror directory")
    total = src.stat().st_size
    with open(src, "rb") as fin, open(part, "wb") as fout, \
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                 disable=not _show_progress(progress), leave=False) as bar:
        while True:
            chunk = fin.read(CHUNK_SIZE)
            if not chunk:
                break
            fout.write(chunk)
            bar.update(len(chunk))
        fout.flush()
        os.fsync(fout.fileno())


def download(relpath: str, default_url, dest, validate=None, sha256=None, retries=5, timeout=30, progress=True,
             backoff=None) -> Path:
    """Fetch `relpath` (from the mirror) or `default_url` into `dest`; return `dest`.

    Skips the download when `dest` is present and sound: it matches `sha256` (or the hash recorded when it was
    downloaded) and `validate(dest)` passes (validate: Path -> None, raises on a bad file). Otherwise the bytes go
    to <dest>.partial (resumed with HTTP Range), are checked (Content-Length, SHA-256 from `sha256` or the host,
    `validate`), and only then renamed over `dest`: `dest` is never partial or unverified. HTTP errors, dropped
    connections, truncated or corrupt bodies and timeouts are retried up to `retries` attempts with exponential
    backoff (base `backoff` seconds, default $PICOCHAT_FETCH_BACKOFF or 2). Holds a lock file next to `dest`, so
    several ranks or processes asking for one file download it once.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # hidden lock file: never mistaken for data (listings take *.parquet / named files only)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        return _download(relpath, default_url, dest, validate, sha256, retries, timeout, progress, backoff)


def _download(relpath, default_url, dest: Path, validate, sha256, retries, timeout, progress, backoff) -> Path:
    sha256 = (sha256 or mirror_sha256(relpath) or "").lower() or None
    if dest.exists():
        problem = check_present(dest, sha256)
        if problem is None and validate is not None:
            try:
                validate(dest)
            except Exception as e:
                problem = str(e)
        if problem is None:
            return dest
        logger.warning(f"{dest} is present but unusable ({problem}); downloading it again")
    kind, src = resolve_source(relpath, default_url)
    base = _backoff_base(backoff)
    retries = max(1, int(retries))
    # the partial name does not end in .parquet, so listings never see it; it survives a killed run to be resumed
    part = dest.parent / f"{dest.name}.partial"
    last_error = None
    for attempt in range(1, retries + 1):
        try:
            if kind == "file":
                _copy_local(src, part, progress, dest.name)
                published = None
            else:
                published = _stream_http(src, part, timeout, progress, dest.name)
            expected = sha256 or published
            if expected:
                got = file_sha256(part)
                if got != expected:
                    part.unlink()  # which bytes are bad is unknown: start over
                    if kind == "file":
                        raise _Fatal(f"mirror file {src} has SHA-256 {got[:12]}..., expected {expected[:12]}... "
                                     "(the mirror's copy or its manifest is wrong)")
                    raise IOError(f"SHA-256 mismatch for {src}: got {got[:12]}..., expected {expected[:12]}...")
            if validate is not None:
                try:
                    validate(part)
                except Exception as e:
                    part.unlink()
                    if kind == "file":  # copying the same bad file again cannot help
                        raise _Fatal(f"mirror file {src} is invalid: {e}") from e
                    raise
            _hash_record(dest).unlink(missing_ok=True)  # never a stale record next to new bytes
            os.replace(part, dest)
            if expected:
                _hash_record(dest).write_text(expected + "\n")
            return dest
        except _Fatal as e:
            part.unlink(missing_ok=True)
            raise DownloadError(f"Cannot fetch {relpath!r}: {e}. " + (
                "Check that the mirror holds this file (same layout as shared/data), or unset PICOCHAT_MIRROR "
                "to use the public URL." if get_mirror() else "Check the URL, or " + MIRROR_HINT + ".")) from e
        except Exception as e:  # network errors, truncation, corrupt bodies: the partial bytes are kept to resume
            last_error = e
        if attempt < retries:
            delay = base * 2 ** (attempt - 1)
            logger.warning(f"download of {src} failed (attempt {attempt}/{retries}: {last_error}); "
                           f"retrying in {delay:.3g}s")
            time.sleep(delay)
    mirror = get_mirror()
    fix = (f"Check that the mirror {mirror} is reachable and complete, or point PICOCHAT_MIRROR at another mirror "
           f"(unset it to use the public URLs)" if mirror else f"Check your network connection, or {MIRROR_HINT}")
    raise DownloadError(f"Failed to download {src} after {retries} attempts (last error: {last_error}); the "
                        f"{part.stat().st_size if part.exists() else 0} bytes received are kept in {part.name} and "
                        f"the next run resumes from there. {fix}.")


def fetch_text(relpath: str, default_url=None, timeout=30, retries=3, backoff=None):
    """Small text file (e.g. a manifest) straight into memory; None when the source does not have it
    (HTTP 404 / missing local file). Other failures are retried, then raised."""
    kind, src = resolve_source(relpath, default_url)
    if kind == "file":
        return src.read_text(encoding="utf-8") if src.is_file() else None
    base = _backoff_base(backoff)
    last_error = None
    for attempt in range(1, max(1, retries) + 1):
        try:
            r = requests.get(src, timeout=timeout, headers={"User-Agent": "picochat"})
            if r.status_code == 404:
                return None
            r.raise_for_status()
            return r.content.decode("utf-8")
        except requests.RequestException as e:
            last_error = e
            if attempt < retries:
                time.sleep(base * 2 ** (attempt - 1))
    raise DownloadError(f"Failed to fetch {src} after {retries} attempts (last error: {last_error}). "
                        f"Check your network connection, or {MIRROR_HINT}.")
