"""Sandbox: the happy path, and an attack list run concurrently; every attack must be contained and the
calling process (this pytest) unaffected."""
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from picochat.sandbox import execute_code

SECRET = "hunter2-picochat-secret"


def test_happy_path_and_isolation_basics():
    r = execute_code("print('hello world')")
    assert r.success and r.stdout == "hello world\n" and r.error is None and not r.timeout
    r = execute_code("1 / 0")
    assert not r.success and "ZeroDivisionError" in r.error and "ZeroDivisionError" in r.stderr
    tricky = 'print("a\'b\\"c\\\\d{e}\\n\u20ac")'
    r = execute_code(tricky)
    assert r.success and r.stdout == "a'b\"c\\d{e}\n\u20ac\n"
    r = execute_code("print(sorted(k for k in globals() if not k.startswith('__')))")
    assert r.stdout.strip() == "[]"  # the guard's names are not visible to user code
    r = execute_code("import os; print(os.getcwd()); open('f.txt', 'w').write('x'); print(open('f.txt').read())")
    cwd = r.stdout.splitlines()[0]
    assert r.success and r.stdout.splitlines()[1] == "x"
    assert cwd != os.getcwd() and not Path(cwd).exists()  # the temp dir was removed
    r = execute_code("import tempfile\nwith tempfile.NamedTemporaryFile('w') as f:\n    f.write('ok')\nprint('done')")
    assert r.success and r.stdout == "done\n", r.stderr
    r = execute_code("x = input()")
    assert not r.success and "EOFError" in r.error


def _children(pid):
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d.name))
    return kids


def test_attacks_are_contained(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_TEST_SECRET", SECRET)
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = outside / "canary.txt"
    canary.write_text("alive")
    pwn = outside / "pwned"
    P = repr(str(pwn))
    C = repr(str(canary))
    D = repr(str(outside))
    not_ok = lambda r: not r.success
    no_pwn = lambda r: not pwn.exists()
    attacks = {
        "infinite loop": ("while True: pass", lambda r: r.timeout and not r.success),
        "fork bomb": ("import os\nwhile True:\n    os.fork()", not_ok),
        "fork bomb via posix": ("import posix\nwhile True:\n    posix.fork()", not_ok),
        "huge allocation": ("x = bytearray(8 * 1024 ** 3)", lambda r: r.memory_exceeded and not r.success),
        "write outside temp dir": (f"open({P}, 'w').write('x')", no_pwn),
        "write outside via os.open": (f"import os\nfd = os.open({P}, os.O_CREAT | os.O_WRONLY)\nos.write(fd, b'x')", no_pwn),
        "env secret": ("import os\nprint(dict(os.environ))\n"
                       "try:\n    print(open(f'/proc/{os.getppid()}/environ', 'rb').read())\nexcept Exception as e:\n    print(e)",
                       lambda r: SECRET not in r.stdout + r.stderr),
        "os.system": (f"import os\nos.system('touch ' + {P})", no_pwn),
        "subprocess": (f"import subprocess\nsubprocess.run(['touch', {P}])", no_pwn),
        "_posixsubprocess": ("import _posixsubprocess", not_ok),
        "posix_spawn": (f"import posix\nposix.posix_spawn('/usr/bin/touch', ['touch', {P}], {{}})", no_pwn),
        "ctypes": (f"import ctypes\nctypes.CDLL(None).system(('touch ' + {P}).encode())", no_pwn),
        "ctypes after sys.modules cleanup": (f"import sys\ndel sys.modules['ctypes']\nimport ctypes\n"
                                             f"ctypes.CDLL(None).system(('touch ' + {P}).encode())", no_pwn),
        "importlib.reload(os)": (f"import importlib, os\nos = importlib.reload(os)\nos.system('touch ' + {P})", no_pwn),
        "__import__ os.system": (f"__import__('os').system('touch ' + {P})", no_pwn),
        "builtins via class tree": (f"[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen']"
                                    f"[0](['touch', {P}])", no_pwn),
        "delete file": (f"import os\nos.remove({C})", lambda r: canary.exists()),
        "delete via pathlib": (f"import pathlib\npathlib.Path({C}).unlink()", lambda r: canary.exists()),
        "rmtree": (f"import shutil\nshutil.rmtree({D})", lambda r: canary.exists()),
        "truncate by open": (f"open({C}, 'w').close()", lambda r: canary.read_text() == "alive"),
        "rename": (f"import posix\nposix.rename({C}, {C} + '.moved')", lambda r: canary.exists()),
        "socket": ("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))", not_ok),
        "socket via _socket": ("import _socket\n_socket.socket()", not_ok),
        "kill the parent": ("import posix\nposix.kill(posix.getppid(), 15)", not_ok),
        "signal tampering then loop": ("import _signal\nfor s in (_signal.SIGTERM, _signal.SIGALRM, _signal.SIGINT):\n"
                                       "    _signal.signal(s, _signal.SIG_IGN)\nwhile True: pass", lambda r: r.timeout),
        "raise rlimits": ("import sys\ndel sys.modules['resource']\nimport resource\n"
                          "resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", not_ok),
        "gc hunt for the audit hook": ("import gc\nprint(len(gc.get_objects()))", not_ok),
        "multiprocessing": ("import multiprocessing\nmultiprocessing.Process(target=print).start()", not_ok),
        "sys.exit code": ("import sys\nsys.exit(3)", lambda r: not r.success and r.returncode == 3),
        "huge output": ("while True:\n    print('x' * 100000)", lambda r: r.output_truncated and len(r.stdout) <= 1024 * 1024),
        "huge file": ("open('big.bin', 'wb').write(b'x' * (64 << 20))", not_ok),
    }
    assert len(attacks) >= 15
    cwd, env = os.getcwd(), dict(os.environ)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {name: pool.submit(execute_code, code, timeout=3.0) for name, (code, _) in attacks.items()}
        results = {name: f.result() for name, f in futures.items()}
    elapsed = time.monotonic() - t0
    failures = [f"{name}: {results[name]}" for name, (_, check) in attacks.items() if not check(results[name])]
    assert not failures, "\n".join(failures)
    # the caller is unaffected: files, cwd, environment, no leftover processes; every run came back
    assert canary.read_text() == "alive" and not pwn.exists() and sorted(p.name for p in outside.iterdir()) == ["canary.txt"]
    assert os.getcwd() == cwd and dict(os.environ) == env
    assert elapsed < 60
    time.sleep(0.2)
    leftovers = [pid for pid in _children(os.getpid())
                 if "picochat_sandbox" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
    assert leftovers == []


def test_rejects_non_string():
    with pytest.raises(TypeError):
        execute_code(b"print(1)")
