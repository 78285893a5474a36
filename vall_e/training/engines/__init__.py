"""Training engines (local/DDP and DeepSpeed), checkpoints, optimizers, metrics and live control.

Every engine trains one network and offers the same small interface (`LocalEngine` documents it):
`train_step(micro_batches, step) -> StepResult`, `eval_forward(batch)`, `lr` / `set_lr(x, step)`,
`full_state_dict()`, `state_dict()` / `load_state_dict(state)`, `extra_checkpoint(tmp_dir)`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vall_e.training.engines.deepspeed import DeepSpeedEngine
from vall_e.training.engines.local import LocalEngine, StepResult

__all__ = ["LocalEngine", "StepResult", "build_engine"]


def build_engine(name: str, model: nn.Module, cfg: Any, device: torch.device, total_steps: int,
                 rank: int = 0, world_size: int = 1) -> Any:
    """The engine for `cfg.trainer.backend` (DeepSpeed is imported only when chosen)."""
    if cfg.trainer.backend == "deepspeed":
        return DeepSpeedEngine(name, model, cfg, device, total_steps, rank, world_size)
    return LocalEngine(name, model, cfg, device, total_steps, rank, world_size)
