"""
Scaling sweeps: collect one finished base-train run into a results CSV, and turn the CSV into plots.

The sweep scripts (runs/scaling_laws.sh, runs/miniseries.sh) call `collect` after each run. Figures come
from machine-readable outputs only: the checkpoint's meta JSON (config, horizon, batch, val bpb, training
time), its metrics.jsonl (the final CORE), and the parameter counts of the model rebuilt on the meta
device from the checkpoint's config (no weights are loaded).

    python bench/scaling_plot.py has CSV --key flops_budget=1e18 --key depth=12        # exit 0 if the row exists
    python bench/scaling_plot.py collect scaling CSV --model-tag sl_d12_1e18 --flops-budget 1e18
    python bench/scaling_plot.py collect miniseries CSV --model-tag mini_d12
    python bench/scaling_plot.py plot scaling CSV --out-dir plots/      # bpb vs FLOPs per depth + frontier
    python bench/scaling_plot.py plot miniseries CSV --out-dir plots/   # bpb and CORE vs depth

The compute-optimal frontier: for each FLOPs budget C, the run with the lowest val bpb; where that depth is
an interior point of the budget's sweep, the optimum is refined by a parabola through (log N, bpb) of it and
its two neighbours (the isoFLOP method, Chinchilla approach 2). A least-squares line through
(log C, log N_opt) gives N_opt = k * C^a (and tokens D_opt = C / (6 N_opt) ~ C^(1-a)), printed in the
human table and in the final JSON line.
N = params_transformer + params_lm_head (the scaling-params count base-train uses for its horizon).
"""
import sys
import csv
import json
import math
import argparse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCALING_COLUMNS = ["flops_budget", "depth", "model_dim", "params_wte", "params_value_embeds", "params_lm_head",
                   "params_transformer", "params_scalars", "params_total", "num_iterations", "tokens_trained",
                   "val_bpb", "core_score", "train_time_sec"]
MINISERIES_COLUMNS = ["depth", "model_dim", "num_params", "num_scaling_params", "num_iterations",
                      "tokens_trained", "param_data_ratio", "val_bpb", "core_score", "train_time_sec"]
COLUMNS = {"scaling": SCALING_COLUMNS, "miniseries": MINISERIES_COLUMNS}

# -----------------------------------------------------------------------------
# CSV helpers

def read_rows(path, kind=None) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames or []
    if kind is not None:
        missing = [c for c in COLUMNS[kind] if c not in header]
        if missing:
            raise SystemExit(f"error: {path} is not a {kind} results CSV: missing column(s) {', '.join(missing)} "
                             f"(expected {','.join(COLUMNS[kind])})")
    return rows


def _same(a, b) -> bool:
    """CSV cells compare as numbers when both parse (1e18 == 1000000000000000000.0)."""
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


def has_row(path, keys: dict) -> bool:
    return any(all(_same(r.get(k), v) for k, v in keys.items()) for r in read_rows(path))


def append_row(path, columns, row: dict):
    """Rewrite the CSV with the row appended (atomic: a crash never leaves a half-written results file)."""
    from picochat.common import atomic_path
    path = Path(path)
    rows = read_rows(path)
    rows.append({c: row.get(c, "") for c in columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def _num(x):
    try:
        v = float(x)
        return v if math.isfinite(v) else None
    except (TypeError, ValueError):
        return None

# -----------------------------------------------------------------------------
# collect

def run_figures(model_tag: str, step=None) -> dict:
    """Everything the CSVs need about one finished base-train run, from its checkpoint directory."""
    import torch
    from picochat import checkpoint as ckpt
    from picochat.gpt import GPT, GPTConfig
    from picochat.run_record import RunRecord
    ckpt_dir = ckpt.checkpoint_dir("base", model_tag)
    step = ckpt.find_last_step(ckpt_dir) if step is None else step
    if step is None:
        raise SystemExit(f"error: no complete checkpoint in {ckpt_dir}; did base-train finish? "
                         f"(the sweep scripts must not pass --save-every -1 without the final save)")
    meta = ckpt.read_meta(ckpt_dir, step)
    run = RunRecord.from_meta(meta, f"{ckpt_dir} step {step}")
    config = GPTConfig.from_dict(meta["model_config"])
    with torch.device("meta"):
        params = GPT(config).num_scaling_params()
    num_iterations = run.num_iterations if run.num_iterations > 0 else step
    tokens = run.derived.get("total_tokens") or run.total_batch_size * num_iterations
    # CORE: the last row of metrics.jsonl carries the final evaluations (base-train --core-metric-every)
    core = None
    for row in ckpt.read_metrics(ckpt_dir):
        if row.get("core_metric") is not None:
            core = row["core_metric"]
    scaling = params["transformer_matrices"] + params["lm_head"]
    return {"step": step, "depth": config.n_layer, "model_dim": config.n_embd, "params": params,
            "scaling_params": scaling, "num_iterations": num_iterations, "tokens_trained": tokens,
            "val_bpb": run.loop.get("val_bpb"), "core_score": core,
            "train_time_sec": run.loop.get("total_training_time")}


def base_eval_core(model_tag: str, step: int):
    """CORE from base-eval's CSV ($PICOCHAT_HOME/base_eval/<tag>_<step>.csv, last row CORE), if it exists."""
    from picochat.common import get_base_dir
    path = get_base_dir() / "base_eval" / f"{model_tag}_{step:06d}.csv"
    if not path.exists():
        return None
    with path.open() as f:
        for cells in csv.reader(f):
            if cells and cells[0].strip() == "CORE":
                return _num(cells[-1])
    return None


def collect(kind: str, csv_path, model_tag: str, flops_budget=None, train_time_sec=None):
    fig = run_figures(model_tag)
    core = fig["core_score"] if fig["core_score"] is not None else base_eval_core(model_tag, fig["step"])
    p = fig["params"]
    common = {"depth": fig["depth"], "model_dim": fig["model_dim"], "num_iterations": fig["num_iterations"],
              "tokens_trained": fig["tokens_trained"], "val_bpb": fig["val_bpb"],
              "core_score": "" if core is None else core,
              "train_time_sec": train_time_sec if train_time_sec is not None else fig["train_time_sec"]}
    if kind == "scaling":
        row = {**common, "flops_budget": flops_budget, "params_wte": p["wte"],
               "params_value_embeds": p["value_embeds"], "params_lm_head": p["lm_head"],
               "params_transformer": p["transformer_matrices"], "params_scalars": p["scalars"],
               "params_total": p["total"]}
    else:
        ratio = fig["tokens_trained"] / fig["scaling_params"] if fig["tokens_trained"] else ""
        row = {**common, "num_params": p["total"], "num_scaling_params": fig["scaling_params"],
               "param_data_ratio": ratio}
    append_row(csv_path, COLUMNS[kind], row)
    print(json.dumps(row))
    return row

# -----------------------------------------------------------------------------
# frontier and power-law fit

def scaling_n(row) -> float:
    return float(row["params_transformer"]) + float(row["params_lm_head"])


def frontier(rows: list[dict]) -> list[dict]:
    """Per FLOPs budget: the best run, plus the parabola-refined optimum N when the best is interior."""
    by_budget = {}
    for r in rows:
        if _num(r["val_bpb"]) is None:
            continue
        by_budget.setdefault(float(r["flops_budget"]), []).append(r)
    out = []
    for C in sorted(by_budget):
        runs = sorted(by_budget[C], key=scaling_n)
        i = min(range(len(runs)), key=lambda j: float(runs[j]["val_bpb"]))
        best = runs[i]
        n_opt, refined = scaling_n(best), False
        if 0 < i < len(runs) - 1:
            xs = [math.log(scaling_n(runs[j])) for j in (i - 1, i, i + 1)]
            ys = [float(runs[j]["val_bpb"]) for j in (i - 1, i, i + 1)]
            vertex = _parabola_vertex(xs, ys)
            if vertex is not None and xs[0] <= vertex <= xs[2]:
                n_opt, refined = math.exp(vertex), True
        out.append({"flops_budget": C, "depth": int(float(best["depth"])), "params": scaling_n(best),
                    "val_bpb": float(best["val_bpb"]), "n_opt": n_opt, "refined": refined,
                    "tokens_opt": C / (6 * n_opt)})
    return out


def _parabola_vertex(xs, ys):
    """x of the vertex of the parabola through three points (None if it opens downward / is degenerate)."""
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    if denom == 0:
        return None
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if a <= 0:
        return None
    return -b / (2 * a)


def fit_power_law(xs, ys):
    """Least squares of log y = a log x + log k -> (a, k); None with fewer than 2 distinct x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    n = len(lx)
    if n < 2 or max(lx) == min(lx):
        return None
    mx, my = sum(lx) / n, sum(ly) / n
    a = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sum((x - mx) ** 2 for x in lx)
    return a, math.exp(my - a * mx)

# -----------------------------------------------------------------------------
# plots

def _plot_setup(csv_path, kind, out_dir):
    """(rows, out_dir, pyplot) for a plot of a results CSV."""
    rows = read_rows(csv_path, kind)
    if not rows:
        raise SystemExit(f"error: {csv_path} has no rows")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    import matplotlib  # heavy, and only the plot commands need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, see above
    return rows, Path(out_dir), plt


def plot_scaling(csv_path, out_dir) -> dict:
    rows, out_dir, plt = _plot_setup(csv_path, "scaling", out_dir)
    depths = sorted({int(float(r["depth"])) for r in rows})
    cmap = plt.get_cmap("viridis")

    # val bpb vs FLOPs, one line per depth
    fig, ax = plt.subplots(figsize=(7, 5))
    for k, d in enumerate(depths):
        pts = sorted((float(r["flops_budget"]), float(r["val_bpb"])) for r in rows
                     if int(float(r["depth"])) == d and _num(r["val_bpb"]) is not None)
        if pts:
            ax.plot(*zip(*pts), "o-", color=cmap(k / max(1, len(depths) - 1)), label=f"d{d}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("val bpb")
    ax.set_title("val bpb vs FLOPs per depth")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "scaling_bpb_vs_flops.png", dpi=120)
    plt.close(fig)

    # isoFLOP curves (bpb vs N per budget) and the frontier N_opt vs C with its power-law fit
    front = frontier(rows)
    fit = fit_power_law([f["flops_budget"] for f in front], [f["n_opt"] for f in front])
    fit_d = fit_power_law([f["flops_budget"] for f in front], [f["tokens_opt"] for f in front])
    budgets = sorted({float(r["flops_budget"]) for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    for k, C in enumerate(budgets):
        pts = sorted((scaling_n(r), float(r["val_bpb"])) for r in rows
                     if float(r["flops_budget"]) == C and _num(r["val_bpb"]) is not None)
        ax1.plot(*zip(*pts), "o-", color=cmap(k / max(1, len(budgets) - 1)), label=f"{C:.3g} FLOPs")
    for f in front:
        ax1.plot(f["params"], f["val_bpb"], "r*", markersize=12)
    ax1.set_xscale("log")
    ax1.set_xlabel("scaling params N (transformer matrices + lm_head)")
    ax1.set_ylabel("val bpb")
    ax1.set_title("isoFLOP curves (red star: best run)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot([f["flops_budget"] for f in front], [f["n_opt"] for f in front], "ko", label="N_opt")
    if fit is not None:
        a, k = fit
        cs = [budgets[0], budgets[-1]]
        ax2.plot(cs, [k * c ** a for c in cs], "r-", label=f"N_opt = {k:.3g} C^{a:.3f}")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("training FLOPs C")
    ax2.set_ylabel("compute-optimal N")
    ax2.set_title("compute-optimal frontier")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out_dir / "scaling_frontier.png", dpi=120)
    plt.close(fig)

    print(f"{'FLOPs':>10} {'best depth':>10} {'N (best)':>12} {'N_opt':>12} {'D_opt':>12} {'val bpb':>8}")
    for f in front:
        print(f"{f['flops_budget']:>10.3g} {'d' + str(f['depth']):>10} {f['params']:>12.4g} {f['n_opt']:>12.4g} "
              f"{f['tokens_opt']:>12.4g} {f['val_bpb']:>8.4f}" + ("" if f["refined"] else "  (edge: not refined)"))
    summary = {"n_opt_exponent": None, "n_opt_coef": None, "tokens_opt_exponent": None, "frontier": front,
               "plots": [str(out_dir / "scaling_bpb_vs_flops.png"), str(out_dir / "scaling_frontier.png")]}
    if fit is not None:
        summary.update(n_opt_exponent=fit[0], n_opt_coef=fit[1], tokens_opt_exponent=fit_d[0])
        print(f"fit: N_opt = {fit[1]:.4g} * C^{fit[0]:.4f};  D_opt ~ C^{fit_d[0]:.4f}  "
              f"(Chinchilla: both ~0.5)")
    else:
        print("fit: needs at least 2 FLOPs budgets")
    print(json.dumps(summary))
    return summary


def plot_miniseries(csv_path, out_dir) -> dict:
    rows, out_dir, plt = _plot_setup(csv_path, "miniseries", out_dir)
    rows = sorted(rows, key=lambda r: float(r["depth"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    pts = [(float(r["depth"]), _num(r["val_bpb"])) for r in rows if _num(r["val_bpb"]) is not None]
    ax1.plot(*zip(*pts), "o-")
    ax1.set_xlabel("depth")
    ax1.set_ylabel("val bpb")
    ax1.set_title("val bpb vs depth")
    ax1.grid(alpha=0.3)
    cpts = [(float(r["depth"]), _num(r["core_score"])) for r in rows if _num(r["core_score"]) is not None]
    if cpts:
        ax2.plot(*zip(*cpts), "o-", color="tab:green")
    ax2.axhline(0.256525, color="r", ls="--", lw=1, label="GPT-2 (0.2565)")
    ax2.set_xlabel("depth")
    ax2.set_ylabel("CORE")
    ax2.set_title("CORE vs depth")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "miniseries.png", dpi=120)
    plt.close(fig)
    print(f"{'depth':>6} {'params':>12} {'tokens':>12} {'ratio':>7} {'val bpb':>8} {'CORE':>7} {'time s':>8}")
    for r in rows:
        core, ratio, t = _num(r["core_score"]), _num(r["param_data_ratio"]), _num(r["train_time_sec"])
        print(f"{'d' + str(int(float(r['depth']))):>6} {float(r['num_params']):>12.4g} "
              f"{float(r['tokens_trained']):>12.4g} {'' if ratio is None else f'{ratio:.2f}':>7} "
              f"{float(r['val_bpb']):>8.4f} {'' if core is None else f'{core:.4f}':>7} "
              f"{'' if t is None else f'{t:.0f}':>8}")
    summary = {"plots": [str(out_dir / "miniseries.png")], "rows": len(rows)}
    print(json.dumps(summary))
    return summary

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(prog="scaling_plot.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("has", help="exit 0 if the CSV has a row matching every --key col=value")
    h.add_argument("csv")
    h.add_argument("--key", action="append", default=[], help="col=value (numbers compare numerically)")
    c = sub.add_parser("collect", help="append one finished base-train run to a results CSV")
    c.add_argument("kind", choices=sorted(COLUMNS))
    c.add_argument("csv")
    c.add_argument("--model-tag", required=True, help="checkpoints/base/<tag> of the run")
    c.add_argument("--flops-budget", default=None, help="the run's --target-flops (scaling only)")
    c.add_argument("--train-time-sec", type=float, default=None,
                   help="override the training time (default: the checkpoint's total_training_time)")
    pl = sub.add_parser("plot", help="PNG plots (+ frontier fit for scaling) from a results CSV")
    pl.add_argument("kind", choices=sorted(COLUMNS))
    pl.add_argument("csv")
    pl.add_argument("--out-dir", default=None, help="default: the CSV's directory")
    args = p.parse_args(argv)

    if args.cmd == "has":
        keys = {}
        for kv in args.key:
            if "=" not in kv:
                p.error(f"--key wants col=value, got {kv!r}")
            k, v = kv.split("=", 1)
            keys[k] = v
        return 0 if has_row(args.csv, keys) else 1
    if args.cmd == "collect":
        if args.kind == "scaling" and args.flops_budget is None:
            p.error("collect scaling needs --flops-budget")
        collect(args.kind, args.csv, args.model_tag, args.flops_budget, args.train_time_sec)
        return 0
    out_dir = args.out_dir or str(Path(args.csv).resolve().parent)
    (plot_scaling if args.kind == "scaling" else plot_miniseries)(args.csv, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
