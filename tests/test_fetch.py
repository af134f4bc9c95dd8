"""fetch.py and `picochat data download`: a loopback server that injects faults (dropped connection, HTTP 500/503,
truncated body, slow response, a stall mid-body, corrupt or same-size garbled body) must still leave only
complete, byte-identical (SHA-256 verified) shards, no temp files, and a second run must download nothing.
Interrupted downloads resume with HTTP Range; a shard corrupted on disk later is found and replaced."""
import hashlib
import json
import socket
import struct
import threading
import time
import collections
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat import fetch, dataset
from picochat.stages import data as data_stage

CLIENT_TIMEOUT = 0.5
SLOW_SECONDS = 1.5  # > CLIENT_TIMEOUT: the client must give up and retry


class FaultServer:
    """Serves `root` over loopback; faults[relpath] is a list consumed one per request (then plain success)."""

    def __init__(self, root: Path, publish_sha256=False, honour_range=True):
        self.root = root
        self.faults = {}
        self.counts = collections.Counter()
        self.ranges = collections.defaultdict(list)  # relpath -> the Range header of each request (None: none)
        self.sent = collections.Counter()            # relpath -> body bytes sent
        self.publish_sha256 = publish_sha256         # like the HF hub: X-Linked-Etag = the file's SHA-256
        self.honour_range = honour_range
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    server._serve(self)
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    pass  # the client gave up (slow fault): expected

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _serve(self, h):
        rel = unquote(h.path.split("?")[0].lstrip("/"))
        with self.lock:
            self.counts[rel] += 1
            self.ranges[rel].append(h.headers.get("Range"))
            pending = self.faults.get(rel)
            fault = pending.pop(0) if pending else "ok"
        path = self.root / rel
        if not path.is_file():
            h.send_error(404)
            return
        if fault in ("500", "503"):
            h.send_error(int(fault), "injected")
            return
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if fault == "slow":
            time.sleep(SLOW_SECONDS)
        if fault == "corrupt":
            data = bytes(len(data))  # right length, not a parquet file
        if fault == "garble":  # same size, footer and schema intact: only a hash can tell
            mid = len(data) // 2
            data = data[:mid] + bytes(b ^ 0x5A for b in data[mid:mid + 4096]) + data[mid + 4096:]
        start = 0
        rng = h.headers.get("Range")
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        data = data[start:]
        with self.lock:
            self.sent[rel] += len(data) if fault not in ("drop", "truncate", "stall") else 0
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data)))
        if self.publish_sha256:
            h.send_header("X-Linked-Etag", f'"{digest}"')
        h.end_headers()
        if fault == "stall":  # half the body, then silence longer than the client's timeout
            h.wfile.write(data[:len(data) // 2])
            h.wfile.flush()
            with self.lock:
                self.sent[rel] += len(data) // 2
            time.sleep(SLOW_SECONDS)
            h.close_connection = True
            return
        if fault == "drop":  # half the body, then a hard reset (RST) mid-file
            h.wfile.write(data[:len(data) // 2])
            h.wfile.flush()
            with self.lock:
                self.sent[rel] += len(data) // 2
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
            h.close_connection = True
            return
        if fault == "truncate":  # Content-Length promises more than is sent, then a clean close
            h.wfile.write(data[:len(data) - 4096])
            h.wfile.flush()
            with self.lock:
                self.sent[rel] += len(data) - 4096
            h.close_connection = True
            return
        h.wfile.write(data)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fault_server(shared_data):
    server = FaultServer(shared_data)
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _fast_and_clean(monkeypatch, picochat_home):
    monkeypatch.setenv("PICOCHAT_FETCH_BACKOFF", "0.01")
    fetch.set_mirror(None)
    yield
    fetch.set_mirror(None)


def _leftovers(directory: Path):
    return [p.name for p in directory.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def test_download_survives_injected_faults(fault_server, shared_data, tmp_path):
    src = shared_data / "pretrain"
    fault_server.faults = {
        "pretrain/shard_00006.parquet": ["drop", "500", "corrupt"],
        "pretrain/shard_00005.parquet": ["truncate", "slow", "500"],
    }
    fetch.set_mirror(fault_server.url)
    dest_dir = tmp_path / "shards"
    for name in ("shard_00005.parquet", "shard_00006.parquet"):
        out = fetch.download(f"pretrain/{name}", None, dest_dir / name, validate=dataset.validate_shard,
                             timeout=CLIENT_TIMEOUT, progress=False)
        assert out == dest_dir / name
    assert fault_server.counts["pretrain/shard_00006.parquet"] == 4  # 3 faults + 1 success
    assert fault_server.counts["pretrain/shard_00005.parquet"] == 4
    assert sorted(p.name for p in dest_dir.iterdir() if not p.name.startswith(".")) == \
        ["shard_00005.parquet", "shard_00006.parquet"]
    for name in ("shard_00005.parquet", "shard_00006.parquet"):
        assert (dest_dir / name).read_bytes() == (src / name).read_bytes()
    # second run: present and valid -> not a single request
    fault_server.counts.clear()
    for name in ("shard_00005.parquet", "shard_00006.parquet"):
        fetch.download(f"pretrain/{name}", None, dest_dir / name, validate=dataset.validate_shard, progress=False)
    assert sum(fault_server.counts.values()) == 0


def test_data_download_cli_with_faults_then_nothing_to_do(fault_server, shared_data, picochat_home):
    src = shared_data / "pretrain"
    fault_server.faults = {
        "pretrain/shard_00000.parquet": ["500", "drop", "slow"],
        "pretrain/shard_00006.parquet": ["truncate", "corrupt", "drop", "500"],
        "pretrain/manifest.json": ["500"],
    }
    args = ["download", "-n", "1", "-w", "2", "--mirror", fault_server.url, "--timeout", str(CLIENT_TIMEOUT)]
    assert data_stage.main(args) == 0
    out = picochat_home / "data" / "climbmix"
    # the manifest says shard_00006 is the validation shard, so -n 1 -> shard 0 + shard 6
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["shard_00000.parquet", "shard_00006.parquet"]
    assert not _leftovers(out)
    for p in out.glob("*.parquet"):
        assert p.read_bytes() == (src / p.name).read_bytes()
    assert dataset.split_files("val") == [out / "shard_00006.parquet"]
    fault_server.counts.clear()
    assert data_stage.main(args) == 0
    assert not [k for k in fault_server.counts if k.endswith(".parquet")], fault_server.counts


def test_persistent_failure_names_url_and_fix(fault_server, tmp_path):
    fault_server.faults = {"pretrain/shard_00006.parquet": ["500"] * 10}
    fetch.set_mirror(fault_server.url)
    dest = tmp_path / "shard_00006.parquet"
    with pytest.raises(fetch.DownloadError) as e:
        fetch.download("pretrain/shard_00006.parquet", None, dest, retries=3, progress=False)
    msg = str(e.value)
    assert f"{fault_server.url}/pretrain/shard_00006.parquet" in msg and "PICOCHAT_MIRROR" in msg
    assert "3 attempts" in msg
    assert fault_server.counts["pretrain/shard_00006.parquet"] == 3
    assert not dest.exists() and not _leftovers(tmp_path)


def test_missing_file_is_not_retried(fault_server, tmp_path):
    fetch.set_mirror(fault_server.url)
    with pytest.raises(fetch.DownloadError, match="404"):
        fetch.download("pretrain/nope.parquet", None, tmp_path / "nope.parquet", progress=False)
    assert fault_server.counts["pretrain/nope.parquet"] == 1


def test_download_downloads_once(fault_server, tmp_path):
    fetch.set_mirror(fault_server.url)
    dest = tmp_path / "shard_00006.parquet"
    errors = []

    def worker():
        try:
            fetch.download("pretrain/shard_00006.parquet", None, dest, validate=dataset.validate_shard,
                                  progress=False)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert fault_server.counts["pretrain/shard_00006.parquet"] == 1
    dataset.validate_shard(dest)


def test_no_mirror_and_no_url_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("PICOCHAT_MIRROR", raising=False)
    with pytest.raises(fetch.DownloadError, match="PICOCHAT_MIRROR") as e:
        fetch.download("gsm8k/test.jsonl", None, tmp_path / "test.jsonl")
    assert "gsm8k/test.jsonl" in str(e.value)
    monkeypatch.setenv("PICOCHAT_MIRROR", str(tmp_path / "does-not-exist"))
    with pytest.raises(fetch.DownloadError, match="does-not-exist"):
        fetch.download("gsm8k/test.jsonl", None, tmp_path / "test.jsonl")


def test_mirror_setting_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PICOCHAT_MIRROR", "http://example.invalid/data/")
    assert fetch.get_mirror() == "http://example.invalid/data"
    assert fetch.resolve_source("core/core.yaml") == ("url", "http://example.invalid/data/core/core.yaml")
    fetch.set_mirror(str(tmp_path))
    assert fetch.resolve_source("core/core.yaml") == ("file", tmp_path / "core" / "core.yaml")
    fetch.set_mirror(None)
    assert fetch.get_mirror() == "http://example.invalid/data"
    monkeypatch.delenv("PICOCHAT_MIRROR")
    assert fetch.resolve_source("x", "https://a/b") == ("url", "https://a/b")


def _tiny_shard(path, texts):
    pq.write_table(pa.table({"text": texts}), path)


def test_local_directory_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "pretrain").mkdir(parents=True)
    shards = []
    for i in range(4):
        name = f"shard_{i:05d}.parquet"
        _tiny_shard(mirror / "pretrain" / name, [f"doc {i} {j}" for j in range(5)])
        shards.append({"file": name, "split": "val" if i == 3 else "train",
                       "file_bytes": (mirror / "pretrain" / name).stat().st_size})
    (mirror / "pretrain" / "manifest.json").write_text(json.dumps({"shards": shards}))
    (mirror / "gsm8k").mkdir()
    (mirror / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?"}\n')
    monkeypatch.setenv("PICOCHAT_MIRROR", str(mirror))
    # any relpath, copied through a temp file
    dest = tmp_path / "out" / "test.jsonl"
    fetch.download("gsm8k/test.jsonl", None, dest)
    assert dest.read_text() == '{"question": "1+1?"}\n' and not _leftovers(tmp_path / "out")
    # asking for more train shards than the mirror has: take what exists, warn clearly
    warnings = []
    monkeypatch.setattr(dataset.logger, "warning", lambda msg, *a, **k: warnings.append(msg))
    out = tmp_path / "data"
    assert data_stage.main(["download", "-n", "10", "--data-dir", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == [s["file"] for s in shards]
    assert any("only 3" in w for w in warnings), warnings
    # a corrupt local mirror file is reported, naming it, without endless retries
    bad = mirror / "pretrain" / "shard_00002.parquet"
    bad.write_bytes(b"not parquet")
    (out / "shard_00002.parquet").unlink()
    assert data_stage.main(["download", "-n", "3", "--data-dir", str(out)]) == 1
    assert not (out / "shard_00002.parquet").exists() and not _leftovers(out)


def test_interrupted_downloads_resume_with_range(fault_server, shared_data, tmp_path):
    name = "pretrain/shard_00006.parquet"
    size = (shared_data / name).stat().st_size
    # (a reset would discard what the client's kernel had buffered, so the resumable faults are these)
    fault_server.faults = {name: ["truncate", "stall", "503"]}
    fetch.set_mirror(fault_server.url)
    dest = tmp_path / "shard_00006.parquet"
    fetch.download(name, None, dest, validate=dataset.validate_shard, timeout=CLIENT_TIMEOUT, progress=False)
    assert dest.read_bytes() == (shared_data / name).read_bytes() and not _leftovers(tmp_path)
    r = fault_server.ranges[name]
    assert r[0] is None and all(x and x.startswith("bytes=") and int(x[6:-1]) > 0 for x in r[1:]), r
    assert fault_server.sent[name] < 1.1 * size  # each byte crossed the wire about once, not once per attempt
    # a run killed mid-download leaves <name>.partial: the next run asks only for the rest
    dest.unlink()
    part = tmp_path / "shard_00006.parquet.partial"
    part.write_bytes((shared_data / name).read_bytes()[:size // 3])
    fault_server.ranges.clear()
    fault_server.sent.clear()
    fetch.download(name, None, dest, validate=dataset.validate_shard, progress=False)
    assert dest.read_bytes() == (shared_data / name).read_bytes() and not part.exists()
    assert fault_server.ranges[name] == [f"bytes={size // 3}-"] and fault_server.sent[name] == size - size // 3


def test_server_without_range_support_restarts_cleanly(shared_data, tmp_path):
    server = FaultServer(shared_data, honour_range=False)
    try:
        name = "pretrain/shard_00005.parquet"
        server.faults = {name: ["drop"]}
        fetch.set_mirror(server.url)
        dest = tmp_path / "shard_00005.parquet"
        fetch.download(name, None, dest, validate=dataset.validate_shard, timeout=CLIENT_TIMEOUT, progress=False)
        assert dest.read_bytes() == (shared_data / name).read_bytes()  # the 200 replaced the partial bytes
    finally:
        server.close()


def test_same_size_garbling_is_caught_by_the_published_sha256(shared_data, tmp_path):
    """Like the HF hub (X-Linked-Etag): a garbled body passes the footer check but not the hash, so it is retried;
    the verified hash is recorded, so damage on disk later is found on the next run and the file replaced."""
    server = FaultServer(shared_data, publish_sha256=True)
    try:
        name = "pretrain/shard_00005.parquet"
        server.faults = {name: ["garble", "garble"]}
        fetch.set_mirror(server.url)
        dest = tmp_path / "shard_00005.parquet"
        fetch.download(name, None, dest, validate=dataset.validate_shard, progress=False)
        assert server.counts[name] == 3 and dest.read_bytes() == (shared_data / name).read_bytes()
        assert fetch.recorded_sha256(dest) == hashlib.sha256(dest.read_bytes()).hexdigest()
        # later, on disk: same size, footer intact
        data = bytearray(dest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        dest.write_bytes(bytes(data))
        dataset.validate_shard(dest)  # the cheap check is fooled ...
        assert "SHA-256 mismatch" in fetch.check_present(dest)  # ... the recorded hash is not
        assert data_stage.main(["info", "--data-dir", str(tmp_path)]) == 1
        fetch.download(name, None, dest, validate=dataset.validate_shard, progress=False)
        assert server.counts[name] == 4 and dest.read_bytes() == (shared_data / name).read_bytes()
        assert data_stage.main(["info", "--data-dir", str(tmp_path)]) == 0
    finally:
        server.close()


def test_manifest_hashes_verify_mirror_downloads(tmp_path, monkeypatch, capsys):
    mirror = tmp_path / "mirror" / "pretrain"
    mirror.mkdir(parents=True)
    for i in range(3):
        _tiny_shard(mirror / f"shard_{i:05d}.parquet", [f"doc {i} {j}" for j in range(5)])
    assert data_stage.main(["manifest", str(mirror)]) == 0
    manifest = json.loads((mirror / "manifest.json").read_text())
    assert [s["split"] for s in manifest["shards"]] == ["train", "train", "val"]
    assert all(s["sha256"] == hashlib.sha256((mirror / s["file"]).read_bytes()).hexdigest() for s in manifest["shards"])
    monkeypatch.setenv("PICOCHAT_MIRROR", str(mirror.parent))
    out = tmp_path / "data"
    assert data_stage.main(["download", "-n", "2", "--data-dir", str(out)]) == 0
    assert all(fetch.recorded_sha256(p) for p in out.glob("*.parquet"))
    # the mirror's copy goes bad (same size): the mismatch names the file, and nothing unverified is kept
    bad = mirror / "shard_00001.parquet"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    (out / "shard_00001.parquet").unlink()
    capsys.readouterr()
    assert data_stage.main(["download", "-n", "2", "--data-dir", str(out)]) == 1
    msg = capsys.readouterr().out
    assert "shard_00001.parquet" in msg and "SHA-256" in msg
    assert not (out / "shard_00001.parquet").exists() and not _leftovers(out)


def test_a_corrupt_shard_read_names_the_file_and_the_fix(shared_data, tmp_path):
    src = (shared_data / "pretrain" / "shard_00006.parquet").read_bytes()
    mid = len(src) // 2
    bad = tmp_path / "shard_00000.parquet"
    bad.write_bytes(src[:mid] + bytes(b ^ 0x5A for b in src[mid:mid + 4096]) + src[mid + 4096:])
    pf = dataset.open_parquet(bad)  # footer and schema intact
    with pytest.raises(ValueError, match=r"shard_00000\.parquet: row group 0 cannot be read .*picochat data download"):
        dataset.read_row_group(pf, 0, bad)
    assert "CORRUPT" in data_stage._integrity(bad, deep=True)


def test_mirror_sha256sums_cover_every_file(tmp_path, monkeypatch):
    root = tmp_path / "mirror"
    (root / "gsm8k").mkdir(parents=True)
    (root / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?"}\n')
    (root / "words").mkdir()
    (root / "words" / "words_alpha.txt").write_text("apple\nbanana\n")
    assert data_stage.main(["manifest", "--sums", str(root)]) == 0
    sums = fetch.parse_sums((root / "SHA256SUMS").read_text())
    assert set(sums) == {"gsm8k/test.jsonl", "words/words_alpha.txt"}
    monkeypatch.setenv("PICOCHAT_MIRROR", str(root))
    dest = tmp_path / "out" / "test.jsonl"
    fetch.download("gsm8k/test.jsonl", None, dest, progress=False)
    assert fetch.recorded_sha256(dest) == sums["gsm8k/test.jsonl"]
    # the mirror's copy changes behind its SHA256SUMS: refused, naming the file; nothing half-trusted is kept
    (root / "words" / "words_alpha.txt").write_text("apple\nbanamo\n")
    with pytest.raises(fetch.DownloadError, match=r"words_alpha\.txt has SHA-256"):
        fetch.download("words/words_alpha.txt", None, tmp_path / "out" / "words.txt", progress=False)
    assert not (tmp_path / "out" / "words.txt").exists() and not _leftovers(tmp_path / "out")
