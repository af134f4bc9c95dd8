"""Shared fixtures: isolated PICOCHAT_HOME, the real-data mirror (../shared/data), tiny tokenizer."""
import os
import threading
import functools
from http.server import ThreadingHTTPServer, SimpleHTTPRequestHandler
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PICOCHAT_SHARED_DATA", REPO.parent / "shared" / "data"))

# tiny models gain nothing from intra-op threads, and spinning OMP threads slow them badly when cores are busy
torch.set_num_threads(1)

# The suite computes in fp32 on every CPU: the automatic choice (bf16 on CPUs with native bf16 matrix
# instructions) would make the same tests run in another precision on another machine. Tests of bf16 and of
# the choice itself pass their dtype explicitly or mock the detection. Subprocess stages inherit this.
os.environ.setdefault("PICOCHAT_DTYPE", "float32")

# A little varied text for tiny in-process tokenizers: prose, digits, code, unicode.
TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "In 1842, 17 ships sailed 3,000 miles; 12.5% returned by 1850.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Héllo wörld! Ça va? 你好，世界。 안녕하세요 🙂",
    "User: what is 6*7?\nAssistant: 6*7 = 42.",
    "She said, 'I'll go if you're going, and we've time.'",
]

@pytest.fixture(autouse=True, scope="session")
def sandbox_mode():
    """Stages that run model code (chat-eval's HumanEval, chat-sft's ChatCORE, the python tool) refuse where the kernel
    cannot isolate it. On such a machine the tests of those stages opt into the unsafe mode (the programs they run
    are the tests' own); tests/test_sandbox.py skips its containment tests there, saying why."""
    from picochat import sandbox
    missing = sandbox.kernel_isolation_missing()
    if missing:
        os.environ["PICOCHAT_SANDBOX"] = "unsafe"
    yield "unsafe" if missing else "kernel"


def pytest_report_header(config):
    from picochat import sandbox
    missing = sandbox.kernel_isolation_missing()
    return f"sandbox: {'kernel isolation' if not missing else 'UNSAFE mode for stage tests: ' + missing}"


@pytest.fixture
def picochat_home(tmp_path, monkeypatch):
    """A fresh artifact root for one test; no test touches ~/.cache/picochat."""
    home = tmp_path / "picochat_home"
    home.mkdir()
    monkeypatch.setenv("PICOCHAT_HOME", str(home))
    monkeypatch.delenv("PICOCHAT_MIRROR", raising=False)
    return home

@pytest.fixture(scope="session")
def shared_data():
    """../shared/data (the real datasets); the test is skipped, saying why, when it is absent."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (set PICOCHAT_SHARED_DATA to its location)")
    return SHARED_DATA

class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

@pytest.fixture(scope="session")
def mirror_url(shared_data):
    """../shared/data served over loopback HTTP, laid out as a PICOCHAT_MIRROR."""
    handler = functools.partial(_QuietHandler, directory=str(shared_data))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()

@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A throwaway byte-level BPE (vocab 512) trained in-process on TINY_CORPUS."""
    from picochat.tokenizer import Tokenizer
    return Tokenizer.train_from_iterator(iter(TINY_CORPUS * 4), vocab_size=512)
