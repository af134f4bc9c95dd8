"""
Shared runtime: artifact paths, device and dtype, distributed init, rank-0 printing,
atomic file writes, and the peak FLOPs / bandwidth tables used for MFU and MBU.
Everything else in picochat imports from here; this module imports nothing of ours.
"""
import os
import sys
import json
import time
import argparse
import logging
import hashlib
import platform
import resource
import tempfile
import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Paths

def get_base_dir() -> Path:
    """Artifact root: $PICOCHAT_HOME, default ~/.cache/picochat. Created on demand."""
    base = os.environ.get("PICOCHAT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "picochat")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path

_UMASK = os.umask(0)
os.umask(_UMASK)

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it is renamed over `path`.
    A crash mid-write leaves at most a stray temp file, never a half-written `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files get the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (checkpoints and shards are GBs)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

def atomic_write_text(path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")

def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

# -----------------------------------------------------------------------------
# Logging

class _ColorFormatter(logging.Formatter):
    COLORS = {"WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[1;31m"}
    def format(self, record):
        msg = super().format(record)
        color = self.COLORS.get(record.levelname)
        if color and sys.stderr.isatty():
            msg = f"{color}{msg}\033[0m"
        return msg

def setup_logging(level=logging.INFO):
    handler = logging.StreamHandler()
    handler.setFormatter(_ColorFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("picochat")
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return root

logger = setup_logging()

def get_dist_info():
    """(is_distributed, rank, local_rank, world_size) from torchrun's environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1

def is_master() -> bool:
    return get_dist_info()[1] == 0

def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)

def warn0(msg: str):
    if is_master():
        logger.warning(msg)

# -----------------------------------------------------------------------------
# Command-line helpers shared by the stages

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every stage's --help: the module docstring's layout kept, and each flag's default shown unless its help
    already says what the default is (a device-sized or derived one)."""
    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"

def positive_int(text: str) -> int:
    """argparse type for sizes (depth, sequence length, batch rows): a clear usage error instead of a
    ZeroDivisionError deep inside the run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value

# -----------------------------------------------------------------------------
# Device and precision

DEVICE_TYPES = ("cuda", "cpu", "mps")

def check_device_type(device_type: str) -> str:
    """device_type itself, or a ValueError naming the problem and the fix (before any work starts)."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"--device-type {device_type!r} is not one of {', '.join(DEVICE_TYPES)} "
                         "(or leave it empty to autodetect)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device-type cuda was requested but torch.cuda.is_available() is False. "
                         "Install a CUDA build of torch or pass --device-type cpu.")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device-type mps was requested but MPS is not available. Pass --device-type cpu.")
    return device_type

def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}

def cpu_bf16_instructions() -> str:
    """The native bf16 matrix instructions this CPU has ('' if none): AMX tiles or AVX512-BF16 on x86 (torch's own
    cpuinfo probe), the ARMv8.6 BF16 extension on aarch64 (the kernel's feature flags)."""
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx_bf16"
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("features") and " bf16" in f" {line.split(':', 1)[-1]} ":
                    return "arm_bf16"
    except OSError:
        pass
    return ""

def probe_bf16_matmul_speedup(n: int = 512, seconds: float = 0.15) -> float:
    """bf16 / fp32 matmul throughput on this CPU, timed alternately for about 2 x `seconds` (well under a second):
    the instruction flag says the hardware can, this says torch's kernels actually do."""
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    a16 @ b16, a32 @ b32  # first calls pay for kernel selection / packing
    deadline = time.perf_counter() + 2 * seconds
    while time.perf_counter() < deadline:
        for dt, (a, b) in ((torch.float32, (a32, b32)), (torch.bfloat16, (a16, b16))):
            t0 = time.perf_counter()
            a @ b
            best[dt] = min(best[dt], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]

BF16_MIN_SPEEDUP = 1.3  # below this bf16 buys too little on CPU to be worth its coarser rounding

_DTYPE_DECISIONS = {}  # device_type -> (dtype, why), decided once per process

def compute_dtype_decision(device_type: str) -> tuple[torch.dtype, str]:
    """(the ONE compute dtype for activations, why). Master weights always stay fp32.
    - PICOCHAT_DTYPE, when set, decides (e.g. bf16 on MPS to save memory, fp16 + GradScaler on V100/T4);
    - CUDA: bf16 on SM80+ (native bf16 tensor cores), fp32 before;
    - CPU: bf16 when the CPU has native bf16 matrix instructions AND a short probe shows torch's bf16 matmul
      clearly faster than fp32 (without the instructions bf16 is emulated: ~20x SLOWER measured on Zen 3);
    - MPS and anything else: fp32."""
    override = os.environ.get("PICOCHAT_DTYPE")
    if override:
        if override not in _DTYPES:
            raise ValueError(f"PICOCHAT_DTYPE={override!r} is not one of {sorted(set(_DTYPES))}")
        return _DTYPES[override], f"PICOCHAT_DTYPE={override}"
    if device_type not in _DTYPE_DECISIONS:
        _DTYPE_DECISIONS[device_type] = _decide_dtype(device_type)
    return _DTYPE_DECISIONS[device_type]

def _decide_dtype(device_type: str) -> tuple[torch.dtype, str]:
    if device_type == "cuda":
        if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
            return torch.bfloat16, "CUDA SM80+ has bf16 tensor cores"
        return torch.float32, "this CUDA GPU predates SM80 (no fast bf16)"
    if device_type != "cpu":
        return torch.float32, f"{device_type}: fp32 unless PICOCHAT_DTYPE says otherwise"
    isa = cpu_bf16_instructions()
    if not isa:
        return torch.float32, "this CPU has no native bf16 matrix instructions (bf16 would be emulated, far slower)"
    speedup = probe_bf16_matmul_speedup()
    if speedup < BF16_MIN_SPEEDUP:
        return torch.float32, (f"the CPU has {isa} but a bf16 matmul ran only {speedup:.2f}x fp32 here "
                               f"(< {BF16_MIN_SPEEDUP}x)")
    return torch.bfloat16, f"the CPU has {isa} and a bf16 matmul ran {speedup:.1f}x fp32 here"

def compute_dtype_for(device_type: str) -> torch.dtype:
    """The compute dtype alone (see compute_dtype_decision for the rule and the reason)."""
    return compute_dtype_decision(device_type)[0]

def fill_sized_defaults(args, device_type: str, table: dict) -> list[str]:
    """Defaults sized for the device. `table` maps an argparse dest to (GPU value, CPU/MPS value); every arg
    still None gets the figure for this device. The GPU recipe's figures (e.g. 40 x 524,288 eval tokens) take
    hours on a CPU, so CPU and MPS get small ones; a flag the user passed is kept. Returns lines saying what
    was chosen (stages print them)."""
    small = device_type != "cuda"
    chosen = []
    for dest, (gpu_value, small_value) in table.items():
        if getattr(args, dest) is None:
            setattr(args, dest, small_value if small else gpu_value)
            if small and small_value != gpu_value:
                chosen.append(f"--{dest.replace('_', '-')} {small_value} (sized for {device_type}; GPU default {gpu_value})")
    return chosen

LONG_RUN_S = 3600  # off CUDA, a stage whose default horizon would run longer than this says so

def long_run_notice(device_type: str, steps_left: float, step_s: float, how_to_shorten: str) -> str:
    """'' or a one-line notice that the run will take long, measured from its first steps: defaults made for a
    GPU node can take hours on a CPU, and a user should learn that after seconds, not after hours."""
    total = steps_left * step_s
    if device_type == "cuda" or total < LONG_RUN_S:
        return ""
    return (f"this run will take ~{total / 3600:.1f} h on {device_type} ({steps_left:,.0f} more steps at "
            f"{step_s:.2f} s/step, evaluations not counted); {how_to_shorten} for a shorter run")

@dataclass
class Runtime:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    device_type: str
    dtype: torch.dtype
    dtype_reason: str = ""

    @property
    def master(self) -> bool:
        return self.rank == 0

def compute_init(device_type: str = "", seed: int = 42) -> Runtime:
    """Pick the device, seed, and join the process group if torchrun launched us.
    NCCL on CUDA, gloo elsewhere, so multi-process runs work (and are tested) on CPU."""
    device_type = check_device_type(device_type or autodetect_device_type())
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(seed)
        torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls
    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank if ddp else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp and world_size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        dist.barrier()
    dtype, why = compute_dtype_decision(device_type)
    if ddp and world_size > 1:
        # the CPU rule includes a timing probe: every rank takes rank 0's answer so all compute alike
        choices = [torch.float32, torch.bfloat16, torch.float16]
        code = torch.tensor([choices.index(dtype)], device=device)
        dist.broadcast(code, 0)
        if choices[int(code)] != dtype:
            dtype, why = choices[int(code)], f"rank 0's decision ({why} here)"
    return Runtime(ddp and world_size > 1, rank, local_rank, world_size, device, device_type, dtype, why)

def dist_active() -> bool:
    """Whether a process group is up (torchrun), i.e. whether collectives have anyone to talk to."""
    return dist.is_available() and dist.is_initialized()

def rank_world() -> tuple:
    """(rank, world size) of the process group, (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist_active() else (0, 1)

def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce over the ranks (a no-op in a single process); returns t."""
    if dist_active():
        dist.all_reduce(t, op=op)
    return t

def compute_cleanup():
    if dist_active():
        # every rank reaches the end before any tears its connections down: a rank that leaves first can abort a
        # peer's gloo threads mid-teardown ("terminate called without an active exception", SIGABRT)
        dist.barrier()
        dist.destroy_process_group()

def barrier():
    if dist_active():
        dist.barrier()

def all_gather_json(value) -> list:
    """[rank 0's value, rank 1's, ...] for any JSON value; collective (every rank calls it). The values travel
    as JSON bytes in tensors (on the GPU under NCCL), never as pickles."""
    if not dist_active():
        return [value]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.tensor(list(json.dumps(value).encode("utf-8")), dtype=torch.uint8, device=device)
    world = dist.get_world_size()
    n = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    padded = torch.zeros(max(1, int(max(s.item() for s in sizes))), dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [json.loads(bytes(o[:int(s.item())].cpu().tolist()).decode("utf-8")) for o, s in zip(out, sizes)]

def process_start_time() -> float:
    """Wall-clock time this process started (Linux: from /proc, so interpreter and torch start-up count too);
    elsewhere the time this module was imported, which is close."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        btime = next(int(l.split()[1]) for l in open("/proc/stat") if l.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORT_TIME

_IMPORT_TIME = __import__("time").time()

def synchronize(device_type: str):
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()

def max_memory_allocated(device_type: str) -> int:
    """Peak bytes: the CUDA caching allocator's peak on CUDA, else the process's peak resident set size."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    except OSError:
        return 0

def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    if device_type == "mps":
        return "Apple MPS"
    return platform.processor() or platform.machine() or "cpu"

# -----------------------------------------------------------------------------
# Peak tables (dense bf16 FLOP/s; HBM bytes/s). Matched by substring, first hit wins,
# so the more specific names come first. Unknown devices return None: MFU is then
# reported as unknown rather than as a wrong number.

_PEAK_FLOPS = [
    ("gb200", 2.5e15), ("grace blackwell", 2.5e15), ("b200", 2.25e15), ("b100", 1.8e15),
    ("h200 nvl", 836e12), ("h200 pcie", 836e12), ("h200", 989e12),
    ("h100 nvl", 835e12), ("h100 pcie", 756e12), ("h100", 989e12),
    ("h800 nvl", 989e12), ("h800", 756e12),
    ("a100", 312e12), ("a800", 312e12), ("a40", 149.7e12), ("a30", 165e12),
    ("l40s", 362e12), ("l4", 121e12),
    ("mi355", 2.5e15), ("mi325", 1.3074e15), ("mi300x", 1.3074e15), ("mi300a", 980.6e12),
    ("mi250x", 383e12), ("mi250", 362.1e12),
    ("5090", 209.5e12), ("4090", 165.2e12), ("3090", 71e12),
]

_PEAK_BANDWIDTH = [
    ("gb200", 8.0e12), ("b200", 8.0e12), ("b100", 8.0e12), ("h200", 4.8e12),
    ("h100 nvl", 3.9e12), ("h100 pcie", 2.0e12), ("h100", 3.35e12),
    ("h800 pcie", 2.0e12), ("h800", 3.35e12), ("a100", 2.0e12), ("a800", 2.0e12),
    ("a40", 696e9), ("a30", 933e9), ("l40s", 864e9), ("l4", 300e9),
    ("mi355", 8e12), ("mi325", 6e12), ("mi300x", 5.3e12), ("mi300a", 5.3e12), ("mi250", 3.28e12),
    ("5090", 1.79e12), ("4090", 1.01e12), ("3090", 936e9),
]

def _lookup(table, name):
    name = name.lower()
    if "data center gpu max 1550" in name and table is _PEAK_FLOPS:
        cus = torch.xpu.get_device_properties().max_compute_units if hasattr(torch, "xpu") else 0
        return 512 * cus * 1300e6 if cus else None
    for key, value in table:
        if key in name:
            return value
    return None

def get_peak_flops(name: str):
    """Dense bf16 peak FLOP/s for a device name, or None when unknown."""
    return _lookup(_PEAK_FLOPS, name)

def get_peak_bandwidth(name: str):
    """Peak memory bandwidth in bytes/s for a device name, or None when unknown."""
    return _lookup(_PEAK_BANDWIDTH, name)

def measure_cpu_matmul_peak(n: int = 1024, iters: int = 10, dtype=torch.float32, max_seconds: float = 2.0) -> float:
    """Measured matmul FLOP/s on this CPU in `dtype` (fp32 by default): the honest 'peak' for CPU MFU, taken
    in the dtype the run computes in (bf16 and fp32 peaks differ 3-4x on CPUs with native bf16). Stops early
    after max_seconds (an emulated bf16 matmul of this size takes seconds)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, deadline = float("inf"), time.perf_counter() + max_seconds
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
        if t0 > deadline:
            break
    return 2 * n ** 3 / best

def format_mfu(mfu) -> str:
    return "unknown" if mfu is None else f"{mfu:.2f}%"

# -----------------------------------------------------------------------------

class DummyWandb:
    """Stands in for wandb when it is not installed or no run name was given."""
    def log(self, *args, **kwargs):
        pass
    def finish(self):
        pass

def init_wandb(project: str, run: str, config: dict, master: bool):
    """wandb only when installed AND a run name other than 'dummy' is given; never required."""
    if not master or not run or run == "dummy":
        return DummyWandb()
    try:
        import wandb  # optional: only runs that ask for wandb need it installed
    except ImportError:
        logger.warning("--run was given but wandb is not installed; logging to metrics.jsonl only")
        return DummyWandb()
    return wandb.init(project=project, name=run, config=config)
