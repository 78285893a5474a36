"""The local engine: one network, its optimizer and LR schedule; DDP when launched under torchrun.

What it adds over the reference's local engine (docs/reference-differences.md #9): gradient
clipping (and the global grad norm), a GradScaler for fp16, DDP gradient all-reduce, LR schedules,
and steps that are skipped (and counted) instead of corrupting the weights:

* NaN/inf loss or gradient norm: the optimizer step is skipped. Under DDP the decision is
  all-reduced, so every rank skips the same step.
* CUDA out of memory: the batch is dropped and counted (single process). Under DDP one rank cannot
  drop a batch the others train on, so the run stops with a clear message instead (the last
  checkpoint is intact).
"""
from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from vall_e.training.engines.optim import LRSchedule, build_optimizer, current_lr, set_lr
from vall_e.utils.dtypes import DTYPES
from vall_e.utils.errors import UserError

logger = logging.getLogger(__name__)



@dataclass
class StepResult:
    """What one optimizer step did (averaged over its micro-batches)."""

    loss: float = float("nan")
    stats: dict[str, float] = field(default_factory=dict)
    grad_norm: float = float("nan")
    lr: float = 0.0
    skipped_nan: bool = False
    skipped_oom: bool = False
    loss_scale: float | None = None  # fp16 GradScaler's scale (an overflowing step is skipped by it, not by us)

    @property
    def skipped(self) -> bool:
        return self.skipped_nan or self.skipped_oom


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors inside dicts/lists/tuples to `device` (non-blocking from pinned memory)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def mean_stats(stats_list: list[dict[str, float]]) -> dict[str, float]:
    """Average each key over the micro-batches that reported it (token counts are summed)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for st in stats_list:
        for k, v in st.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
    return {k: (s if k.endswith(".tokens") else s / counts[k]) for k, s in sums.items()}


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    if hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(enabled)
        return
    for m in model.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = enabled


class LocalEngine:
    """Trains one network. `train_step(micro_batches, step)` is one optimizer step."""

    backend = "local"

    def __init__(self, name: str, model: nn.Module, cfg: Any, device: torch.device, total_steps: int,
                 rank: int = 0, world_size: int = 1) -> None:
        tr, hp = cfg.trainer, cfg.hyperparameters
        self.name, self.device, self.rank, self.world_size = name, torch.device(device), rank, world_size
        self.dtype = DTYPES[tr.weight_dtype]
        self.amp = bool(tr.amp) and self.dtype != torch.float32
        self.check_for_oom = bool(tr.check_for_oom)
        self.clip = float(hp.gradient_clipping)
        model.to(self.device)
        if not tr.amp and self.dtype != torch.float32:
            model.to(self.dtype)  # the reference's non-amp mode: the weights themselves in half precision
        set_activation_checkpointing(model, bool(tr.activation_checkpointing))
        self.model = model
        self.optimizer = build_optimizer(model.parameters(), hp, bool(cfg.bitsandbytes.enabled))
        self.schedule = LRSchedule(self.optimizer, hp.scheduler, total_steps, hp.warmup_steps, hp.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type) if (self.amp and self.dtype == torch.float16) else None
        self.ddp = None
        if world_size > 1:
            # Each sample trains one level, so some level embeddings/heads get no gradient in a step.
            self.ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=True)
        self.params = [p for p in model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ helpers
    @property
    def module(self) -> nn.Module:
        return self.model

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.amp)

    def _any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _drop_oom(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def lr(self) -> float:
        return current_lr(self.optimizer)

    def set_lr(self, value: float, step: int) -> str:
        return set_lr(self.optimizer, self.schedule, value, step)

    # ------------------------------------------------------------------ training
    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> StepResult:
        """Forward/backward over the micro-batches (gradient accumulation), then one optimizer step."""
        model = self.ddp or self.model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.schedule.apply(step)
        n = len(micro_batches)
        losses: list[Tensor] = []
        stats_list: list[dict[str, float]] = []
        for i, mb in enumerate(micro_batches):
            sync = self.ddp is None or i == n - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                oom = False
                loss = None
                try:
                    with self.autocast():
                        loss, stats = model(move_to(mb, self.device))
                except Exception as e:
                    if not (self.check_for_oom and is_oom(e)):
                        raise
                    oom = True
                if self.world_size > 1 and self.check_for_oom and self.device.type == "cuda":
                    oom = self._any(oom)
                if oom:
                    del loss
                    if self.world_size > 1:
                        raise RuntimeError(f"{self.name}: out of memory in the forward pass on some rank; lower "
                                           "hyperparameters.batch_size or frames_per_batch and resume")
                    self._drop_oom()
                    logger.warning("%s: out of memory, batch skipped", self.name)
                    return StepResult(lr=lr, skipped_oom=True)
                try:
                    scaled = loss.float() / n
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                except Exception as e:
                    if not (self.check_for_oom and is_oom(e)) or self.world_size > 1:
                        raise
                    del loss, scaled
                    self._drop_oom()
                    logger.warning("%s: out of memory in the backward pass, batch skipped", self.name)
                    return StepResult(lr=lr, skipped_oom=True)
            losses.append(loss.detach().float())
            stats_list.append(stats)
        mean_loss = torch.stack(losses).mean()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.clip if self.clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # With a GradScaler, inf/NaN gradients from a finite loss are fp16 overflow: routine, and the scaler
        # itself skips that update and lowers its scale. Anything else non-finite skips the step here.
        bad_norm = not bool(torch.isfinite(grad_norm)) and self.scaler is None
        bad = self._any(not bool(torch.isfinite(mean_loss)) or bad_norm)
        result = StepResult(loss=float(mean_loss), stats=mean_stats(stats_list), grad_norm=float(grad_norm), lr=lr)
        if bad:
            result.skipped_nan = True
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # sees the non-finite gradients and skips
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            result.loss_scale = float(self.scaler.get_scale())
        return result

    @torch.no_grad()
    def eval_forward(self, batch: dict[str, Any]) -> tuple[float, dict[str, float]]:
        was = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                loss, stats = self.model(move_to(batch, self.device))
        finally:
            self.model.train(was)
        return float(loss), stats

    # ------------------------------------------------------------------ state
    def full_state_dict(self) -> dict[str, Tensor]:
        """The network's weights (a collective for sharded engines; plain here)."""
        return self.model.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{source}: optimizer state of {self.name!r} does not fit this model/optimizer ({e}); "
                            "set trainer.load_states=false to start the optimizer afresh") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def extra_checkpoint(self, tmp_dir: Any) -> None:
        """Engine files beyond the common state (none for the local engine)."""

    def close(self) -> None:
        pass
