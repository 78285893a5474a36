"""Optimizers and learning-rate schedules built from `cfg.hyperparameters`.

The reference's local engine had no schedule at all and its `lr` command missed Prodigy's `d_coef`
key (docs/reference-differences.md #9 and #11). Here the schedule is a pure function of the
optimizer step, so resuming a run at step N gives exactly the learning rate an uninterrupted run
has at step N, and `set_lr` knows which knob each optimizer exposes.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from vall_e.utils.errors import UserError

OPTIMIZERS = ("adamw", "sgd", "prodigy", "adamw8bit")
SCHEDULES = ("constant", "cosine", "linear", "onecycle")


def build_optimizer(params: Iterable[nn.Parameter], hp: Any, bnb_enabled: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by `hp.optimizer`, with the reference's AdamW defaults.

    adamw: torch AdamW (bitsandbytes' AdamW8bit when `bitsandbytes.enabled`, as in the reference);
    adamw8bit: bitsandbytes' AdamW8bit; sgd: SGD with momentum 0.9; prodigy: `prodigyopt.Prodigy` with
    lr 1.0 and d_coef = learning_rate (its LR multiplier, which the schedule then scales).
    `hp.optimizer_params` overrides any keyword.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("no trainable parameters: model.frozen_params freezes the whole model")
    name = str(hp.optimizer).lower()
    extra = dict(hp.optimizer_params or {})
    lr = float(hp.learning_rate)
    if name == "adamw8bit" or (name == "adamw" and bnb_enabled):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(f"hyperparameters.optimizer={hp.optimizer}"
                            f"{' with bitsandbytes.enabled' if name == 'adamw' else ''} needs bitsandbytes: "
                            "pip install vall-e[bitsandbytes]") from None
        kw = dict(lr=lr, betas=tuple(hp.betas), eps=float(hp.eps), weight_decay=float(hp.weight_decay))
        return bnb.optim.AdamW8bit(params, **{**kw, **extra})
    if name == "adamw":
        kw = dict(lr=lr, betas=tuple(hp.betas), eps=float(hp.eps), weight_decay=float(hp.weight_decay))
        return torch.optim.AdamW(params, **{**kw, **extra})
    if name == "sgd":
        kw = dict(lr=lr, momentum=0.9, weight_decay=float(hp.weight_decay))
        return torch.optim.SGD(params, **{**kw, **extra})
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UserError("hyperparameters.optimizer=prodigy needs prodigyopt: pip install vall-e[train]") from None
        kw = dict(lr=1.0, d_coef=lr, betas=tuple(hp.betas), weight_decay=float(hp.weight_decay))
        return Prodigy(params, **{**kw, **extra})
    raise UserError(f"hyperparameters.optimizer {hp.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")


def is_prodigy(optimizer: torch.optim.Optimizer) -> bool:
    return any("d_coef" in g for g in optimizer.param_groups)


def lr_factor(step: int, kind: str, total: int, warmup: int = 0, min_ratio: float = 0.1) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based) of `total`.

    constant/cosine/linear: linear warm-up over `warmup` steps (from 1/warmup to 1), then flat, a
    half-cosine, or a straight line down to `min_ratio` at `total`. onecycle: a cosine rise from
    1/25 to 1 over `warmup` steps (30% of the run when 0), then a cosine fall to 1/(25 * 1e4), as
    torch's OneCycleLR with its default factors.
    """
    total = max(1, int(total))
    step = max(0, int(step))
    if kind == "onecycle":
        up = warmup if warmup > 0 else max(1, int(0.3 * total))
        start, end = 1 / 25, 1 / (25 * 1e4)
        if step < up:
            return start + (1 - start) * (1 - math.cos(math.pi * step / up)) / 2
        t = min(1.0, (step - up) / max(1, total - up))
        return end + (1 - end) * (1 + math.cos(math.pi * t)) / 2
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2
    if kind == "linear":
        return 1.0 - (1 - min_ratio) * t
    raise UserError(f"hyperparameters.scheduler {kind!r}: choose one of {', '.join(SCHEDULES)}")


class LRSchedule:
    """Sets every param group's `lr` to base_lr x lr_factor(step) before each optimizer step.

    Its only state is the base (peak) LR per group, which the `lr X` command rescales; the step
    comes from the trainer's counter, so nothing else needs saving.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup: int = 0,
                 min_ratio: float = 0.1) -> None:
        if kind not in SCHEDULES:
            raise UserError(f"hyperparameters.scheduler {kind!r}: choose one of {', '.join(SCHEDULES)}")
        self.optimizer = optimizer
        self.kind, self.total, self.warmup, self.min_ratio = kind, int(total_steps), int(warmup), float(min_ratio)
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]

    def factor(self, step: int) -> float:
        return lr_factor(step, self.kind, self.total, self.warmup, self.min_ratio)

    def apply(self, step: int) -> float:
        """Set the LR for optimizer step `step`; returns the first group's LR."""
        f = self.factor(step)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {"base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        base = [float(x) for x in state["base_lrs"]]
        if len(base) != len(self.base_lrs):
            raise ValueError(f"schedule state has {len(base)} groups, the optimizer {len(self.base_lrs)}")
        self.base_lrs = base


def set_lr(optimizer: torch.optim.Optimizer, schedule: LRSchedule | None, value: float, step: int) -> str:
    """The `lr X` command. Returns a description of what changed.

    Prodigy: X becomes `d_coef` (its learning-rate knob; the reference wrote a `d_coeff` key that
    Prodigy never reads: docs/reference-differences.md #11). Others: the LR is X from this step on,
    and the schedule keeps its shape from here (its peak is rescaled so the current LR equals X).
    """
    if not math.isfinite(value) or value < 0:
        raise UserError(f"lr {value}: must be a finite, non-negative number")
    if is_prodigy(optimizer):
        for g in optimizer.param_groups:
            g["d_coef"] = value
        return f"d_coef={value:g} (Prodigy)"
    f = schedule.factor(step) if schedule is not None else 1.0
    for i, g in enumerate(optimizer.param_groups):
        g["lr"] = value
        if schedule is not None:
            schedule.base_lrs[i] = value / f if f > 0 else value
    return f"lr={value:g}" + (f" (schedule peak now {value / f:g})" if schedule is not None and f not in (0, 1) else "")


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The effective LR of the first group (Prodigy: lr x d, its actual step size)."""
    g = optimizer.param_groups[0]
    return float(g["lr"]) * float(g.get("d", 1.0)) if "d_coef" in g else float(g["lr"])
