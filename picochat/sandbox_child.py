"""
The sandbox's child side: run as a script (`python -I -B sandbox_child.py CONFIG_JSON`) by
picochat.sandbox.execute_code, never imported by the rest of picochat. It reads the program, confines
itself with kernel facilities, then runs the program in the same process. Standard library only (ctypes
for the few syscalls Python 3.11's os module lacks), so it works with any interpreter that can run picochat.

Kernel mode, in order (each step needs the previous one; any failure exits with SETUP_FAILED and one
stderr line naming the step, and the parent refuses instead of running the code unconfined):
  1. rlimits: address space, data, file size, CPU seconds, open files, no core dumps. They are inherited
     by everything below and cannot be raised again (no CAP_SYS_RESOURCE in the init namespace).
  2. unshare(user, mount, pid, net, ipc, uts, cgroup namespaces). The user namespace is what lets an
     unprivileged caller create the others; our uid/gid map to themselves.
  3. fork: the child is pid 1 of the new pid namespace. When it exits, or is killed, the kernel kills
     everything else in that namespace, so nothing the code starts can outlive the call; and it can name
     (signal, ptrace, open /proc of) only processes inside. PR_SET_PDEATHSIG ties it to this launcher,
     which the parent kills with its process group on timeout.
  4. mounts, private to the namespace: a size-limited tmpfs on the scratch dir (the only writable place,
     and it disappears with the namespace); a fresh /proc showing only the sandbox's own processes (or an
     empty tmpfs where the kernel refuses a new proc); then the WHOLE tree made read-only, nosuid and nodev
     in one recursive mount_setattr (Linux >= 5.12), so no syscall path (dir_fd, renameat, mknod, mkfifo,
     /proc/self/mem, truncate, ...) can write, delete, rename or create anything outside the scratch dir;
     /dev/null, zero, full, random and urandom are re-enabled as the only device nodes.
  5. every capability dropped (bounding set, then effective/permitted/inheritable), PR_SET_NO_NEW_PRIVS.
  6. a seccomp-BPF filter (x86_64, aarch64): no new processes (fork, vfork, execve, clone without
     CLONE_THREAD; clone3 answers ENOSYS so threads fall back to clone), no sockets at all (the network
     namespace has no interfaces anyway; this also closes pathname unix sockets of the host), no ptrace or
     cross-process memory, no mount/namespace/keyring/bpf/perf/io_uring/module/reboot calls, no setsid or
     setpgid (the process group the parent kills stays whole). A foreign architecture's syscalls are killed.
Then the program runs with fresh globals. Threads remain possible and are bounded by the address-space
limit; nothing is hidden from the code's own view except the above.

Unsafe mode (explicit opt-in only): rlimits, scrubbed environment, throwaway working directory and the
parent's process-group kill; no kernel isolation at all.
"""
import os
import sys
import json
import ctypes
import struct
import signal
import builtins
import resource
import platform

SETUP_FAILED = 97  # exit status meaning "the sandbox could not be built"; stderr says which step

# -----------------------------------------------------------------------------
# constants from the Linux UAPI headers (stable ABI)

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_THREAD = 0x10000000, 0x20000000, 0x40000000, 0x00010000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR, SYS_CLONE3 = 442, 435  # same number on every architecture (added after the unification)
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 24, 38, 22
SECCOMP_MODE_FILTER = 2
RET_ALLOW, RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
RET_ERRNO = lambda e: 0x00050000 | e
EPERM, ENOSYS = 1, 38
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")

# Denied system calls by name; the tables give each architecture's numbers (checked against the kernel
# headers by tests/test_sandbox.py where those are installed).
DENIED = ("fork", "vfork", "execve", "execveat", "socket", "ptrace", "process_vm_readv", "process_vm_writev",
          "kcmp", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "mount", "umount2", "pivot_root", "chroot",
          "unshare", "setns", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
          "mount_setattr", "open_by_handle_at", "name_to_handle_at", "bpf", "perf_event_open", "keyctl",
          "add_key", "request_key", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
          "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
          "swapoff", "acct", "quotactl", "syslog", "setsid", "setpgid")
SYSCALLS = {
    "x86_64": dict(arch=0xC000003E, clone=56, fork=57, vfork=58, execve=59, execveat=322, socket=41, ptrace=101,
                   process_vm_readv=310, process_vm_writev=311, kcmp=312, pidfd_open=434, pidfd_getfd=438,
                   pidfd_send_signal=424, mount=165, umount2=166, pivot_root=155, chroot=161, unshare=272,
                   setns=308, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
                   mount_setattr=442, open_by_handle_at=304, name_to_handle_at=303, bpf=321, perf_event_open=298,
                   keyctl=250, add_key=248, request_key=249, userfaultfd=323, io_uring_setup=425,
                   io_uring_enter=426, io_uring_register=427, kexec_load=246, kexec_file_load=320,
                   init_module=175, finit_module=313, delete_module=176, reboot=169, swapon=167, swapoff=168,
                   acct=163, quotactl=179, syslog=103, setsid=112, setpgid=109, capset=126),
    # aarch64 uses the generic table: there is no fork or vfork syscall (glibc forks with clone)
    "aarch64": dict(arch=0xC00000B7, clone=220, execve=221, execveat=281, socket=198, ptrace=117,
                    process_vm_readv=270, process_vm_writev=271, kcmp=272, pidfd_open=434, pidfd_getfd=438,
                    pidfd_send_signal=424, mount=40, umount2=39, pivot_root=41, chroot=51, unshare=97, setns=268,
                    open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
                    mount_setattr=442, open_by_handle_at=265, name_to_handle_at=264, bpf=280, perf_event_open=241,
                    keyctl=219, add_key=217, request_key=218, userfaultfd=282, io_uring_setup=425,
                    io_uring_enter=426, io_uring_register=427, kexec_load=104, kexec_file_load=294,
                    init_module=105, finit_module=273, delete_module=106, reboot=142, swapon=224, swapoff=225,
                    acct=89, quotactl=60, syslog=116, setsid=157, setpgid=154, capset=91),
}

_libc = ctypes.CDLL(None, use_errno=True)

class SetupError(Exception):
    pass

def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")

# -----------------------------------------------------------------------------
# the steps

def set_limits(cfg):
    def lim(name, value):
        resource.setrlimit(getattr(resource, name), (value, value))
    lim("RLIMIT_AS", cfg["memory_bytes"])
    lim("RLIMIT_DATA", cfg["memory_bytes"])
    lim("RLIMIT_FSIZE", cfg["file_bytes"])
    lim("RLIMIT_CPU", cfg["cpu_seconds"])
    lim("RLIMIT_CORE", 0)
    lim("RLIMIT_NOFILE", 256)
    if cfg["mode"] == "unsafe":
        lim("RLIMIT_NPROC", 0)  # the only process barrier unsafe mode has (and the kernel ignores it for root)

def enter_namespaces():
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    _check(_libc.unshare(flags), "unshare(user, mount, pid, net, ipc, uts, cgroup namespaces)")
    try:
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
    except OSError as e:
        raise SetupError(f"writing the user namespace's id maps: {e.strerror}")

def _mount(source, target, fstype, flags, data, what):
    b = lambda s: None if s is None else s.encode()
    _check(_libc.mount(b(source), b(target), b(fstype), ctypes.c_ulong(flags), b(data)), what)

def _mount_setattr(path, recursive, attr_set, attr_clr, what):
    attr = struct.pack("QQQQ", attr_set, attr_clr, 0, 0)  # struct mount_attr (propagation, userns_fd unused)
    buf = ctypes.create_string_buffer(attr, len(attr))
    r = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                      ctypes.c_uint(AT_RECURSIVE if recursive else 0), buf, ctypes.c_size_t(len(attr)))
    _check(r, what)

def build_filesystem(cfg):
    scratch = cfg["scratch"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None, "making the mount tree private")
    _mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['scratch_bytes']},nr_inodes=4096,mode=0700",
           "mounting a tmpfs on the scratch dir")
    for dev in DEVICES:
        if os.path.exists(dev):
            _mount(dev, dev, None, MS_BIND, None, f"bind-mounting {dev}")
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None, "mounting a private /proc")
    except SetupError:  # e.g. inside a container whose /proc has masked entries: an empty /proc is as safe
        _mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555", "hiding /proc")
    _mount_setattr("/", True, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0,
                   "making every mount read-only (mount_setattr needs Linux >= 5.12)")
    _mount_setattr(scratch, False, 0, MOUNT_ATTR_RDONLY, "making the scratch dir writable")
    for dev in DEVICES:
        if os.path.exists(dev):
            _mount_setattr(dev, False, 0, MOUNT_ATTR_NODEV, f"re-enabling {dev}")
    os.chdir(scratch)

def drop_privileges(table):
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:  # stops at the first cap this kernel lacks
        cap += 1
    header = struct.pack("II", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = bytes(24)                            # two empty {effective, permitted, inheritable} words
    hbuf, dbuf = ctypes.create_string_buffer(header, 8), ctypes.create_string_buffer(data, 24)
    _check(_libc.syscall(ctypes.c_long(table["capset"]), hbuf, dbuf), "dropping capabilities")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")

def seccomp_program(table) -> bytes:
    """Classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}."""
    LD_W_ABS, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06
    ins = lambda code, jt, jf, k: struct.pack("HBBI", code, jt, jf, k)
    prog = [ins(LD_W_ABS, 0, 0, 4),                  # A = arch
            ins(JEQ, 1, 0, table["arch"]),
            ins(RET, 0, 0, RET_KILL_PROCESS),
            ins(LD_W_ABS, 0, 0, 0)]                  # A = syscall number
    if "fork" in table:                              # x86_64: the x32 ABI's numbers have bit 30 set
        prog += [ins(JGE, 0, 1, 0x40000000), ins(RET, 0, 0, RET_ERRNO(EPERM))]
    prog += [ins(JEQ, 0, 1, SYS_CLONE3), ins(RET, 0, 0, RET_ERRNO(ENOSYS))]
    for name in DENIED:
        if name in table:
            prog += [ins(JEQ, 0, 1, table[name]), ins(RET, 0, 0, RET_ERRNO(EPERM))]
    prog += [ins(JEQ, 0, 4, table["clone"]),           # clone: only threads (CLONE_THREAD in flags, args[0])
             ins(LD_W_ABS, 0, 0, 16),
             ins(JSET, 0, 1, CLONE_THREAD),
             ins(RET, 0, 0, RET_ALLOW),
             ins(RET, 0, 0, RET_ERRNO(EPERM)),
             ins(RET, 0, 0, RET_ALLOW)]
    return b"".join(prog)

def install_seccomp(table):
    prog = seccomp_program(table)
    filt = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HxxxxxxP", len(prog) // 8, ctypes.addressof(filt))  # struct sock_fprog
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fbuf, 0, 0), "installing the seccomp filter")

def confine(cfg):
    """Kernel mode: returns in the confined process (pid 1 of the sandbox); the launcher never returns."""
    table = SYSCALLS.get(platform.machine())
    if table is None:
        raise SetupError(f"no seccomp table for the {platform.machine()} architecture (x86_64 and aarch64 have one)")
    enter_namespaces()
    pid = os.fork()
    if pid:  # the launcher: wait, then leave the way the sandbox did
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    build_filesystem(cfg)
    drop_privileges(table)
    install_seccomp(table)

def main():
    cfg = json.loads(sys.argv[1])
    with open(cfg["program"], encoding="utf-8") as f:
        code = f.read()
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TMPDIR": cfg["scratch"]})
    try:
        set_limits(cfg)
        if cfg["mode"] == "kernel":
            confine(cfg)
        else:
            os.chdir(cfg["scratch"])
    except (SetupError, OSError, ValueError) as e:
        print(f"picochat-sandbox-setup-failed: {e}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED)
    sys.argv = ["<sandbox>"]
    exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": builtins})

if __name__ == "__main__":
    main()
