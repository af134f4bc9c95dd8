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

Env knobs: PICOCHAT_FETCH_BACKOFF (base delay in seconds of the exponential backoff, default 2:
sleeps 2, 4, 8, 16 between the 5 attempts; tests set it tiny).
"""
import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import requests
from filelock import FileLock
from tqdm import tqdm

from picochat.common import logger

CHUNK_SIZE = 1 << 20  # 1 MB reads/writes
DEFAULT_BACKOFF = 2.0
MIRROR_HINT = ("set PICOCHAT_MIRROR (or pass --mirror) to an http(s) mirror URL or a local directory "
               "laid out like shared/data, e.g. export PICOCHAT_MIRROR=/path/to/shared/data")

_mirror_override = None  # set by set_mirror(); wins over the environment


class DownloadError(RuntimeError):
    """A download that failed for good (all attempts used, or a failure that retrying cannot fix)."""


class _Fatal(Exception):
    """Raised inside an attempt when retrying is pointless (404, missing local file, ...)."""


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


def _stream_http(url, tmp: Path, timeout, progress, desc):
    # timeout bounds the connect and every gap between received bytes, so a stalled server fails fast
    with requests.get(url, stream=True, timeout=timeout, headers={"User-Agent": "picochat"}) as r:
        if r.status_code in (401, 403, 404, 410):
            raise _Fatal(f"HTTP {r.status_code} {r.reason} for {url}")
        r.raise_for_status()  # 5xx, 408, 429, ... are retried
        encoding = r.headers.get("Content-Encoding", "identity").lower()
        length = r.headers.get("Content-Length")
        # with a transfer encoding (gzip) the decoded size differs from Content-Length; only check identity
        expected = int(length) if length is not None and encoding in ("", "identity") else None
        written = 0
        with open(tmp, "wb") as f, tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                                        desc=desc, disable=not _show_progress(progress), leave=False) as bar:
            for chunk in r.iter_content(chunk_size=CHUNK_SIZE):
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if expected is not None and written != expected:
            raise IOError(f"truncated body from {url}: got {written} of {expected} bytes")


def _copy_local(src: Path, tmp: Path, progress, desc):
    if not src.is_file():
        raise _Fatal(f"{src} does not exist in the mirror directory")
    total = src.stat().st_size
    with open(src, "rb") as fin, open(tmp, "wb") as fout, \
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


def download(relpath: str, default_url, dest, validate=None, retries=5, timeout=30, progress=True,
             backoff=None) -> Path:
    """Fetch `relpath` (from the mirror) or `default_url` into `dest`; return `dest`.

    Skips the download when `dest` exists and `validate(dest)` passes (validate: Path -> None, raises
    on a bad file). Otherwise streams into a temp file next to `dest`, checks Content-Length and
    `validate`, then renames it over `dest` atomically: `dest` is never a partial file. HTTP errors,
    dropped connections, truncated bodies and timeouts are retried up to `retries` attempts with
    exponential backoff (base `backoff` seconds, default $PICOCHAT_FETCH_BACKOFF or 2).
    """
    dest = Path(dest)
    if dest.exists():
        if validate is None:
            return dest
        try:
            validate(dest)
            return dest
        except Exception as e:
            logger.warning(f"{dest} exists but is invalid ({e}); downloading it again")
    kind, src = resolve_source(relpath, default_url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    base = _backoff_base(backoff)
    retries = max(1, int(retries))
    last_error = None
    for attempt in range(1, retries + 1):
        # unique temp name next to dest (same filesystem, so the rename is atomic); plain open() keeps the
        # umask's permissions, unlike mkstemp's 0600. Listings ignore it: it does not end in .parquet.
        tmp = dest.parent / f"{dest.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            if kind == "file":
                _copy_local(src, tmp, progress, dest.name)
                if validate is not None:
                    try:
                        validate(tmp)
                    except Exception as e:  # copying the same bad file again cannot help
                        raise _Fatal(f"mirror file {src} is invalid: {e}") from e
            else:
                _stream_http(src, tmp, timeout, progress, dest.name)
                if validate is not None:
                    validate(tmp)
            os.replace(tmp, dest)
            return dest
        except _Fatal as e:
            raise DownloadError(f"Cannot fetch {relpath!r}: {e}. " + (
                "Check that the mirror holds this file (same layout as shared/data), or unset PICOCHAT_MIRROR "
                "to use the public URL." if get_mirror() else "Check the URL, or " + MIRROR_HINT + ".")) from e
        except Exception as e:  # network errors, truncation, failed validation of a downloaded body
            last_error = e
        finally:
            if tmp.exists():
                tmp.unlink()
        if attempt < retries:
            delay = base * 2 ** (attempt - 1)
            logger.warning(f"download of {src} failed (attempt {attempt}/{retries}: {last_error}); "
                           f"retrying in {delay:.3g}s")
            time.sleep(delay)
    mirror = get_mirror()
    fix = (f"Check that the mirror {mirror} is reachable and complete, or point PICOCHAT_MIRROR at another mirror "
           f"(unset it to use the public URLs)" if mirror else f"Check your network connection, or {MIRROR_HINT}")
    raise DownloadError(f"Failed to download {src} after {retries} attempts (last error: {last_error}). {fix}.")


def download_locked(relpath: str, default_url, dest, validate=None, retries=5, timeout=30, progress=True,
                    backoff=None) -> Path:
    """download() under a file lock next to `dest`: with several ranks (or processes) asking for the same
    file, one downloads and the others wait, then find it present and valid."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # hidden lock file: never mistaken for data (listings take *.parquet / named files only)
    with FileLock(str(dest.parent / f".{dest.name}.lock")):
        return download(relpath, default_url, dest, validate=validate, retries=retries, timeout=timeout,
                        progress=progress, backoff=backoff)


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
