"""
The report card. Every stage logs its figures as JSON (machine-readable, not scraped logs) into
get_base_dir()/report/<slug>.json; `picochat report` renders report/report.md with a summary table
and PNG plots, and copies report.md into the current directory.

    picochat report reset       # start a run: clear old sections, record git/hardware/software/cost
    picochat report             # (= generate) render report.md + plots from whatever exists so far

Sections, in pipeline order (use exactly these slugs with log_section):
    tokenizer-training, tokenizer-evaluation, base-training, base-evaluation,
    chat-sft, chat-evaluation-sft, chat-rl, chat-evaluation-rl
Keys the summary table looks for (case, spaces, '-' and '_' ignored; top level or one dict down):
    base-evaluation:      CORE or core_metric (the only BASE entry); a per-task dict under core_per_task / per_task / centered_results / results
    chat-evaluation-*:    ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee, ChatCORE
Plots read checkpoints/<base|sft|rl>/<tag>/metrics.jsonl (rows: step, loss, lr, tok_per_sec, time_s,
optionally val_bpb); the tag is the section's "model_tag" if it logged one, else the newest metrics file.
"""
import os
import re
import json
import math
import platform
import subprocess
import datetime as dt
from pathlib import Path

import torch

from picochat.checkpoint import stage_dir
from picochat.common import get_base_dir, atomic_path, atomic_write_json, atomic_write_text, get_dist_info, logger

SECTIONS = ["tokenizer-training", "tokenizer-evaluation", "base-training", "base-evaluation",
            "chat-sft", "chat-evaluation-sft", "chat-rl", "chat-evaluation-rl"]
TITLES = {"environment": "Environment", "tokenizer-training": "Tokenizer training",
          "tokenizer-evaluation": "Tokenizer evaluation", "base-training": "Base model training",
          "base-evaluation": "Base model evaluation", "chat-sft": "Chat SFT",
          "chat-evaluation-sft": "Chat evaluation (SFT)", "chat-rl": "Chat RL",
          "chat-evaluation-rl": "Chat evaluation (RL)"}
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
METRIC_ALIASES = {"CORE": ["CORE", "core_metric"], "ChatCORE": ["ChatCORE", "chatcore_metric"]}
SUMMARY_COLUMNS = [("BASE", "base-evaluation"), ("SFT", "chat-evaluation-sft"), ("RL", "chat-evaluation-rl")]
PLOT_STAGES = [("base", "base-training"), ("sft", "chat-sft"), ("rl", "chat-rl")]
GPU_HOURLY_USD = [("h100", 3.00), ("a100", 1.79), ("v100", 0.55)]   # per GPU-hour; anything else $2.00
DEFAULT_GPU_HOURLY_USD = 2.00


def report_dir() -> Path:
    return get_base_dir() / "report"

def slugify(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.strip().lower()).strip("-")

def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

def _jsonable(x):
    """Make stage data JSON-safe: tensors/numpy -> Python numbers/lists, paths -> str, NaN/inf -> None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if hasattr(x, "tolist"):   # torch.Tensor, numpy arrays and scalars
        return _jsonable(x.tolist())
    if hasattr(x, "item"):
        return _jsonable(x.item())
    return str(x)

# -----------------------------------------------------------------------------
# writing

def log_section(section: str, data: dict):
    """Write report/<slug>.json atomically; rank 0 only (other ranks return without writing)."""
    if not isinstance(data, dict):
        raise TypeError(f"report.log_section({section!r}, data): data must be a dict, got {type(data).__name__}")
    if get_dist_info()[1] != 0:
        return None
    slug = slugify(section)
    if slug not in SECTIONS and slug != "environment":
        logger.warning(f"report section {section!r} is not one of {SECTIONS}; it will be listed under 'Other'")
    path = report_dir() / f"{slug}.json"
    atomic_write_json(path, {"section": slug, "timestamp": _now(), "data": _jsonable(data)})
    return path

def _run(cmd, cwd):
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None

def git_info() -> dict:
    """Commit and dirty flag of the repo we run in (cwd, else the picochat source tree); {} if none."""
    for cwd in (Path.cwd(), Path(__file__).resolve().parent):
        commit = _run(["git", "rev-parse", "HEAD"], cwd)
        if commit:
            status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd)
            return {"commit": commit, "short": commit[:8], "dirty": bool(status),
                    "branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd),
                    "message": (_run(["git", "log", "-1", "--pretty=%s"], cwd) or "")[:80],
                    "repo": _run(["git", "rev-parse", "--show-toplevel"], cwd)}
    return {}

def hardware_info() -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        info["ram_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        info["ram_gb"] = None
    gpus = []
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append({"name": p.name, "vram_gb": round(p.total_memory / 1e9, 1)})
            info["cuda_version"] = torch.version.cuda
    except Exception as e:  # a broken driver must not stop the run from being reported
        info["gpu_error"] = str(e)
    info["gpus"] = gpus
    info["gpu_count"] = len(gpus)
    info["total_vram_gb"] = round(sum(g["vram_gb"] for g in gpus), 1)
    return info

def hourly_cost(gpus: list) -> dict:
    """Rough cloud price: per-GPU rate by name (H100 $3.00, A100 $1.79, V100 $0.55, other $2.00); CPU $0."""
    total = 0.0
    for g in gpus:
        name = g["name"].lower()
        total += next((usd for key, usd in GPU_HOURLY_USD if key in name), DEFAULT_GPU_HOURLY_USD)
    return {"usd_per_hour": round(total, 2),
            "basis": "per GPU: H100 $3.00, A100 $1.79, V100 $0.55, other $2.00; CPU-only $0"}

def software_info() -> dict:
    info = {"python": platform.python_version()}
    for mod in ("picochat", "torch", "numpy", "tiktoken", "pyarrow", "safetensors"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception:
            info[mod] = None
    return info

def reset():
    """Start a run: delete the old sections, plots and report.md; write the environment section."""
    if get_dist_info()[1] != 0:
        return None
    d = report_dir()
    d.mkdir(parents=True, exist_ok=True)
    for p in list(d.glob("*.json")) + list(d.glob("*.png")) + [d / "report.md"]:
        if p.exists():
            p.unlink()
    hw = hardware_info()
    env = {"run_started": _now(), "git": git_info(), "hardware": hw, "software": software_info(),
           "cost": hourly_cost(hw["gpus"])}
    return log_section("environment", env)

# -----------------------------------------------------------------------------
# reading

def load_sections() -> dict:
    """slug -> {"section", "timestamp", "data"}; unreadable files are reported and skipped."""
    out = {}
    d = report_dir()
    if not d.exists():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(obj, dict) or not isinstance(obj.get("data"), dict):
                raise ValueError("expected {'section', 'timestamp', 'data': {...}}")
            out[p.stem] = obj
        except (ValueError, UnicodeDecodeError) as e:
            logger.warning(f"skipping unreadable report section {p}: {e}")
    return out

def _norm(key) -> str:
    return re.sub(r"[^a-z0-9]", "", str(key).lower())

def find_value(data: dict, names, want=(int, float)):
    """First value under any of `names` (normalized), at the top level, then one dict level down."""
    targets = [_norm(n) for n in names]
    levels = [data] + [v for v in data.values() if isinstance(v, dict)]
    for t in targets:
        for level in levels:
            for k, v in level.items():
                if _norm(k) == t and isinstance(v, want) and not isinstance(v, bool):
                    return v
    return None

def summary_table(sections: dict) -> list:
    """rows: [metric, BASE, SFT, RL] as floats or None."""
    rows = []
    for metric in SUMMARY_METRICS:
        row = [metric]
        for column, slug in SUMMARY_COLUMNS:
            sec = sections.get(slug)
            # BASE shows CORE only: base-eval's per-task dict also has e.g. arc_easy, a different measurement
            if sec is None or (column == "BASE" and metric != "CORE"):
                row.append(None)
            else:
                row.append(find_value(sec["data"], METRIC_ALIASES.get(metric, [metric])))
        rows.append(row)
    return rows

def core_partiality(sections: dict) -> str | None:
    """What makes the base CORE partial (tasks missing, items capped), or None for a full CORE."""
    sec = sections.get("base-evaluation")
    d = sec["data"] if sec else {}
    used, total, cap = d.get("tasks_used"), d.get("tasks_total"), d.get("max_per_task")
    parts = []
    if isinstance(used, int) and isinstance(total, int) and used < total:
        parts.append(f"CORE over {used}/{total} tasks")
    if isinstance(cap, int) and cap > 0:
        parts.append(f"at most {cap} items per task")
    return "partial CORE: " + ", ".join(parts) if parts else None

def core_per_task(sections: dict) -> dict:
    sec = sections.get("base-evaluation")
    if not sec:
        return {}
    d = find_value(sec["data"], ["core_per_task", "per_task", "centered_results", "centered", "results"], want=dict)
    if not d:
        return {}
    return {str(k): float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

def read_metrics(path: Path) -> list:
    """metrics.jsonl rows (bad lines skipped); a resumed run's repeated steps keep the last row."""
    rows = {}
    order = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                continue
            key = (row["step"], "val_bpb" in row and "loss" not in row)
            if key not in rows:
                order.append(key)
            rows[key] = row
    return [rows[k] for k in sorted(order, key=lambda k: (k[0], k[1]))]

def find_metrics_file(stage: str, section) -> Path | None:
    root = stage_dir(stage)
    tag = section["data"].get("model_tag") if section else None
    if isinstance(tag, str) and (root / tag / "metrics.jsonl").exists():
        return root / tag / "metrics.jsonl"
    files = list(root.glob("*/metrics.jsonl")) if root.exists() else []
    return max(files, key=lambda p: p.stat().st_mtime) if files else None

# -----------------------------------------------------------------------------
# plots

def _savefig(fig, path: Path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

def make_plots(sections: dict) -> dict:
    """Write PNGs into report/; returns {title: filename} for the ones that had data."""
    # heavy (about a second to import) and only needed here; the backend must be chosen before pyplot loads
    import matplotlib  # heavy, see above
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, see above

    series = {}   # stage -> rows
    for stage, slug in PLOT_STAGES:
        path = find_metrics_file(stage, sections.get(slug))
        if path is not None:
            rows = read_metrics(path)
            if rows:
                series[f"{stage} ({path.parent.name})"] = rows
    made = {}
    d = report_dir()

    def curve(rows, x, y):
        pts = [(r[x], r[y]) for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    # one row of panels per stage: base and SFT val bpb are measured on different data (pretraining text vs the
    # SFT val mixture), so they never share axes
    for xkey, xlabel, fname in [("step", "step", "loss_vs_step.png"), ("time_s", "wall time (s)", "loss_vs_time.png")]:
        def loss(rows):  # base-train logs "loss", chat-sft and chat-rl "train_loss"
            return curve(rows, xkey, "loss") if curve(rows, xkey, "loss")[0] else curve(rows, xkey, "train_loss")
        stages = [(label, rows) for label, rows in series.items() if loss(rows)[0] or curve(rows, xkey, "val_bpb")[0]]
        if not stages:
            continue
        fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.6 * len(stages)), squeeze=False)
        for (label, rows), (ax1, ax2) in zip(stages, axes):
            xs, ys = loss(rows)
            ax1.plot(xs, ys, linewidth=1)
            xs, ys = curve(rows, xkey, "val_bpb")
            ax2.plot(xs, ys, "o-", markersize=3)
            data = "pretraining val text" if label.startswith("base") else "its own val mixture"
            ax1.set(xlabel=xlabel, ylabel="train loss", title=f"{label}: train loss")
            ax2.set(xlabel=xlabel, ylabel="val bits per byte", title=f"{label}: val bpb on {data} ({len(xs)} evals)")
            for ax in (ax1, ax2):
                ax.grid(alpha=0.3)
        fig.tight_layout()  # (stacked rows: keep a title from covering the x label above it)
        _savefig(fig, d / fname)
        made[f"Loss vs {xlabel}"] = fname
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, rows in series.items():
        xs, ys = curve(rows, "step", "lr")
        if xs:
            ax.plot(xs, ys, label=label)
    if ax.lines:
        ax.set(xlabel="step", ylabel="lr (multiplier or value as logged)", title="learning-rate schedule")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        _savefig(fig, d / "lr_schedule.png")
        made["Learning-rate schedule"] = "lr_schedule.png"
    plt.close(fig)

    tasks = core_per_task(sections)
    if tasks:
        names = list(tasks)
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(names) + 1.2))
        ax.barh(names, [tasks[n] for n in names])
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set(xlabel="centered accuracy", title="CORE per task")
        _savefig(fig, d / "core_per_task.png")
        made["CORE per task"] = "core_per_task.png"
        plt.close(fig)
    return made

# -----------------------------------------------------------------------------
# rendering

def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return str(v)

def _is_table(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(r, dict) for r in v)

def _table(rows: list) -> list:
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) if not isinstance(r.get(c), (dict, list)) else json.dumps(r.get(c))
                                for c in cols) + " |" for r in rows]
    return lines

def render_data(data: dict, indent: int = 0) -> list:
    lines, pad = [], "  " * indent
    for k, v in data.items():
        if isinstance(v, dict) and v:
            lines.append(f"{pad}- {k}:")
            lines += render_data(v, indent + 1)
        elif _is_table(v):
            lines += [f"{pad}- {k}:", ""] + _table(v) + [""]
        elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):  # samples: one per line, whole
            lines.append(f"{pad}- {k}:")
            lines += [f"{pad}  - {json.dumps(x, ensure_ascii=False)}" for x in v]
        elif isinstance(v, list):
            lines.append(f"{pad}- {k}: {json.dumps(v, ensure_ascii=False)}")
        elif isinstance(v, str) and "\n" in v:
            lines += [f"{pad}- {k}:", "", "```", v, "```", ""]
        else:
            lines.append(f"{pad}- {k}: {fmt(v)}")
    return lines

def _parse_ts(s):
    try:
        t = dt.datetime.fromisoformat(s)
        return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)
    except (TypeError, ValueError):
        return None

def render(sections: dict, plots: dict, link_prefix: str = "") -> str:
    lines = ["# picochat training report", "", f"Generated: {_now()}", ""]
    env = sections.get("environment")
    lines += ["## Environment", ""]
    lines += render_data(env["data"]) if env else ["*missing* (run `picochat report reset` at the start of a run)"]
    lines.append("")
    for slug in SECTIONS:
        lines += [f"## {TITLES[slug]}", ""]
        sec = sections.get(slug)
        if sec is None:
            lines += ["*missing* (this stage has not logged a section)", ""]
            continue
        lines += [f"timestamp: {sec.get('timestamp')}", ""] + render_data(sec["data"]) + [""]
    others = [s for s in sections if s not in SECTIONS and s != "environment"]
    for slug in others:
        lines += [f"## Other: {slug}", "", f"timestamp: {sections[slug].get('timestamp')}", ""]
        lines += render_data(sections[slug]["data"]) + [""]

    if plots:
        lines += ["## Plots", ""]
        for title, fname in plots.items():
            lines += [f"### {title}", "", f"![{title}]({link_prefix}{fname})", ""]

    lines += ["## Summary", "", "| Metric | BASE | SFT | RL |", "|---|---|---|---|"]
    partial = core_partiality(sections)
    for r in summary_table(sections):
        cells = [fmt(v) for v in r[1:]]
        if r[0] == "CORE" and partial and r[1] is not None:
            cells[0] += " (partial*)"
        lines.append("| " + " | ".join([r[0]] + cells) + " |")
    if partial:
        lines += ["", f"\\* {partial}: not comparable with a full CORE score."]
    lines.append("")
    start = _parse_ts(env["data"].get("run_started")) if env else None
    stamps = [_parse_ts(s.get("timestamp")) for k, s in sections.items() if k != "environment"]
    stamps = [t for t in stamps if t is not None]
    if start and stamps:
        secs = max(0, int((max(stamps) - start).total_seconds()))
        lines.append(f"Total wall clock time: {secs // 3600}h{(secs % 3600) // 60:02d}m "
                     f"(from `report reset` to the last logged section)")
    else:
        lines.append("Total wall clock time: unknown (no reset timestamp or no stage sections)")
    return "\n".join(lines) + "\n"

def generate(copy_to_cwd: bool = True) -> Path:
    """Render report/report.md (+ PNGs) from the section JSONs; also copy it to ./report.md."""
    sections = load_sections()
    try:
        plots = make_plots(sections)
    except Exception as e:  # a plotting problem must never cost the user the report itself
        logger.warning(f"report plots failed ({type(e).__name__}: {e}); writing report.md without them")
        plots = {}
    path = report_dir() / "report.md"
    atomic_write_text(path, render(sections, plots))
    if copy_to_cwd:
        dest = Path.cwd() / "report.md"
        if dest.resolve() != path.resolve():
            try:  # same report; plot links point back into the report directory
                atomic_write_text(dest, render(sections, plots, link_prefix=report_dir().as_posix() + "/"))
            except OSError as e:
                logger.warning(f"could not copy report.md to {dest}: {e}")
    return path
