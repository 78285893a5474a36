"""The demo's reports: `metrics.json` (everything), `metrics.md` (the tables), `loss.png` (training and
unseen-word validation loss), `alignment.png` (the text heads' attention over training)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from vall_e.demo.corpus import TestItem
from vall_e.demo.scoring import summarize
from vall_e.utils.io import atomic_path, atomic_write_text

UNSEEN_COLUMNS = {"trained": "trained", "trained_other_text": "trained, other sentence's text (control)",
                  "untrained": "untrained", "other_sentence": "espeak, other sentence"}
ORACLE_COLUMNS = {"codec_round_trip": "codec round trip (true codes)", "true_level0_only": "true level 0 only",
                  "true_level0_model_nar": "true level 0 + model's NAR (7 levels)",
                  "model_ar_model_nar": "model's AR + model's NAR (7 levels)",
                  "model_ar_level0_only": "model's AR, level 0 only"}


def profile_shares(prof: Any) -> dict[str, float]:
    """Shares of a profiled training step's operator time (self CPU time) by kind of work."""
    kinds = {"matmul": ("mm", "addmm", "bmm", "matmul", "linear"), "attention": ("attention", "softmax"),
             "embedding": ("embedding",), "optimizer": ("adam", "_foreach", "lerp", "addcdiv")}
    totals = {k: 0.0 for k in (*kinds, "other")}
    for ev in prof.key_averages():
        name = ev.key.lower()
        kind = next((k for k, keys in kinds.items() if any(s in name for s in keys)), "other")
        totals[kind] += ev.self_cpu_time_total
    total = sum(totals.values()) or 1.0
    return {k: round(v / total, 3) for k, v in totals.items()}


def alignment_error(maps: Sequence[Tensor]) -> float:
    """Mean distance (in text tokens) between the last layer's attention peak and the diagonal."""
    errs = []
    for m in maps:
        att = m[-1]  # [positions, N]
        T, N = att.shape
        diag = (torch.arange(T) + 0.5) / T * N
        errs.append(float((att.argmax(-1).float() - diag).abs().mean()))
    return float(np.mean(errs)) if errs else math.nan


def _training_curve(cfg: Any) -> list[dict[str, Any]]:
    path = Path(cfg.log_dir) / cfg.model.full_name / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def collect(trainer: Any, cfg: Any, meta: dict[str, Any], tables: dict[str, dict[str, list[dict[str, Any]]]],
            items: list[TestItem], held: list[TestItem], speaker_id: dict[str, Any], timing: dict[str, Any],
            rate: float, elapsed: float, args: Any) -> dict[str, Any]:
    curve = _training_curve(cfg)
    val = [{k: r[k] for k in r if k == "step" or k.startswith("val.")} for r in curve if "val.loss" in r]
    stats = meta.get("stats", {})
    return {
        "unseen_words": {name: summarize(rows) for name, rows in tables["unseen"].items()},
        "speaker_identification": speaker_id,
        "oracle_swaps": {name: summarize(rows) for name, rows in tables["oracle"].items()},
        "heldout_training_style": {name: summarize(rows) for name, rows in tables["heldout"].items()},
        "validation_on_unseen_words": val,
        "training": {"steps": stats.get("step", trainer.step), "seconds_per_step": timing["seconds_per_step"],
                     "frames_per_second": timing["frames_per_second"], "threads": timing["threads"],
                     "profile_shares": timing["profile"], "text_head_rate": rate, "model": meta["models"]},
        "settings": {k: getattr(args, k) for k in ("speakers", "utterances", "minutes", "train_steps", "codes",
                                                     "d_model", "layers", "heads", "kv_heads", "batch_size", "lr", "p_ar",
                                                     "ar_group", "text_heads", "nar_levels", "ar_temperature", "ar_min_p",
                                                     "pitch_guard", "seed")},
        "items": [{"speaker": it.speaker, "text": it.text,
                   **{name: rows[i]["mcd"] for name, rows in tables["unseen"].items()},
                   "closer": tables["unseen"]["trained"][i]["closer"],
                   "duration": tables["unseen"]["trained"][i]["duration"]} for i, it in enumerate(items)],
        "heldout_items": [{"speaker": it.speaker, "text": it.text, "trained": tables["heldout"]["trained"][i]["mcd"]}
                          for i, it in enumerate(held)],
        "elapsed_s": elapsed,
    }


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.2f}"


def _right_voice(sid: dict[str, Any]) -> str:
    text = _fmt(sid["nearest_is_own_voice"], True)
    if "hits" in sid:  # metrics written before the counts and margins were kept lack them
        text += f" ({sid['hits']} of {sid['n']}"
        if "mean_margin" in sid:
            text += (f"; cosine to the own voice minus the nearest other voice's: mean {sid['mean_margin']:.3f}, "
                     f"lowest {sid['min_margin']:.3f}")
        text += ")"
    return f"{text}, {sid['encoder']}"


def markdown(metrics: dict[str, Any]) -> str:
    u = metrics["unseen_words"]
    lines = ["## Unseen words", "",
             "Harvard sentences (none of their words is in the training corpus), every voice prompted by another "
             "of its test sentences. MCD-DTW (dB) to espeak's rendering of the same sentence by the same voice; "
             "lower is closer. Same words score at most 7.9 dB between espeak renderings, different words at "
             "least 9.3 dB.", "",
             _row(["", *UNSEEN_COLUMNS.values()]), _row(["---"] * (1 + len(UNSEEN_COLUMNS))),
             _row(["mean MCD-DTW", *(_fmt(u[c]["mcd_mean"]) for c in UNSEEN_COLUMNS)]),
             _row(["under 8.5 dB", *(_fmt(u[c]["under_8_5"], True) for c in UNSEEN_COLUMNS)]),
             _row(["closer to its own sentence than to every other", *(_fmt(u[c]["closer_than_every_other"], True)
                                                                       for c in UNSEEN_COLUMNS)]),
             _row(["duration within ±15% of espeak's", *(_fmt(u[c]["duration_within_15"], True)
                                                          for c in UNSEEN_COLUMNS)]),
             _row(["mean duration / espeak's", *(_fmt(u[c]["duration_ratio_mean"]) for c in UNSEEN_COLUMNS)]), ""]
    sid = metrics["speaker_identification"]
    lines.append(f"Right voice (speaker embedding nearest to its own voice among the demo's "
                 f"{metrics['settings']['speakers']} voices): " + (_right_voice(sid) if sid.get("available")
                                                                   else f"not measured: {sid['why']}"))
    o = metrics["oracle_swaps"]
    lines += ["", "## Where the error comes from (oracle swaps, same test sentences)", "",
              _row(["decoded", "mean MCD-DTW", "under 8.5 dB"]), _row(["---"] * 3)]
    lines += [_row([label, _fmt(o[c]["mcd_mean"]), _fmt(o[c]["under_8_5"], True)]) for c, label in ORACLE_COLUMNS.items()]
    if metrics["settings"]["p_ar"] >= 1.0:
        lines += ["", "The NAR was not trained (`--p-ar 1.0`: every training sample trains the AR), so the rows with "
                  "the model's NAR show an untrained NAR; `--p-ar 0.75 --nar-levels 7` trains and decodes it."]
    h = metrics["heldout_training_style"]
    lines += ["", "## Held-out sentences of the training corpus's kind (new made-up words)", "",
              _row(["", "trained", "espeak, other sentence"]), _row(["---"] * 3),
              _row(["mean MCD-DTW", _fmt(h["trained"]["mcd_mean"]), _fmt(h["other_sentence"]["mcd_mean"])])]
    t = metrics["training"]
    lines += ["", "## Training", "",
              f"{t['steps']} steps, {t['seconds_per_step']:.2f} s/step on {t['threads']} threads "
              f"({t['frames_per_second']:.0f} response frames/s); operator time: "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in t["profile_shares"].items())
              + f"; text-head rate {t['text_head_rate']:.2f} frames per text token.", "",
              "Validation on the unseen-word sentences over training:", "",
              _row(["step", "AR loss", "AR accuracy", "NAR loss", "alignment error (tokens)"]), _row(["---"] * 5)]
    for r in metrics["validation_on_unseen_words"]:
        lines.append(_row([str(r["step"]), _fmt(r.get("val.ar.loss", math.nan)), _fmt(r.get("val.ar.acc", math.nan)),
                           _fmt(r.get("val.nar.loss", math.nan)), _fmt(r.get("val.alignment_error", math.nan))]))
    lines += ["", "## Per sentence (unseen words)", "", _row(["voice", "text", *UNSEEN_COLUMNS.values(), "closer",
                                                              "duration"]), _row(["---"] * (4 + len(UNSEEN_COLUMNS)))]
    for it in metrics["items"]:
        lines.append(_row([it["speaker"], it["text"], *(_fmt(it[c]) for c in UNSEEN_COLUMNS),
                           "yes" if it["closer"] else "no", _fmt(it["duration"])]))
    lines.append(f"\n{metrics['elapsed_s'] / 60:.1f} minutes in all.")
    return "\n".join(lines) + "\n"


def write(out: Path, metrics: dict[str, Any], tables: dict[str, Any], items: list[TestItem],
          held: list[TestItem]) -> None:
    atomic_write_text(out / "metrics.json", json.dumps({**metrics, "tables": tables}, indent=1, default=str))
    atomic_write_text(out / "metrics.md", markdown(metrics))


def headline(metrics: dict[str, Any]) -> str:
    t = metrics["unseen_words"]["trained"]
    c = metrics["unseen_words"]["trained_other_text"]
    return (f"unseen words: mean MCD-DTW {t['mcd_mean']:.2f} dB (control {c['mcd_mean']:.2f}), "
            f"{_fmt(t['under_8_5'], True)} under 8.5 dB, closer to its own sentence than to every other in "
            f"{_fmt(t['closer_than_every_other'], True)}, duration within ±15% in {_fmt(t['duration_within_15'], True)}"
            + _headline_voice(metrics["speaker_identification"]))


def _headline_voice(sid: dict[str, Any]) -> str:
    if not sid.get("available"):
        return ""
    counts = f" ({sid['hits']} of {sid['n']})" if "hits" in sid else ""
    return f", right voice {_fmt(sid['nearest_is_own_voice'], True)}{counts}"


def plot_training(cfg: Any, path: Path) -> None:
    import matplotlib  # plotting only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = _training_curve(cfg)
    train = [(r["step"], r["loss"]) for r in curve if "loss" in r]
    val = [(r["step"], r["val.ar.loss"]) for r in curve if "val.ar.loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4))
    if train:
        ax.plot(*zip(*train), label="training loss", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="AR loss on unseen-word sentences")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def plot_alignments(alignments: list[tuple[int, list[Tensor]]], probes: list[dict[str, Any]], path: Path) -> None:
    """One row per evaluation, one column per probe sentence: the last layer's text-head attention."""
    if not alignments or not probes:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(alignments), len(probes)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.2 * rows), squeeze=False)
    for r, (step, maps) in enumerate(alignments):
        for c, m in enumerate(maps):
            ax = axes[r][c]
            ax.imshow(m[-1].T.numpy(), aspect="auto", origin="lower", interpolation="nearest")
            ax.set_title(f"step {step}: {probes[c]['label'][:40]}", fontsize=7)
            ax.set_xlabel("AR step", fontsize=7)
            ax.set_ylabel("text token", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=70)
    plt.close(fig)
