"""`python -m vall_e.plot yaml=... [--xs tokens_processed] [--ys loss stats.acc ...] [--out PATH]`

Plots every run's `logs/*/metrics.jsonl` into `metrics.png` beside the YAML (one panel per y, one
smoothed line per run and metric), as the reference's plot script did from its log.txt files.

The reference's metric names are understood: `engine_step`/`it` -> `step`, `stats.acc` -> the AR and
NAR accuracies (`ar.acc`, `nar.acc`), `loss.nll` -> `nll`, `elapsed_time` -> `elapsed`, and a leading
`{model name}.` is dropped when the run has no such key.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

from vall_e.config import parse_config
from vall_e.training.engines.metrics_log import iter_metrics
from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_path

ALIASES: dict[str, list[str]] = {
    "engine_step": ["step"], "it": ["step"], "global_step": ["step"], "iteration": ["step"],
    "stats.acc": ["acc", "ar.acc", "nar.acc"],
    "stats.acc10": ["acc10", "ar.acc10", "nar.acc10"],
    "loss.nll": ["nll"],
    "elapsed_time": ["elapsed"],
    "samples": ["samples_processed"], "tokens": ["tokens_processed"],
    "acc": ["acc", "ar.acc", "nar.acc"],
}


def resolve(name: str, keys: set[str]) -> list[str]:
    """The keys of a run that `name` (ours or the reference's) refers to."""
    if name in keys:
        return [name]
    found = [k for k in ALIASES.get(name, []) if k in keys]
    if found:
        return found
    if "." in name:  # the reference prefixed every metric with its model name: "ar+nar.loss"
        head, rest = name.split(".", 1)
        if head in ("ar+nar", "ar", "nar", "ar-nar") or head.startswith(("ar+nar", "ar-", "nar-")):
            return resolve(rest, keys)
    return []


def load_runs(log_dir: Path, filename: str = "metrics.jsonl") -> dict[str, list[dict[str, Any]]]:
    """{run name: records} for every `filename` under `log_dir` (recursively)."""
    runs = {}
    for path in sorted(Path(log_dir).rglob(filename)):
        recs = list(iter_metrics(path))
        if recs:
            runs[str(path.parent.relative_to(log_dir)) or path.parent.name] = recs
    return runs


def ema(values: Sequence[float], com: float = 10.0) -> list[float]:
    """Exponential moving average like pandas' `ewm(com=com).mean()` (adjust=True)."""
    if com <= 0:
        return list(values)
    decay = 1.0 - 1.0 / (1.0 + com)
    num = den = 0.0
    out = []
    for v in values:
        num = v + decay * num
        den = 1.0 + decay * den
        out.append(num / den)
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def plot(runs: dict[str, list[dict[str, Any]]], out: Path, xs: str = "step", ys: Sequence[str] = ("loss",),
         min_x: float | None = None, max_x: float | None = None, smooth: float = 10.0) -> Path:
    """Draw and atomically write the PNG. UserError when nothing asked for exists."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: list[tuple[str, str, list[tuple[float, float]]]] = []  # (y, label, points)
    for y in ys:
        for run, recs in runs.items():
            keys = set().union(*(r.keys() for r in recs))
            x_keys = resolve(xs, keys)
            if not x_keys:
                continue
            xk = x_keys[0]
            for yk in resolve(y, keys):
                pts = []
                for r in recs:
                    xv, yv = _number(r.get(xk)), _number(r.get(yk))
                    if xv is None or yv is None:
                        continue
                    if (min_x is not None and xv < min_x) or (max_x is not None and xv > max_x):
                        continue
                    pts.append((xv, yv))
                if pts:
                    label = f"{run}: {yk}" if len(runs) > 1 or yk != y else yk
                    series.append((y, label, sorted(pts)))
    if not series:
        available = sorted(set().union(*(set(r.keys()) for recs in runs.values() for r in recs)) if runs else set())
        raise UserError(f"nothing to plot: no run has {xs!r} together with any of {', '.join(ys)} "
                        f"(available: {', '.join(available) or 'none'})")
    panels = [y for y in ys if any(s[0] == y for s in series)]
    fig = Figure(figsize=(10, 3.2 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    for ax, y in zip(axes, panels):
        for _, label, pts in (s for s in series if s[0] == y):
            xv = [p[0] for p in pts]
            yv = ema([p[1] for p in pts], smooth)
            ax.plot(xv, yv, label=label, alpha=0.7, marker="o" if len(pts) < 100 else None, markersize=3)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    axes[-1].set_xlabel(xs)
    out = Path(out)
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vall_e.plot", description="Plot training metrics to a PNG.")
    parser.add_argument("--xs", default="step", help="x axis: step (= engine_step, it), tokens_processed, "
                                                     "samples_processed, elapsed, epoch")
    parser.add_argument("--ys", nargs="+", default=["loss"],
                        help="metrics, e.g. loss nll stats.acc lr grad_norm val.loss")
    parser.add_argument("--out", default=None, help="output PNG (default: metrics.png beside the YAML)")
    parser.add_argument("--filename", default="metrics.jsonl", help="metrics file name under logs/*/")
    parser.add_argument("--min-x", type=float, default=None)
    parser.add_argument("--max-x", type=float, default=None)
    parser.add_argument("--smooth", type=float, default=10.0, help="EMA center of mass (0 = raw)")
    cfg, args = parse_config(argv, parser)
    runs = load_runs(cfg.log_dir, args.filename)
    if not runs:
        raise UserError(f"{cfg.log_dir}: no {args.filename} found; train first")
    out = plot(runs, Path(args.out) if args.out else cfg.metrics_path, args.xs, args.ys, args.min_x, args.max_x,
               args.smooth)
    print(f"wrote {out}")
    return 0
