"""Sandbox: the happy path, the mode policy, and an attack suite run concurrently in kernel mode; every attack
must be contained, and the calling process (this pytest), its files, its listeners and its children unaffected."""
import os
import re
import sys
import time
import socket
import platform
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from picochat import sandbox, sandbox_child
from picochat.sandbox import execute_code, SandboxUnavailable

SECRET = "hunter2-picochat-secret"
MISSING = sandbox.kernel_isolation_missing()
needs_kernel = pytest.mark.skipif(MISSING is not None, reason=f"kernel isolation unavailable here: {MISSING}")


@needs_kernel
def test_happy_path_and_isolation_basics():
    r = execute_code("print('hello world')")
    assert r.success and r.stdout == "hello world\n" and r.error is None and not r.timeout
    r = execute_code("1 / 0")
    assert not r.success and "ZeroDivisionError" in r.error and "ZeroDivisionError" in r.stderr
    tricky = 'print("a\'b\\"c\\\\d{e}\\n\u20ac")'
    r = execute_code(tricky)
    assert r.success and r.stdout == "a'b\"c\\d{e}\n\u20ac\n"
    r = execute_code("print(sorted(k for k in globals() if not k.startswith('__')))")
    assert r.stdout.strip() == "[]"  # the launcher's names are not visible to user code
    r = execute_code("import os; print(os.getcwd()); open('f.txt', 'w').write('x'); print(open('f.txt').read())")
    cwd = r.stdout.splitlines()[0]
    assert r.success and r.stdout.splitlines()[1] == "x"
    assert cwd != os.getcwd() and not Path(cwd).exists()  # the scratch dir was removed
    r = execute_code("import tempfile\nwith tempfile.NamedTemporaryFile('w') as f:\n    f.write('ok')\nprint('done')")
    assert r.success and r.stdout == "done\n", r.stderr
    r = execute_code("x = input()")
    assert not r.success and "EOFError" in r.error
    r = execute_code("import threading\nt = threading.Thread(target=print, args=('thread ok',))\nt.start(); t.join()")
    assert r.success and r.stdout == "thread ok\n", r.stderr  # threads are allowed (clone with CLONE_THREAD)
    r = execute_code("import os\nprint(os.getpid(), sorted(p for p in os.listdir('/proc') if p.isdigit()))")
    assert r.success and r.stdout.split(maxsplit=1) == ["1", "['1']\n"]  # its own pid namespace, alone in it


def test_mode_policy(monkeypatch):
    monkeypatch.delenv("PICOCHAT_SANDBOX", raising=False)
    monkeypatch.setattr(sandbox, "_probe_result", ["unshare(...): Operation not permitted"])
    with pytest.raises(SandboxUnavailable, match=r"Operation not permitted.*--unsafe-sandbox"):
        execute_code("print(1)")
    r = execute_code("print(1)", mode="unsafe")  # the explicit, loudly named opt-out still runs
    assert r.success and r.stdout == "1\n"
    assert "UNSAFE" in sandbox.describe("unsafe") and "kernel" in sandbox.describe("kernel")
    monkeypatch.setenv("PICOCHAT_SANDBOX", "unsafe")
    assert execute_code("print(2)").stdout == "2\n"
    monkeypatch.setenv("PICOCHAT_SANDBOX", "lax")
    with pytest.raises(SandboxUnavailable, match="PICOCHAT_SANDBOX='lax'"):
        execute_code("print(3)")
    with pytest.raises(TypeError):
        execute_code(b"print(1)", mode="unsafe")


def test_cli_refuses_without_isolation(monkeypatch, capsys):
    from picochat.stages import chat_eval
    monkeypatch.delenv("PICOCHAT_SANDBOX", raising=False)
    monkeypatch.setattr(sandbox, "_probe_result", ["user namespaces are disabled"])
    with pytest.raises(SystemExit) as e:
        chat_eval.main(["-i", "sft", "-a", "HumanEval"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "user namespaces are disabled" in err and "--unsafe-sandbox" in err
    assert "Traceback" not in err


def _headers_table(header, pattern):
    text = Path(header).read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(pattern, text)}


@pytest.mark.parametrize("arch, header, pattern", [
    ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h", r"#define __NR_(\w+)\s+(\d+)"),
    ("aarch64", "/usr/include/asm-generic/unistd.h", r"#define __NR_(\w+)\s+(\d+)"),
])
def test_syscall_tables_match_kernel_headers(arch, header, pattern):
    if not Path(header).exists():
        pytest.skip(f"{header} not installed (linux-libc-dev)")
    want = _headers_table(header, pattern)
    table = {k: v for k, v in sandbox_child.SYSCALLS[arch].items() if k != "arch"}
    wrong = {k: (v, want.get(k)) for k, v in table.items() if want.get(k) != v}
    assert not wrong, f"{arch} numbers differ from {header}: {wrong}"
    missing = [n for n in sandbox_child.DENIED if n not in table and n in want]
    assert not missing, f"{arch} lacks numbers for {missing}"


def _processes_matching(marker: str):
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def _attacks():
    """name -> (code, check(result, pwn_path) -> bool). Tokens PWN (a path outside the sandbox that must never
    appear), CANARY (a file that must survive unchanged), OUTSIDE (its directory), PPID_REAL (pytest's pid),
    TCP_PORT and UNIX_PATH (listeners that must never see a connection) are replaced before running."""
    not_ok = lambda r, p: not r.success
    no_pwn = lambda r, p: not p.exists()
    no_secret = lambda r, p: SECRET not in r.stdout + r.stderr
    said = lambda word: (lambda r, p: word in r.stdout and not p.exists())
    touch = "['/usr/bin/touch', PWN]"
    return {
        # --- process creation, and processes outliving the call
        "os.system": ("import os\nos.system('touch ' + PWN)", no_pwn),
        "subprocess.run": (f"import subprocess\nsubprocess.run({touch})", no_pwn),
        "subprocess._fork_exec (no audit event)": (
            "import subprocess, os\nr, w = os.pipe()\n"
            f"subprocess._fork_exec({touch}, [b'/usr/bin/touch'], True, (), None, None, -1, -1, -1, -1, -1, -1,"
            " r, w, False, False, -1, None, None, None, -1, None, True)", no_pwn),
        "setsid daemon that sleeps past the timeout": (
            "import subprocess\nsubprocess.Popen(['/bin/sleep', '987654'], start_new_session=True)\n"
            "print('started')", lambda r, p: "started" not in r.stdout),
        "posix_spawn": (f"import posix\nposix.posix_spawn('/usr/bin/touch', {touch}, {{}})", no_pwn),
        "os.fork then touch": ("import os\nif os.fork() == 0:\n    open(PWN, 'w')", no_pwn),
        "fork bomb": ("import os\nwhile True:\n    os.fork()", not_ok),
        "os.execv": (f"import os\nos.execv('/usr/bin/touch', {touch})", no_pwn),
        "pty.spawn": ("import pty\npty.spawn(['/usr/bin/touch', PWN])", no_pwn),
        "multiprocessing": ("import multiprocessing\nmultiprocessing.Process(target=print).start()", not_ok),
        "ctypes libc.system": ("import ctypes\nctypes.CDLL(None).system(('touch ' + PWN).encode())", no_pwn),
        "ctypes raw fork syscall": (
            "import ctypes, platform, os\nlibc = ctypes.CDLL(None)\n"
            "nr = 57 if platform.machine() == 'x86_64' else 220\n"
            "pid = libc.syscall(nr, 17, 0, 0, 0, 0) if nr == 220 else libc.syscall(nr)\n"
            "if pid == 0:\n    open(PWN, 'w'); os._exit(0)\nprint('pid', pid)", no_pwn),
        "ctypes clone3": ("import ctypes\nprint(ctypes.CDLL(None).syscall(435, None, 0))", no_pwn),
        "thread bomb": ("import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()",
                        not_ok),
        # --- writes, deletes, renames and special files outside the scratch dir
        "open for write": ("open(PWN, 'w').write('x')", no_pwn),
        "os.open O_CREAT": ("import os\nos.write(os.open(PWN, os.O_CREAT | os.O_WRONLY), b'x')", no_pwn),
        "dir_fd create": ("import os\nd = os.open(OUTSIDE, os.O_RDONLY)\n"
                          "os.write(os.open(os.path.basename(PWN), os.O_CREAT | os.O_WRONLY, dir_fd=d), b'x')", no_pwn),
        "dir_fd unlink": ("import os\nd = os.open(OUTSIDE, os.O_RDONLY)\nos.unlink('canary.txt', dir_fd=d)",
                          lambda r, p: not r.success),
        "rename with dst_dir_fd": ("import os\nd = os.open(OUTSIDE, os.O_RDONLY)\n"
                                   "os.rename('canary.txt', 'moved', src_dir_fd=d, dst_dir_fd=d)", not_ok),
        "mkfifo outside": ("import os\nos.mkfifo(PWN)", no_pwn),
        "mknod outside": ("import os, stat\nos.mknod(PWN, stat.S_IFIFO | 0o600)", no_pwn),
        "delete canary": ("import os\nos.remove(CANARY)", not_ok),
        "pathlib unlink": ("import pathlib\npathlib.Path(CANARY).unlink()", not_ok),
        "shutil.rmtree": ("import shutil\nshutil.rmtree(OUTSIDE)", not_ok),
        "truncate by open": ("open(CANARY, 'w').close()", not_ok),
        "os.truncate": ("import os\nos.truncate(CANARY, 0)", not_ok),
        "chmod": ("import os\nos.chmod(CANARY, 0)", not_ok),
        "symlink out": ("import os\nos.symlink('/etc/passwd', PWN)", no_pwn),
        "hard link in": ("import os\nos.link(CANARY, PWN)", no_pwn),
        "ctypes open+write": ("import ctypes\nlibc = ctypes.CDLL(None)\n"
                              "fd = libc.open(PWN.encode(), 0o101, 0o644)\nlibc.write(fd, b'x', 1)", no_pwn),
        "builtins.isinstance patched, then write": (
            "import builtins\nbuiltins.isinstance = lambda *a: False\nopen(PWN, 'w').write('x')", no_pwn),
        "/proc/self/mem read-write": (
            "import os\nd = os.open('/proc/self', os.O_RDONLY)\n"
            "try:\n    os.open('mem', os.O_RDWR, dir_fd=d); print('opened')\nexcept OSError as e:\n    print('denied', e)",
            said("denied")),
        "block device": ("import os\nfor dev in os.listdir('/dev'):\n"
                         "    if dev.startswith(('sd', 'vd', 'nvme', 'xvd', 'loop')):\n"
                         "        try:\n            os.open('/dev/' + dev, os.O_RDONLY); print('opened', dev)\n"
                         "        except OSError as e:\n            pass\nprint('done')",
                         lambda r, p: "opened" not in r.stdout and "done" in r.stdout),
        "remount / read-write": ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                                 "print(libc.mount(None, b'/', None, 32 | 4096, None), ctypes.get_errno())\n"
                                 "open(PWN, 'w')", no_pwn),
        "umount /proc to reach the host's": ("import ctypes\nlibc = ctypes.CDLL(None)\nlibc.umount2(b'/proc', 2)\n"
                                             "print(open(f'/proc/PPID_REAL/environ', 'rb').read())", no_secret),
        "unshare to regain capabilities": ("import ctypes\nprint(ctypes.CDLL(None).unshare(0x10000000 | 0x20000))\n"
                                           "open(PWN, 'w')", no_pwn),
        # --- secrets of other processes
        "parent environ": ("import os\nprint(dict(os.environ))\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())",
                           no_secret),
        "real parent pid environ": ("print(open('/proc/PPID_REAL/environ', 'rb').read())", no_secret),
        "/proc/self/../ppid": ("print(open('/proc/self/../PPID_REAL/environ', 'rb').read())", no_secret),
        "relative ../../proc": ("import os\nos.chdir('/tmp')\nprint(open('../proc/PPID_REAL/environ', 'rb').read())",
                                no_secret),
        "os.getpid patched": ("import os\nos.getpid = lambda: PPID_REAL\n"
                              "print(open(f'/proc/{os.getpid()}/environ', 'rb').read())", no_secret),
        "scan every /proc environ": ("import os\nfor p in os.listdir('/proc'):\n    try:\n"
                                     "        print(open(f'/proc/{p}/environ', 'rb').read())\n"
                                     "    except Exception:\n        pass", no_secret),
        "ptrace attach to the parent": ("import ctypes\nprint('ret', ctypes.CDLL(None).ptrace(16, PPID_REAL, 0, 0))",
                                        said("ret -1")),
        # --- signals to outside processes
        "kill the parent": ("import os\nos.kill(os.getppid() or PPID_REAL, 15)", not_ok),
        "kill pytest by pid": ("import os\nos.kill(PPID_REAL, 9)", not_ok),
        "pidfd_send_signal": ("import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(PPID_REAL), 9)", not_ok),
        "kill(-1)": ("import os\nos.kill(-1, 9)\nprint('after')", lambda r, p: True),
        # --- network
        "tcp connect to a host listener": ("import socket\nsocket.create_connection(('127.0.0.1', TCP_PORT), 2)", not_ok),
        "_socket": ("import _socket\n_socket.socket()", not_ok),
        "unix socket of the host": ("import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(UNIX_PATH)", not_ok),
        "ctypes socket syscall": ("import ctypes\nprint('fd', ctypes.CDLL(None).socket(2, 1, 0))", said("fd -1")),
        # --- resources
        "infinite loop": ("while True: pass", lambda r, p: r.timeout and not r.success),
        "signal tampering then loop": ("import signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT):\n"
                                       "    signal.signal(s, signal.SIG_IGN)\nwhile True: pass", lambda r, p: r.timeout),
        "huge allocation": ("x = bytearray(8 * 1024 ** 3)", lambda r, p: r.memory_exceeded and not r.success),
        "1 GB of stdout": ("import sys\nfor _ in range(10000):\n    sys.stdout.write('x' * 100000)",
                           lambda r, p: r.output_truncated and len(r.stdout) <= 1024 * 1024),
        "huge file": ("open('big.bin', 'wb').write(b'x' * (64 << 20))", not_ok),
        "fill the scratch disk": ("for i in range(100000):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))", not_ok),
        "deep recursion": ("import sys\nsys.setrecursionlimit(10 ** 7)\ndef f(n): return f(n + 1)\nf(0)", not_ok),
        "raise rlimits": ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", not_ok),
        # --- interpreter tricks
        "importlib.reload(os)": ("import importlib, os\nos = importlib.reload(os)\nos.system('touch ' + PWN)", no_pwn),
        "Popen via the class tree": ("import subprocess\n[c for c in object.__subclasses__() if c.__name__ == 'Popen']"
                                     f"[0]({touch})", no_pwn),
        "gc and frames, then write": ("import gc, sys\nprint(len(gc.get_objects()), sys._getframe())\n"
                                      "open(PWN, 'w')", no_pwn),
        "sys.exit code": ("import sys\nsys.exit(3)", lambda r, p: not r.success and r.returncode == 3),
    }


@needs_kernel
def test_attacks_are_contained(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_TEST_SECRET", SECRET)
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = outside / "canary.txt"
    canary.write_text("alive")
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.settimeout(0.2)
    unix_path = str(tmp_path / "host.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen(8)
    unix.settimeout(0.2)

    attacks = _attacks()
    assert len(attacks) >= 40
    programs, pwns = {}, {}
    for i, (name, (code, _)) in enumerate(attacks.items()):
        pwns[name] = outside / f"pwned_{i}"
        for token, value in (("PWN", repr(str(pwns[name]))), ("CANARY", repr(str(canary))),
                             ("OUTSIDE", repr(str(outside))), ("PPID_REAL", str(os.getpid())),
                             ("TCP_PORT", str(tcp.getsockname()[1])), ("UNIX_PATH", repr(unix_path))):
            code = code.replace(token, value)
        programs[name] = code

    cwd, env = os.getcwd(), dict(os.environ)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = {name: pool.submit(execute_code, code, timeout=3.0) for name, code in programs.items()}
        results = {name: f.result() for name, f in futures.items()}
    elapsed = time.monotonic() - t0
    failures = [f"{name}: {results[name]}" for name, (_, check) in attacks.items() if not check(results[name], pwns[name])]
    assert not failures, "\n".join(failures)

    # the caller is unaffected: its files, cwd, environment and listeners; nothing left running
    assert canary.read_text() == "alive" and oct(canary.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in outside.iterdir()) == ["canary.txt"]
    assert os.getcwd() == cwd and dict(os.environ) == env
    for listener in (tcp, unix):
        with pytest.raises(socket.timeout):
            listener.accept()
        listener.close()
    assert elapsed < 90
    time.sleep(0.3)
    assert _processes_matching("987654") == [] and _processes_matching("picochat_sandbox") == []
    assert threading.active_count() >= 1 and sys.modules["picochat.sandbox"] is sandbox  # pytest alive and sane


@needs_kernel
def test_no_leftover_after_timeout():
    r = execute_code("import threading, time\n"
                     "for _ in range(4):\n    threading.Thread(target=lambda: time.sleep(600)).start()\n"
                     "while True: pass", timeout=1.0)
    assert r.timeout
    time.sleep(0.3)
    assert _processes_matching("picochat_sandbox") == []


@pytest.mark.skipif(platform.system() != "Linux", reason="the unsafe mode's rlimits are tested on Linux")
def test_unsafe_mode_still_limits():
    r = execute_code("x = bytearray(8 * 1024 ** 3)", mode="unsafe")
    assert r.memory_exceeded and not r.success
    r = execute_code("while True: pass", timeout=1.0, mode="unsafe")
    assert r.timeout
