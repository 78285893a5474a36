"""The DeepSpeed engine (`trainer.backend=deepspeed`): ZeRO 0-3, bf16/fp16, our torch optimizer and
LR schedule, optional compression (quantization-aware) training.

Launch with `deepspeed --module vall_e.train yaml=...` (or torchrun). DeepSpeed is an optional extra:
without it, choosing this backend is a one-line error. DeepSpeed does not run on the CPU-only
development machines, so this file is kept small: it generates the config (as the reference did,
§2.6) and adapts `DeepSpeedEngine` to the trainer's engine interface (see `LocalEngine`).

Differences from the local engine: DeepSpeed owns loss scaling, clipping and gradient
accumulation, so a NaN/inf loss is replaced by 0 for its backward (the step then applies no
gradient from that batch) and counted, rather than skipped outright.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vall_e.engines.local import StepResult, mean_stats, move_to, set_activation_checkpointing
from vall_e.engines.optim import LRSchedule, build_optimizer, current_lr, set_lr
from vall_e.errors import UserError

logger = logging.getLogger(__name__)

DS_TAG = "deepspeed"  # sub-folder of a checkpoint holding DeepSpeed's own files


def import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError:
        raise UserError("trainer.backend=deepspeed needs DeepSpeed: pip install vall-e[deepspeed] "
                        "(or use trainer.backend=local, which also runs DDP under torchrun)") from None
    return deepspeed


def compression_config(bits: int, modules: list[str]) -> dict[str, Any]:
    """Weight + activation quantization of `modules` (the reference's compression training)."""
    return {
        "weight_quantization": {
            "shared_parameters": {
                "enabled": True, "quantizer_kernel": False, "schedule_offset": 0, "quantize_groups": 64,
                "quantize_verbose": False, "quantization_type": "symmetric", "rounding": "nearest",
                "quantize_weight_in_forward": True,
                "fp16_mixed_quantize": {"enabled": False, "quantize_change_ratio": 1},
            },
            "different_groups": {
                "wq1": {"params": {"start_bits": bits, "target_bits": bits, "quantization_period": 0},
                        "modules": modules},
            },
        },
        "activation_quantization": {
            "shared_parameters": {"enabled": True, "quantization_type": "symmetric", "range_calibration": "dynamic",
                                  "schedule_offset": 0},
            "different_groups": {"aq1": {"params": {"bits": bits}, "modules": modules}},
        },
    }


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for `cfg` (compression is applied separately, see `DeepSpeedEngine`).

    `trainer.deepspeed.config` is merged on top, so any DeepSpeed option (e.g. offload) can be set.
    """
    hp, tr = cfg.hyperparameters, cfg.trainer
    ds = tr.deepspeed
    stage = int(ds.zero_optimization_level)
    if not 0 <= stage <= 3:
        raise UserError(f"trainer.deepspeed.zero_optimization_level {stage}: must be 0, 1, 2 or 3")
    ga = max(1, int(hp.gradient_accumulation_steps))
    micro = max(1, int(hp.batch_size))
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": True,
                            "reduce_scatter": True, "reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8)}
    if stage > 0 and getattr(ds, "offload", False):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    dtype = tr.weight_dtype
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ga,
        "train_batch_size": micro * ga * world_size,
        "gradient_clipping": float(hp.gradient_clipping),
        "fp16": {"enabled": dtype == "float16", "loss_scale": 0},
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_optimization": zero,
        "comms_logger": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, dict(ds.config or {}))


class DeepSpeedEngine:
    """Trains one network through `deepspeed.initialize` (same interface as `LocalEngine`)."""

    backend = "deepspeed"

    def __init__(self, name: str, model: nn.Module, cfg: Any, device: torch.device, total_steps: int,
                 rank: int = 0, world_size: int = 1) -> None:
        deepspeed = import_deepspeed()
        tr, hp = cfg.trainer, cfg.hyperparameters
        self.name, self.device, self.rank, self.world_size = name, torch.device(device), rank, world_size
        self.compression = None
        set_activation_checkpointing(model, bool(tr.activation_checkpointing))
        if tr.deepspeed.use_compression_training:
            try:
                from deepspeed.compression.compress import init_compression
                from deepspeed.compression.config import get_compression_config
                from deepspeed.compression.scheduler import compression_scheduler
            except ImportError:
                raise UserError("trainer.deepspeed.use_compression_training: this DeepSpeed version has no "
                                "compression library; use an older DeepSpeed, or bitsandbytes / "
                                "activation checkpointing to save memory") from None
            comp = {"compression_training": compression_config(int(tr.deepspeed.compression_bits), ["backbone"])}
            model = init_compression(model, comp)
            self.compression = compression_scheduler(model, get_compression_config(comp))
            self.compression.step(step_zero_check=True)
        optimizer = build_optimizer(model.parameters(), hp, bool(cfg.bitsandbytes.enabled))
        self.ds_config = build_ds_config(cfg, world_size)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config)
        self.model = model
        self.schedule = LRSchedule(self.optimizer, hp.scheduler, total_steps, hp.warmup_steps, hp.min_lr_ratio)
        self.stage = int(tr.deepspeed.zero_optimization_level)

    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def lr(self) -> float:
        return current_lr(self.optimizer)

    def set_lr(self, value: float, step: int) -> str:
        return set_lr(self.optimizer, self.schedule, value, step)

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> StepResult:
        self.engine.train()
        lr = self.schedule.apply(step)
        losses, stats_list, nonfinite = [], [], False
        for mb in micro_batches:
            loss, stats = self.engine(move_to(mb, self.engine.device))
            if not bool(torch.isfinite(loss.detach())):
                nonfinite = True
                loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
            losses.append(float(loss.detach()))
            stats_list.append(stats)
        if self.compression is not None:
            self.compression.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if self.world_size > 1:
            import torch.distributed as dist

            t = torch.tensor([float(nonfinite)], device=self.engine.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            nonfinite = bool(t.item() > 0)
        return StepResult(loss=sum(losses) / len(losses), stats=mean_stats(stats_list), grad_norm=norm, lr=lr,
                          skipped_nan=nonfinite)

    @torch.no_grad()
    def eval_forward(self, batch: dict[str, Any]) -> tuple[float, dict[str, float]]:
        self.engine.eval()
        try:
            loss, stats = self.engine(move_to(batch, self.engine.device))
        finally:
            self.engine.train()
        return float(loss), stats

    def full_state_dict(self) -> dict[str, Tensor]:
        """Full weights on every rank (ZeRO-3 gathers its partitions: call on all ranks)."""
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return self.model.state_dict()

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict()}  # optimizer and scaler live in DeepSpeed's files

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        self.schedule.load_state_dict(state["schedule"])

    def extra_checkpoint(self, tmp_dir: Path) -> None:
        """DeepSpeed's own shards into `{checkpoint}/deepspeed/{name}` (call on every rank)."""
        self.engine.save_checkpoint(str(Path(tmp_dir) / DS_TAG), tag=self.name, save_latest=False)

    def load_extra(self, step_dir: Path, load_states: bool) -> None:
        d = Path(step_dir) / DS_TAG
        if not (d / self.name).is_dir():
            logger.warning("%s has no DeepSpeed state for %s: optimizer starts afresh", step_dir, self.name)
            return
        self.engine.load_checkpoint(str(d), tag=self.name, load_optimizer_states=load_states,
                                    load_lr_scheduler_states=False, load_module_only=not load_states)

    def close(self) -> None:
        pass
