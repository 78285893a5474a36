"""The DeepSpeed engine (`trainer.backend=deepspeed`): ZeRO 0-3 (optionally offloading to the CPU),
bf16/fp16, our torch optimizer and LR schedule, and compression (quantization-aware) training.

Launch with `deepspeed --module vall_e.train yaml=...` or `torchrun --nproc_per_node=N -m vall_e.train
yaml=... trainer.backend=deepspeed`. DeepSpeed is an optional extra: without it, choosing this backend
is a one-line error. On a machine without CUDA, DeepSpeed's CPU accelerator is used and its
collectives run over gloo (oneCCL when `oneccl_bindings_for_pytorch` is installed).

Why the model is wrapped (`GradientFunnel`): ZeRO 1/2 reduce gradients in buckets filled in the
order in which their gradient hooks fire, and assume that order is the same on every rank. VALL-E
trains a random code level per sample, so which heads and embeddings get a gradient, and when,
differs between ranks: without the funnel the ranks' buckets disagree and gloo/NCCL abort (or,
worse, sum mismatched slices). The funnel routes every parameter through one autograd node, so all
gradients (zeros for unused parameters, as DDP's `find_unused_parameters` would leave them) arrive
together, in parameter order, on every rank. The cost: the full gradient exists at the end of the
backward pass (as with DDP) before ZeRO-2 keeps only this rank's partition, so ZeRO-2 here saves the
optimizer state and the fp32 gradient partitions, not the backward pass's peak. ZeRO-3 gathers
weights module by module, in the order the modules run, so it cannot serve ranks that run different
heads: it is refused with several processes and works in one (e.g. with CPU offload).

Differences from the local engine: DeepSpeed owns loss scaling, clipping and gradient accumulation.
A NaN/inf loss on any rank is replaced by a zero loss on every rank (so that micro-batch adds no
gradient; with ZeRO 1/2 the zero goes through the funnel, so no NaN can reach the weights) and the
step is counted in `skipped_nan`; DeepSpeed still steps the optimizer on the other micro-batches.
"""
from __future__ import annotations

import copy
import importlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vall_e.training.engines.local import StepResult, mean_stats, move_to, set_activation_checkpointing
from vall_e.training.engines.optim import LRSchedule, build_optimizer, current_lr, set_lr
from vall_e.utils.errors import UserError

logger = logging.getLogger(__name__)

DS_TAG = "deepspeed"  # sub-folder of a checkpoint holding DeepSpeed's own files
COMPRESSED_MODULES = ["backbone"]  # compression training quantizes the backbone's linear layers


def import_deepspeed() -> Any:
    """`deepspeed`, set up for this machine (call before DeepSpeed initializes its accelerator).

    Without CUDA: DeepSpeed's CPU accelerator, and no JIT build of its shared-memory collective op
    (a C++ extension that takes minutes to compile and only serves inference all-reduce, not
    training). `VALLE_DS_SHM=1` keeps DeepSpeed's default.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise UserError("trainer.backend=deepspeed needs DeepSpeed: pip install vall-e[deepspeed] "
                        "(or use trainer.backend=local, which also runs DDP under torchrun)") from None
    # DeepSpeed's ZeRO calls torch's (renamed) all_gather_into_tensor on every step
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if not torch.cuda.is_available() and os.environ.get("VALLE_DS_SHM", "0") != "1":
        try:
            ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        except ImportError:
            ds_torch_comm = None
        if ds_torch_comm is not None and hasattr(ds_torch_comm, "build_shm_op"):
            ds_torch_comm.build_shm_op = lambda: None
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


def build_ds_config(cfg: Any, world_size: int, n_params: int = 0, cuda: bool = True) -> dict[str, Any]:
    """The DeepSpeed config for `cfg` (compression is applied separately, see `DeepSpeedEngine`).

    Buckets are no larger than the model (`n_params`): DeepSpeed's default 5e8-element buckets
    cost 1-2 GB of buffers, which defeats the point on a small GPU. `trainer.deepspeed.config` is
    merged on top, so any DeepSpeed option (e.g. smaller buckets, NVMe offload) can be set.
    """
    hp, tr = cfg.hyperparameters, cfg.trainer
    ds = tr.deepspeed
    stage = int(ds.zero_optimization_level)
    if not 0 <= stage <= 3:
        raise UserError(f"trainer.deepspeed.zero_optimization_level {stage}: must be 0, 1, 2 or 3")
    ga = max(1, int(hp.gradient_accumulation_steps))
    micro = max(1, int(hp.batch_size))
    bucket = int(min(5e8, max(n_params, 1_000_000))) if n_params else int(5e8)
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": bool(cuda),
                            "reduce_scatter": True, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=bucket, stage3_param_persistence_threshold=0)
    if stage > 0 and getattr(ds, "offload", False):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(cuda)}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": bool(cuda)}
    dtype = tr.weight_dtype
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ga,
        "train_batch_size": micro * ga * world_size,
        "gradient_clipping": float(hp.gradient_clipping),
        "fp16": {"enabled": dtype == "float16", "loss_scale": 0},
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch optimizer (AdamW, SGD, Prodigy, AdamW8bit)
        # ... also with offload, where it steps on the CPU (DeepSpeedCPUAdam would need a C++ build; choose it
        # with trainer.deepspeed.config: {optimizer: {type: AdamW, ...}, zero_force_ds_cpu_optimizer: true})
        "zero_force_ds_cpu_optimizer": False,
        "comms_logger": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, dict(ds.config or {}))


class _SafeSymQuantizer(torch.autograd.Function):
    """DeepSpeed's dynamic symmetric fake-quantizer (straight-through gradient), except that an all-zero
    group gets scale 1 instead of 0: DeepSpeed's divides 0 by 0 there, and VALL-E's padded positions are
    all-zero rows after the backbone's norm, so every loss became NaN."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, num_bits: int, min_value: Any = None, max_value: Any = None,
                num_groups: int = 1) -> Tensor:
        q = 2 ** int(num_bits)
        if min_value is None:
            g = x.reshape(num_groups, -1)
            scale = 2 * g.abs().amax(-1, keepdim=True) / q
        else:  # static calibration (a single group)
            g = x.reshape(1, -1)
            scale = (2 * torch.max(min_value.abs(), max_value) / q).reshape(1, -1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return ((g / scale).round().clamp(-q // 2, q // 2 - 1) * scale).reshape(x.shape).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        return grad.clone(), None, None, None, None


def _make_quantizers_safe(model: nn.Module) -> int:
    """Swap DeepSpeed's symmetric quantizer for `_SafeSymQuantizer` in compressed layers; returns how many."""
    from deepspeed.compression.utils import SymQuantizer

    n = 0
    for m in model.modules():
        for attr in ("weight_quantizer", "activation_quantizer"):
            if getattr(m, attr, None) == SymQuantizer.apply:  # (a bound method: equal, never identical)
                setattr(m, attr, _SafeSymQuantizer.apply)
                n += 1
    return n


class _Funnel(torch.autograd.Function):
    """Identity on all parameters at once; its backward hands every gradient on together."""

    @staticmethod
    def forward(ctx: Any, *params: Tensor) -> tuple[Tensor, ...]:
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, ...]:
        return grads  # unused outputs arrive as zeros (materialized), so every parameter gets a gradient


def _load_without_pickle(engine: Any) -> None:
    """Make DeepSpeed read its checkpoint files with `torch.load(weights_only=True)`.

    Its own loader unpickles them (`weights_only=False`), so a tampered `*_optim_states.pt` could run
    code on resume. Its files hold tensors, dicts, lists, numbers and strings, which the safe loader reads.
    """
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None:
        return

    # the few DeepSpeed classes its files hold: plain data (a loss scaler's numbers, an enum, a
    # dataclass of offsets), rebuilt from their fields; no reduce-to-a-callable is allowed
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # an unpicklable or corrupt file: one line, no traceback from inside torch
            raise UserError(f"{path}: not a loadable DeepSpeed checkpoint file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None

    ce.load = load


class GradientFunnel(nn.Module):
    """Runs `model` with its parameters passed through `_Funnel` (see the module docstring).

    `zero_loss()` gives 0 * (sum of the last forward's funnelled parameters): a loss whose backward
    reaches every parameter through the funnel as usual, with zero gradients, to stand in for a
    non-finite loss so that ranks with and without a NaN stay in step.
    """

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        super().__init__()
        self.model = model  # (always wrapped, so DeepSpeed's files name the weights the same either way)
        self.enabled = enabled
        self.funnelled: tuple[Tensor, ...] | None = None

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        self.funnelled = None
        if not (self.enabled and torch.is_grad_enabled()):
            return self.model(batch)
        names, params = zip(*[(n, p) for n, p in self.model.named_parameters() if p.requires_grad])
        funnelled = _Funnel.apply(*params)
        for p, f in zip(params, funnelled):  # attributes some layers keep on their weights (DeepSpeed's QAT bits)
            f.__dict__.update({k: v for k, v in vars(p).items() if not k.startswith("_")})
        self.funnelled = funnelled
        return torch.func.functional_call(self.model, dict(zip(names, funnelled)), (batch,))

    def zero_loss(self) -> Tensor:
        assert self.funnelled is not None, "zero_loss() needs a forward pass with gradients first"
        return sum(f.sum() for f in self.funnelled) * 0.0


class DeepSpeedEngine:
    """Trains one network through `deepspeed.initialize` (same interface as `LocalEngine`)."""

    backend = "deepspeed"

    def __init__(self, name: str, model: nn.Module, cfg: Any, device: torch.device, total_steps: int,
                 rank: int = 0, world_size: int = 1) -> None:
        deepspeed = import_deepspeed()
        tr, hp = cfg.trainer, cfg.hyperparameters
        self.name, self.device, self.rank, self.world_size = name, torch.device(device), rank, world_size
        self.stage = int(tr.deepspeed.zero_optimization_level)
        if self.stage == 3 and world_size > 1:
            raise UserError("trainer.deepspeed.zero_optimization_level=3 needs every rank to run the same modules in "
                            "the same order, but VALL-E trains a random code level per sample, so its heads differ "
                            "between ranks (the collectives would mismatch). Use stage 2: it partitions the optimizer "
                            "state and gradients, and a full-size VALL-E's weights are under 1 GB (stage 3 works "
                            "in a single process, e.g. with trainer.deepspeed.offload=true)")
        self.compression = None
        set_activation_checkpointing(model, bool(tr.activation_checkpointing))
        if tr.deepspeed.use_compression_training:
            model = self._compress(model, int(tr.deepspeed.compression_bits))
        self.model = model
        n_params = sum(p.numel() for p in model.parameters())
        # ZeRO 1/2 need every rank's gradients in the same order; ZeRO 3 gathers parameters in module
        # hooks, which `functional_call` would bypass, and keeps its own per-parameter bookkeeping.
        self.funnel = GradientFunnel(model, enabled=world_size > 1 and self.stage in (1, 2))
        optimizer = build_optimizer(model.parameters(), hp, bool(cfg.bitsandbytes.enabled))
        self.ds_config = build_ds_config(cfg, world_size, n_params, cuda=self.device.type == "cuda")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=self.funnel, optimizer=optimizer,
                                                                 config=self.ds_config)
        _load_without_pickle(self.engine)
        self.schedule = LRSchedule(self.optimizer, hp.scheduler, total_steps, hp.warmup_steps, hp.min_lr_ratio)

    def _compress(self, model: nn.Module, bits: int) -> nn.Module:
        try:
            from deepspeed.compression.compress import init_compression
            from deepspeed.compression.config import get_compression_config
            from deepspeed.compression.scheduler import compression_scheduler
        except ImportError:
            raise UserError("trainer.deepspeed.use_compression_training: this DeepSpeed version has no "
                            "compression library (removed in 0.19); pip install 'deepspeed<0.19', or save memory "
                            "with bitsandbytes / activation checkpointing instead") from None
        if bits not in (4, 8):
            raise UserError(f"trainer.deepspeed.compression_bits {bits}: must be 4 or 8 (DeepSpeed's activation "
                            "quantization supports only these)")
        if not any(any(m in n for m in COMPRESSED_MODULES) and isinstance(mod, nn.Linear)
                   for n, mod in model.named_modules()):
            raise UserError(f"trainer.deepspeed.use_compression_training: the model has no linear layers under "
                            f"{', '.join(COMPRESSED_MODULES)} to quantize")
        comp = {"compression_training": compression_config(bits, COMPRESSED_MODULES)}
        model = init_compression(model, comp)
        self.compression = compression_scheduler(model, get_compression_config(comp))
        self.compression.step(step_zero_check=True)
        if not _make_quantizers_safe(model):
            raise UserError("trainer.deepspeed.use_compression_training: DeepSpeed enabled no quantizer "
                            f"in {', '.join(COMPRESSED_MODULES)}")
        return model

    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def lr(self) -> float:
        return current_lr(self.optimizer)

    def set_lr(self, value: float, step: int) -> str:
        return set_lr(self.optimizer, self.schedule, value, step)

    def _any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _zero_loss(self, loss: Tensor) -> Tensor:
        """A loss of 0 whose backward gives zero gradients (never NaN) on this rank."""
        if self.funnel.enabled:
            return self.funnel.zero_loss()
        if self.stage == 3:  # partitioned parameters: only the masked loss is available
            return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
        return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0

    def train_step(self, micro_batches: list[dict[str, Any]], step: int) -> StepResult:
        self.engine.train()
        lr = self.schedule.apply(step)
        losses, stats_list, nonfinite = [], [], False
        for mb in micro_batches:
            loss, stats = self.engine(move_to(mb, self.engine.device))
            bad = self._any(not bool(torch.isfinite(loss.detach())))
            if bad:
                nonfinite = True
                logger.warning("%s: NaN/inf loss at step %d on some rank: this micro-batch adds no gradient",
                               self.name, step + 1)
                loss = self._zero_loss(loss)
            self.engine.backward(loss)
            self.funnel.funnelled = None
            with torch.no_grad():  # (gloo's all-gather writes into views of a flat buffer DeepSpeed built with grad)
                self.engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary
            if not bad:
                losses.append(float(loss.detach()))
                stats_list.append(stats)
        if self.compression is not None:
            self.compression.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return StepResult(loss=sum(losses) / len(losses) if losses else float("nan"), stats=mean_stats(stats_list),
                          grad_norm=norm, lr=lr, skipped_nan=nonfinite,
                          loss_scale=float(self.engine.optimizer.cur_scale)
                          if self.ds_config["fp16"]["enabled"] and hasattr(self.engine.optimizer, "cur_scale")
                          else None)

    @torch.no_grad()
    def eval_forward(self, batch: dict[str, Any]) -> tuple[float, dict[str, float]]:
        self.engine.eval()
        try:
            loss, stats = self.engine(move_to(batch, self.engine.device))
        finally:
            self.engine.train()
        return float(loss), stats

    def full_state_dict(self) -> dict[str, Tensor]:
        """Full fp32 weights on every rank (a collective: call on all ranks).

        With bf16/fp16 DeepSpeed keeps the module in half precision and the fp32 master weights in
        its (partitioned) optimizer: those are gathered, so checkpoints keep full precision.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                sd = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        else:
            sd = dict(self.model.state_dict())
        half = self.ds_config["fp16"]["enabled"] or self.ds_config["bf16"]["enabled"]
        if half or self.stage == 3:
            for n, p in self.model.named_parameters():
                full = safe_get_full_fp32_param(p)
                if full is not None and n in sd:
                    sd[n] = full.detach().cpu().float().reshape(sd[n].shape)
        return sd

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"schedule": self.schedule.state_dict()}  # optimizer/scaler: DeepSpeed's files
        if self.compression is not None:
            state["compression_steps"] = int(self.compression.training_steps)
        return state

    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        self.schedule.load_state_dict(state["schedule"])
        if self.compression is not None and "compression_steps" in state:
            self.compression.training_steps = int(state["compression_steps"])

    def extra_checkpoint(self, tmp_dir: Path) -> None:
        """DeepSpeed's own files into `{checkpoint}/deepspeed/{name}`: the module and every rank's
        optimizer partition (call on every rank; the trainer renames the folder when all are done)."""
        self.engine.save_checkpoint(str(Path(tmp_dir) / DS_TAG), tag=self.name, save_latest=False)

    def load_extra(self, step_dir: Path, load_states: bool) -> None:
        """Optimizer partitions (and loss scale) from DeepSpeed's files; without `load_states` nothing:
        the weights already came from the checkpoint's model.safetensors."""
        if not load_states:
            return
        d = Path(step_dir) / DS_TAG
        if not (d / self.name).is_dir():
            logger.warning("%s has no DeepSpeed state for %s: optimizer starts afresh", step_dir, self.name)
            return
        ranks = len(list((d / self.name).glob("*optim_states.pt")))
        if self.stage > 0 and ranks and ranks != self.world_size:
            raise UserError(f"{d / self.name}: saved by {ranks} ranks, this run has {self.world_size}; DeepSpeed "
                            "cannot re-partition optimizer states: use the same number of processes, or "
                            "trainer.load_states=false")
        path, _ = self.engine.load_checkpoint(str(d), tag=self.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"{d / self.name}: DeepSpeed could not load this checkpoint")

    def close(self) -> None:
        pass
