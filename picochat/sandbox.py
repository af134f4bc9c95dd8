"""
Run untrusted Python (model-written code: HumanEval completions, the engine's python tool)
in a throwaway subprocess and report what happened.

    from picochat.sandbox import execute_code
    r = execute_code("print(1 + 1)")            # ExecutionResult(success=True, stdout='2\\n', ...)
    r = execute_code("while True: pass", timeout=1.0)   # r.timeout is True, the process group was killed

What it does (layers, outermost first):
  * a fresh interpreter `sys.executable -I -B` (isolated mode: no user site, PYTHON* env ignored,
    cwd not on sys.path) in its own session/process group, so on timeout or output overflow the
    WHOLE group is SIGKILLed (SIGKILL cannot be caught or ignored: signal tampering does not help);
  * wall-clock timeout enforced by the parent; RLIMIT_CPU as a second stop;
  * resource limits set before the user code runs: RLIMIT_AS and RLIMIT_DATA (memory; a big
    allocation raises MemoryError -> memory_exceeded=True), RLIMIT_FSIZE (file size),
    RLIMIT_NPROC=0 (no new processes, and for a non-root user no new threads either; NOTE the kernel
    ignores it for root), RLIMIT_CORE=0;
  * a fresh temporary working directory, removed afterwards;
  * a scrubbed environment (only PATH), stdin = /dev/null, stdout/stderr captured and capped;
  * a guard prelude: a PEP 578 audit hook (it cannot be removed from Python code) that refuses
    process creation (fork, exec, spawn, system, subprocess), signalling other processes, sockets,
    ctypes and the low-level process/ffi modules, writes/deletes/renames/chmods outside the temp
    dir, reading /proc of other processes, rlimit changes, and gc/frame introspection that could
    reach the guard; plus the reference's "reliability guard" (dangerous os/shutil/subprocess/
    signal functions set to None), so most attempts fail early with a clear error;
  * the user code runs via compile/exec with fresh globals, so it does not see the guard's names.

What it does NOT isolate (this is defence in depth, NOT a security boundary like a container,
a VM, gVisor or seccomp; run real untrusted workloads inside one of those):
  * it runs as the caller's user (as root when you are root, where RLIMIT_NPROC does not apply);
  * READS of any file the user can read (source trees, world-readable config, /etc/passwd ...);
  * CPU and memory use up to the limits, and the host's load while it runs;
  * kernel or interpreter exploits (a crafted code object or a C-extension bug can crash the child
    or bypass the audit hook, which only sees what CPython reports);
  * C extensions already importable from site-packages doing their own syscalls;
  * timing side channels; DNS/network via modules not going through the socket audit events
    (none in the stdlib, but a third-party extension could);
  * the parent only reads the first `max_output_bytes` of output; the rest is discarded.
"""
import os
import sys
import time
import shutil
import signal
import selectors
import tempfile
import subprocess
from dataclasses import dataclass

# -----------------------------------------------------------------------------

@dataclass
class ExecutionResult:
    success: bool            # exit status 0 and not killed
    stdout: str
    stderr: str
    error: str | None = None  # short description of what went wrong (last stderr line, timeout, ...)
    timeout: bool = False
    memory_exceeded: bool = False
    returncode: int | None = None
    output_truncated: bool = False

# The guard runs first in the child. Placeholders are filled with repr()'d values, so the user code
# (also repr()'d) survives any quotes, backslashes or braces byte for byte.
_GUARD = r'''
import os, sys, builtins
_TMP = os.path.realpath(os.getcwd())
_MEM = __MEM__
_FSIZE = __FSIZE__
_CPU = __CPU__
def _limits():
    import resource
    def lim(name, value):
        r = getattr(resource, name, None)
        if r is None:
            return
        try:
            resource.setrlimit(r, (value, value))
        except (ValueError, OSError):
            pass
    if sys.platform != "darwin":  # macOS rejects RLIMIT_AS
        lim("RLIMIT_AS", _MEM)
        lim("RLIMIT_DATA", _MEM)
    lim("RLIMIT_FSIZE", _FSIZE)
    lim("RLIMIT_CPU", _CPU)
    lim("RLIMIT_CORE", 0)
    lim("RLIMIT_NPROC", 0)
_limits()
del _limits
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TMPDIR"] = _TMP  # tempfile works, inside the sandbox directory
import faulthandler, shutil, subprocess, signal  # imported before the hook (they need _posixsubprocess ...)
faulthandler.disable()

def _make_hook(tmp):
    # Everything the hook needs is bound here, in immutable containers.
    from os.path import realpath, join, isabs
    from os import getcwd, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND
    WRITE_FLAGS = O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND
    DENY = frozenset((
        "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "os.kill",
        "os.killpg", "subprocess.Popen", "pty.spawn", "os.startfile", "os.chroot", "os.setuid",
        "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents", "sys._current_frames", "sys.settrace", "sys.setprofile",
        "urllib.Request", "ftplib.connect", "smtplib.connect", "poplib.connect", "imaplib.open",
        "telnetlib.Telnet.open", "webbrowser.open", "os.add_dll_directory", "sys.addaudithook",
        "os.link", "os.symlink", "shutil.chown", "os.chflags", "os.lchflags",
    ))
    DENY_PREFIX = ("socket.", "ctypes.", "_ctypes", "mmap", "syslog.", "winreg.")
    DENY_IMPORT = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "pty",
                             "resource", "multiprocessing", "_multiprocessing", "ssl", "_ssl",
                             "mmap", "fcntl", "termios", "_xxsubinterpreters"))
    PATH_EVENTS = frozenset(("os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod",
                             "os.chown", "os.mkdir", "os.chdir", "os.utime", "os.setxattr",
                             "os.removexattr", "shutil.rmtree", "shutil.move", "shutil.copyfile",
                             "shutil.copytree", "os.mkfifo", "os.mknod"))
    def inside(p):
        if isinstance(p, int):
            return True  # an fd the process already holds
        if isinstance(p, bytes):
            p = p.decode("utf-8", "surrogateescape")
        p = str(p)
        if not isabs(p):
            p = join(getcwd(), p)
        p = realpath(p)
        return p == tmp or p.startswith(tmp + "/") or p == "/dev/null"
    def hook(event, args):
        if event in DENY or event.startswith(DENY_PREFIX):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            if args[0].split(".")[0] in DENY_IMPORT:
                raise ImportError(f"sandbox: import of {args[0]} is not allowed")
        elif event == "open":
            path, mode, flags = args[0], args[1], args[2]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
            if isinstance(path, (str, bytes)):
                s = path.decode("utf-8", "replace") if isinstance(path, bytes) else path
                if s.startswith("/proc/") and not (s.startswith("/proc/self/") or s.startswith(f"/proc/{os.getpid()}/")):
                    raise PermissionError("sandbox: reading other processes' /proc entries is not allowed")
        elif event in PATH_EVENTS:
            for p in args[:2]:
                if isinstance(p, (str, bytes, os.PathLike)) and not inside(os.fspath(p)):
                    raise PermissionError(f"sandbox: {event} outside the sandbox directory")
    return hook
sys.addaudithook(_make_hook(_TMP))
del _make_hook

# The reference's reliability guard: fail early and obviously on the common dangerous calls.
# (File removal/rename/chmod stay available: the hook confines them to the sandbox directory, and tempfile
# needs them.)
for _name in ("kill", "system", "putenv", "fchdir", "setuid", "setgid", "fork", "forkpty", "killpg", "chroot",
              "fchown", "chown", "lchown", "lchflags", "execv", "execve",
              "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve",
              "spawnl", "spawnle", "spawnvp", "spawnvpe", "spawnlp", "spawnlpe", "posix_spawn",
              "posix_spawnp", "popen", "setsid", "setpgid", "plock"):
    if hasattr(os, _name):
        setattr(os, _name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = subprocess.call = subprocess.run = subprocess.check_output = subprocess.check_call = None
subprocess.getoutput = subprocess.getstatusoutput = None
signal.signal = signal.alarm = signal.setitimer = signal.pthread_kill = signal.pthread_sigmask = None
signal.siginterrupt = signal.sigwait = None
builtins.help = None
for _m in ("ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes", "_posixsubprocess"):
    sys.modules[_m] = None
del _name, _m, _TMP, _MEM, _FSIZE, _CPU

_code = compile(__CODE__, "<sandbox>", "exec")
exec(_code, {"__name__": "__main__", "__builtins__": builtins})
'''

def _build_program(code: str, maximum_memory_bytes: int, max_file_bytes: int, cpu_seconds: int) -> str:
    return (_GUARD.replace("__MEM__", repr(int(maximum_memory_bytes)))
                  .replace("__FSIZE__", repr(int(max_file_bytes)))
                  .replace("__CPU__", repr(int(cpu_seconds)))
                  .replace("__CODE__", repr(code)))

def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child is its session/group leader (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass

def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: int = 256 * 1024 * 1024,
                 max_output_bytes: int = 1024 * 1024, max_file_bytes: int = 16 * 1024 * 1024) -> ExecutionResult:
    """Run `code` in a sandboxed subprocess; never raises for anything the code does."""
    if not isinstance(code, str):
        raise TypeError(f"execute_code expects the program text as str, got {type(code).__name__}")
    tmpdir = tempfile.mkdtemp(prefix="picochat_sandbox_")
    try:
        program = _build_program(code, maximum_memory_bytes, max_file_bytes, int(timeout) + 2)
        script = os.path.join(tmpdir, ".sandbox_main.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", script], cwd=tmpdir, env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True)
        out, err, timed_out, truncated = _collect(proc, timeout, max_output_bytes)
        _kill_group(proc)  # leftovers of the group, if anything escaped the fork barrier
        returncode = proc.wait()
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    memory_exceeded = "MemoryError" in stderr or "Cannot allocate memory" in stderr
    error = None
    if timed_out:
        error = "Execution timed out (process group killed)"
    elif truncated:
        error = f"Output exceeded {max_output_bytes} bytes (process group killed)"
    elif returncode != 0:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        if lines:
            error = lines[-1]
        elif returncode < 0:
            error = f"Killed by signal {-returncode}"
        else:
            error = f"Exited with code {returncode}"
    success = returncode == 0 and not timed_out and not truncated
    return ExecutionResult(success, stdout, stderr, error, timed_out, memory_exceeded, returncode, truncated)

def _collect(proc, timeout, max_output_bytes):
    """Read stdout/stderr until EOF, the deadline, or the output cap (whichever first).
    communicate() would buffer unbounded output in the caller's memory; this never holds more
    than max_output_bytes per stream."""
    deadline = time.monotonic() + timeout
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for stream in bufs:
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    timed_out = truncated = False
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                room = max_output_bytes - len(buf)
                buf += chunk[:room]
                truncated = truncated or len(chunk) > room
            if truncated:
                break
        if not timed_out and not truncated:
            # pipes closed; give the process the rest of the deadline to exit
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        if timed_out or truncated:
            _kill_group(proc)
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), timed_out, truncated
