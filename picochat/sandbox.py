"""
Run untrusted Python (model-written code: HumanEval completions, the engine's python tool) and report
what happened.

    from picochat.sandbox import execute_code
    r = execute_code("print(1 + 1)")            # ExecutionResult(success=True, stdout='2\\n', ...)
    r = execute_code("while True: pass", timeout=1.0)   # r.timeout is True, everything was killed

The boundary is the Linux kernel, not Python: the code runs in a child (picochat/sandbox_child.py) that
confines itself with user, mount, pid, net, ipc, uts and cgroup namespaces, a read-only view of the whole
filesystem, no capabilities and a seccomp filter before the code's first byte runs. Whatever the code
does (ctypes, raw syscalls, dir_fd tricks, monkeypatched builtins), this holds:
  * no write, delete, rename, truncate, device or fifo creation outside its scratch dir, by any syscall
    path (every mount is read-only; the scratch dir is a size-limited tmpfs that vanishes with the call);
  * no new processes (fork/vfork/exec/clone-without-CLONE_THREAD are refused by seccomp), and nothing it
    starts outlives the call (it is pid 1 of its own pid namespace; the kernel kills the namespace when
    it ends, and the parent SIGKILLs the launcher's process group on timeout or output overflow);
  * no signal reaches, and no /proc, environment or memory is readable of, any process outside it
    (other processes have no pid in its namespace, /proc is private, ptrace and process_vm_* refused,
    and it starts with an environment of PATH only);
  * no network: an empty network namespace, and socket() refused (so host unix sockets are out of reach);
  * limits: wall clock (parent), RLIMIT_CPU, RLIMIT_AS/DATA (memory), RLIMIT_FSIZE and the tmpfs size
    (disk), RLIMIT_NOFILE, and stdout/stderr capped at max_output_bytes (the rest is never buffered).
It does not hide what the calling user may READ elsewhere on the filesystem (it sees the host's files,
read-only), nor defend against kernel exploits; for hostile multi-tenant workloads use a VM.

Why this and not bubblewrap/nsjail or Landlock: those are not installed by pip and not on every machine;
unprivileged namespaces + mount_setattr (Linux >= 5.12) + seccomp are in every mainstream kernel and cover
filesystem, processes, signals and network in one place, from the standard library. Requirements: Linux
x86_64 or aarch64, unprivileged user namespaces enabled. Where they are missing, execute_code raises
SandboxUnavailable naming what failed, unless the caller opts into mode="unsafe" (or PICOCHAT_SANDBOX=unsafe):
a plain subprocess with rlimits, a scrubbed environment and a throwaway directory, which the code can escape.
"""
import os
import sys
import json
import time
import shutil
import signal
import selectors
import tempfile
import subprocess
import threading
from dataclasses import dataclass

from picochat import sandbox_child

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

class SandboxUnavailable(RuntimeError):
    """The kernel facilities kernel mode needs are missing; the message names the failed step and the fix."""

MODES = ("kernel", "unsafe")
UNSAFE_WARNING = "UNSAFE sandbox: model-written code runs WITHOUT isolation (only rlimits and a temp dir)"
_probe_lock = threading.Lock()
_probe_result: list = []  # [None] when kernel mode works, [message] when it does not; computed once

def default_mode() -> str:
    mode = os.environ.get("PICOCHAT_SANDBOX", "kernel")
    if mode not in MODES:
        raise SandboxUnavailable(f"PICOCHAT_SANDBOX={mode!r} is not a sandbox mode; use one of {', '.join(MODES)}")
    return mode

def kernel_isolation_missing() -> str | None:
    """None when kernel mode works on this machine, else what is missing (the probe runs once per process)."""
    with _probe_lock:
        if not _probe_result:
            if not sys.platform.startswith("linux"):
                _probe_result.append(f"kernel isolation needs Linux (this is {sys.platform})")
            else:
                r = _run("pass", "kernel", 10.0, 64 << 20, 4096, 1 << 20)
                _probe_result.append(_setup_failure(r))
        return _probe_result[0]

def describe(mode: str) -> str:
    """One line for the logs of chat-eval and chat: which mode runs the code."""
    if mode == "unsafe":
        return UNSAFE_WARNING
    return "sandbox: kernel-enforced (namespaces, read-only filesystem, no processes/network, seccomp)"

def require(mode: str | None = None) -> str:
    """Resolve the mode and make sure it can run here; raises SandboxUnavailable with the fix otherwise."""
    mode = mode or default_mode()
    if mode not in MODES:
        raise SandboxUnavailable(f"unknown sandbox mode {mode!r}; use one of {', '.join(MODES)}")
    if mode == "kernel":
        missing = kernel_isolation_missing()
        if missing:
            raise SandboxUnavailable(
                f"the code sandbox cannot isolate code on this machine ({missing}); enable unprivileged user "
                "namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces>0; in a "
                "container allow unshare/mount in its seccomp/AppArmor profile), or accept running model code "
                "unconfined with --unsafe-sandbox / PICOCHAT_SANDBOX=unsafe")
    return mode

def add_unsafe_flag(parser):
    parser.add_argument("--unsafe-sandbox", action="store_true",
                        help="run model-written code WITHOUT kernel isolation (only where namespaces are unavailable)")

def mode_for_cli(parser, unsafe: bool, log=print) -> str:
    """A stage's sandbox mode from its --unsafe-sandbox flag: logs which mode runs, or exits 2 with the fix."""
    try:
        mode = require("unsafe" if unsafe else None)
    except SandboxUnavailable as e:
        parser.error(str(e))
    log(describe(mode))
    return mode

def _setup_failure(r: ExecutionResult) -> str | None:
    if r.returncode == sandbox_child.SETUP_FAILED:
        for line in r.stderr.splitlines():
            if line.startswith("picochat-sandbox-setup-failed: "):
                return line.split(": ", 1)[1]
    if not r.success:
        return f"the sandbox probe failed: {r.error}"
    return None

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
                 max_output_bytes: int = 1024 * 1024, max_file_bytes: int = 16 * 1024 * 1024,
                 mode: str | None = None) -> ExecutionResult:
    """Run `code` confined (see the module docstring); never raises for anything the code does.
    mode: "kernel" (default; SandboxUnavailable if this machine cannot), or "unsafe" (no isolation)."""
    if not isinstance(code, str):
        raise TypeError(f"execute_code expects the program text as str, got {type(code).__name__}")
    mode = require(mode)
    return _run(code, mode, timeout, maximum_memory_bytes, max_output_bytes, max_file_bytes)

def _run(code, mode, timeout, maximum_memory_bytes, max_output_bytes, max_file_bytes) -> ExecutionResult:
    tmpdir = tempfile.mkdtemp(prefix="picochat_sandbox_")
    try:
        program = os.path.join(tmpdir, ".program.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        config = dict(program=program, scratch=tmpdir, mode=mode, memory_bytes=int(maximum_memory_bytes),
                      file_bytes=int(max_file_bytes), cpu_seconds=int(timeout) + 2,
                      scratch_bytes=max(int(max_file_bytes) * 4, 1 << 20))
        # -I: isolated (no user site, PYTHON* env ignored, cwd not on sys.path); -B: no .pyc writes
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", sandbox_child.__file__, json.dumps(config)], cwd=tmpdir,
            env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        out, err, timed_out, truncated = _collect(proc, timeout, max_output_bytes)
        _kill_group(proc)  # the launcher's group; in kernel mode its death also ends the pid namespace
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
