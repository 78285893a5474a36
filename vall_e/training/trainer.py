"""`python -m vall_e.train yaml=...` (also under `torchrun` for DDP, or `deepspeed --module vall_e.train`).

The loop: draw `gradient_accumulation_steps` micro-batches, take one optimizer step per network,
log a metrics line, evaluate every `evaluation.frequency` steps, save every `save_frequency` steps,
and act on stdin commands and signals (see `vall_e.training.engines.control`).

Resuming restores the weights, optimizer, schedule, scaler, every RNG, the sampler's position and
the counters, so a resumed run continues exactly as if it had never stopped (fp32 on CPU: the
same weights bit for bit). Evaluation runs with its own RNG state, so evaluating (or not) never
changes the training trajectory.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from vall_e.codecs import build_codec
from vall_e.config import parse_config
from vall_e.data import VALLEDataset, make_dataloader
from vall_e.generation.settings import settings_from_config
from vall_e.generation.tts import TTS
from vall_e.models.build import build_models, freeze_all_but_medusa, model_config_dict
from vall_e.models.model_file import read_export, write_export
from vall_e.models.weights import flat_weights, load_model_weights, split_weights
from vall_e.text.languages import LanguageMap
from vall_e.text.symmap import Symmap
from vall_e.training.engines import build_engine
from vall_e.training.engines.checkpoint import (find_checkpoint, get_rng_state, load_checkpoint, save_checkpoint,
                                                set_rng_state)
from vall_e.training.engines.control import HELP, Controller, SignalHandler, parse_command
from vall_e.training.engines.deepspeed import import_deepspeed
from vall_e.training.engines.local import mean_stats
from vall_e.training.engines.metrics_log import MetricsWriter, ProgressBar
from vall_e.utils.audio import save_audio
from vall_e.utils.errors import UserError

logger = logging.getLogger("vall_e.train")

MAX_BAD_STEPS = 100  # consecutive skipped (NaN/inf) steps before giving up
TIMING_KEYS = ("elapsed", "it_per_s")  # the only metrics that differ between identical runs


@dataclass
class TrainingParts:
    """What the trainer needs besides the config; `build_parts` makes the real ones, tests stand-ins."""

    models: dict[str, nn.Module]
    train_loader: Any  # iterable of batches; `.batch_sampler` may have state_dict(batch)/load_state_dict
    val_loader: Any = None
    n_train: int = 0  # utterances per epoch, for the `epoch` metric
    meta: dict[str, Any] = field(default_factory=dict)  # symmap, langmap (JSON text), codec (dict)


Builder = Callable[[Any, int, int, dict[str, Any]], TrainingParts]


def _json_text(x: Any) -> str:
    return x if isinstance(x, str) else x.to_json() if hasattr(x, "to_json") else json.dumps(x)


def build_parts(cfg: Any, rank: int, world_size: int, resume_meta: dict[str, Any]) -> TrainingParts:
    """The real datasets, loaders and VALLE network(s). A resumed run keeps its checkpoint's symbol
    and language maps, so token ids never shift under a trained model."""
    symmap = languages = None
    if resume_meta.get("symmap"):
        symmap = Symmap.from_json(resume_meta["symmap"], source="the checkpoint")
    if resume_meta.get("langmap"):
        languages = LanguageMap.from_json(resume_meta["langmap"], source="the checkpoint")
    train = VALLEDataset(cfg, "train", symmap=symmap, languages=languages)
    val = VALLEDataset(cfg, "val", symmap=train.symmap, languages=train.languages)
    if rank == 0:
        logger.info("%s", train.summary())
        logger.info("%s", val.summary())
    models = build_models(cfg.model, len(train.symmap), len(train.languages), cfg.bitsandbytes)
    codec = getattr(train, "codec_spec", None) or {
        "name": cfg.codec.name, "model": cfg.codec.model, "bandwidth": cfg.codec.bandwidth,
        "codebooks": cfg.codec.codebooks, "frame_rate": train.frame_rate, "n_levels": cfg.model.n_levels}
    return TrainingParts(
        models=models,
        train_loader=make_dataloader(train, cfg, "train", rank, world_size),
        val_loader=make_dataloader(val, cfg, "val", rank, world_size) if len(val) else None,
        n_train=len(train),
        meta={"symmap": _json_text(train.symmap), "langmap": _json_text(train.languages), "codec": dict(codec)},
    )


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------

def init_distributed(cfg: Any) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun/deepspeed's environment; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(cfg.resolved_device())
    if device.type == "cuda" and (world > 1 or device.index is None):
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        if not dist.is_initialized():
            if cfg.trainer.backend == "deepspeed":
                import_deepspeed().init_distributed()
            else:
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast_str(s: str | None, world: int) -> str:
    if world == 1:
        return s or ""
    box = [s]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------

class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(log_dir: Path, rank: int) -> list[logging.Handler]:
    """Console (through tqdm) and `log.txt` on rank 0; warnings only elsewhere."""
    root = logging.getLogger("vall_e")
    handlers: list[logging.Handler] = []
    if rank == 0:
        console = _TqdmHandler()
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_dir / "log.txt", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers = [console, file]
        root.setLevel(logging.INFO)
    else:
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING)
        handlers = [console]
    for h in handlers:
        root.addHandler(h)
    return handlers


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

def _eval_levels(kind: str, n_levels: int, batch_size: int, offset: int) -> list[tuple[str, torch.Tensor]]:
    """Forced target levels: an AR pass (all level 0) and a NAR pass (levels 1..L-1 in turn)."""
    passes = []
    if kind in ("ar+nar", "ar"):
        passes.append(("ar", torch.zeros(batch_size, dtype=torch.long)))
    if kind in ("ar+nar", "nar") and n_levels > 1:
        passes.append(("nar", 1 + (torch.arange(batch_size) + offset) % (n_levels - 1)))
    return passes


def synthesize_samples(models: dict[str, nn.Module], meta: dict[str, Any], batches: list[tuple[str, dict]],
                       count: int, out_dir: Path, cfg: Any, device: torch.device) -> list[Path]:
    """Synthesize `count` samples of each (split, batch) to wavs with the TTS engine, next to the
    ground truth. A failure here is logged and never stops training."""
    if count <= 0 or not batches:
        return []
    if any(p.dtype != torch.float32 for m in models.values() for p in m.parameters()):
        logger.info("synthesis during training needs fp32 weights: skipped")
        return []
    written: list[Path] = []
    modes = {name: m.training for name, m in models.items()}
    try:
        tts = TTS(models, meta, build_codec(meta.get("codec") or {}), device=str(device), dtype="float32")
        settings = settings_from_config(cfg)
        with torch.no_grad():
            for split, batch in batches:
                n = min(count, len(batch["text"]))
                text = [t for t in batch["text"][:n]]
                prompts = [p for p in batch["prompt"][:n]]
                langs = batch["lang"][:n]
                floors = [int(settings.min_frames_per_phoneme * len(t)) for t in text]  # as TTS.generate_codes
                level0 = tts.generate_ar(text, langs, prompts, settings.ar, [int(cfg.evaluation.steps)] * n,
                                         settings.max_repeat_frames, floors)
                codes = tts.generate_nar(text, langs, prompts, level0, settings.nar, settings.max_nar_levels)
                hyps = tts.decode(codes)
                refs = tts.decode([r for r in batch["resps"][:n]])
                for i in range(n):
                    spk = str(batch.get("speaker", ["spk"] * n)[i]).replace("/", "_")
                    for kind, wav in (("hyp", hyps[i]), ("ref", refs[i])):
                        path = out_dir / split / f"{i}_{spk}.{kind}.wav"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        save_audio(path, wav, tts.sample_rate)
                        written.append(path)
    except Exception as e:  # evaluation samples are a nicety; training goes on
        logger.warning("synthesis of evaluation samples failed: %s", str(e).splitlines()[0] if str(e) else e)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    if written:
        logger.info("wrote %d evaluation wavs under %s", len(written), out_dir)
    return written


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------

@dataclass
class _Start:
    """Where a run starts from: a checkpoint (`step_dir`, its weights and state), an exported model
    file's weights (trainer.load_state_dict), or nothing."""

    meta: dict[str, Any] = field(default_factory=dict)  # the symbol and language maps to keep using
    step_dir: Path | None = None
    weights: dict[str, torch.Tensor] | None = None  # a checkpoint's, every network's in one dict
    state: dict[str, Any] | None = None
    export_weights: dict[str, dict[str, torch.Tensor]] | None = None  # per network


class Trainer:
    def __init__(self, cfg: Any, builder: Builder | None = None, read_stdin: bool = True) -> None:
        self.cfg = cfg
        self.builder = builder or build_parts
        self.read_stdin = read_stdin
        self.name = cfg.model.full_name
        self.run_dir = Path(cfg.ckpt_dir) / self.name
        self.log_dir = Path(cfg.log_dir) / self.name
        self.step = self.samples = self.tokens = 0
        self.skipped_nan = self.skipped_oom = 0
        self.elapsed = 0.0
        self.val_loss: float | None = None
        self.last_saved_step = -1
        self.last_batch: dict[str, Any] | None = None

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        """Everything before the first step, in this order (the order of the random draws is part of a
        bit-identical resume): the process group and logs; where the run starts from; the networks;
        their engines; the checkpoint's counters and states; the data iterator; the random streams; the
        metrics file."""
        cfg = self.cfg
        self._start_process()
        start = self._find_start()
        self._build_networks(start)
        self._load_weights(start)
        self._log_sizes()
        self.engines = {n: build_engine(n, m, cfg, self.device, cfg.trainer.iterations, self.rank, self.world)
                        for n, m in self.models.items()}
        self._restore(start)
        self.data_iter = self._new_iter()
        self._seed_streams(start)
        self.metrics = MetricsWriter(self.log_dir / "metrics.jsonl", enabled=self.is_main,
                                     tensorboard_dir=(self.log_dir / "tensorboard") if cfg.trainer.tensorboard else None)
        self.metrics.truncate_after(self.step)

    def _start_process(self) -> None:
        """This process's rank, the world size and device; the console and `log.txt` logs."""
        self.rank, self.world, self.device = init_distributed(self.cfg)
        self.is_main = self.rank == 0
        root = logging.getLogger("vall_e")
        self._log_saved = (root.level, root.propagate)
        self._handlers = setup_logging(self.log_dir, self.rank)
        root.propagate = False  # our console handler prints; don't print twice through the root logger
        self.ga = max(1, int(self.cfg.hyperparameters.gradient_accumulation_steps))

    def _find_start(self) -> _Start:
        """The exported model file to start from (trainer.load_state_dict), else the checkpoint to resume
        (trainer.load_tag, else the latest), else nothing."""
        tr = self.cfg.trainer
        if tr.load_state_dict:
            path = self.run_dir / "model.safetensors"
            if not path.exists():
                raise UserError(f"trainer.load_state_dict=true but {path} does not exist; export one first")
            export_weights, emeta = read_export(path)
            latest = find_checkpoint(self.run_dir, tr.load_tag)
            if latest is not None:
                logger.warning("trainer.load_state_dict=true: starting from %s, not from checkpoint %s "
                               "(set it to false to resume)", path, latest)
            logger.info("initialising weights from %s", path)
            return _Start(meta={"symmap": emeta.get("symmap"), "langmap": emeta.get("langmap")},
                          export_weights=export_weights)
        step_dir = find_checkpoint(self.run_dir, tr.load_tag)
        if step_dir is None:
            logger.info("no checkpoint in %s: starting from scratch", self.run_dir)
            return _Start()
        weights, state = load_checkpoint(step_dir)
        logger.info("resuming from %s (step %s)", step_dir, state.get("step"))
        return _Start(meta=dict(state.get("meta") or {}), step_dir=step_dir, weights=weights, state=state)

    def _build_networks(self, start: _Start) -> None:
        """The data and the networks (`self.builder`), from the same initial weights on every rank; the
        metadata that checkpoints and exported files carry."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.parts = parts = self.builder(cfg, self.rank, self.world, start.meta)
        self.models = parts.models
        self.meta = {"models": {n: model_config_dict(m) for n, m in self.models.items()},
                     "symmap": parts.meta.get("symmap") or "{}", "langmap": parts.meta.get("langmap") or "{}",
                     "codec": dict(parts.meta.get("codec") or {})}

    def _load_weights(self, start: _Start) -> None:
        """The exported model file's or the checkpoint's weights into the networks. With
        trainer.medusa_only, Medusa heads the weights lack start as the AR head, and only the heads train."""
        strict = self.cfg.trainer.strict_loading
        medusa_only = self.cfg.trainer.medusa_only
        loaded: dict[str, dict[str, torch.Tensor]] = {}
        if start.export_weights is not None:
            source = str(self.run_dir / "model.safetensors")
            for n, m in self.models.items():
                if n not in start.export_weights:
                    raise UserError(f"{source}: has no network {n!r}")
                loaded[n] = self._with_heads(m, start.export_weights[n], medusa_only)
                load_model_weights(m, loaded[n], strict, source)
        if start.weights is not None and start.step_dir is not None:
            per_model = split_weights(start.weights, list(self.models))
            for n, m in self.models.items():
                loaded[n] = self._with_heads(m, per_model[n], medusa_only)
                load_model_weights(m, loaded[n], strict, str(start.step_dir / "model.safetensors"))
        if medusa_only:
            if not loaded:
                raise UserError("trainer.medusa_only trains heads on a trained AR: start from its export "
                                "(trainer.load_state_dict=true) or a checkpoint of the run")
            for n, m in self.models.items():
                if getattr(m.config, "has_ar", False):
                    freeze_all_but_medusa(m)

    @staticmethod
    def _with_heads(model: nn.Module, weights: dict[str, torch.Tensor], medusa_only: bool) -> dict[str, torch.Tensor]:
        """`weights`, completed with the model's freshly initialised Medusa heads (copies of its AR head)
        when trainer.medusa_only adds heads to an AR trained without them."""
        if not medusa_only or not hasattr(model, "medusa_heads") or any(k.startswith("medusa_heads.") for k in weights):
            return weights
        head = {k: v for k, v in weights.items() if k.startswith("ar_head.")}
        if head:
            model.ar_head.load_state_dict({k.removeprefix("ar_head."): v for k, v in head.items()})
        model.init_medusa_from_ar()
        logger.info("Medusa heads start as the AR head (not in the loaded weights)")
        return {**weights, **{k: v for k, v in model.state_dict().items() if k.startswith("medusa_heads.")}}

    def _log_sizes(self) -> None:
        if self.is_main:
            for n, m in self.models.items():
                total = sum(p.numel() for p in m.parameters())
                trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
                logger.info("%s: %.2fM parameters (%.2fM trainable)", n, total / 1e6, trainable / 1e6)

    def _restore(self, start: _Start) -> None:
        """A resumed run's counters (unless trainer.restart_step_count) and, with trainer.load_states,
        its optimizer and schedule states and the sampler's position."""
        state, tr = start.state, self.cfg.trainer
        if state is None or start.step_dir is None:
            return
        if not tr.restart_step_count:
            self.step = int(state["step"])
            self.samples = int(state.get("samples", 0))
            self.tokens = int(state.get("tokens", 0))
            self.elapsed = float(state.get("elapsed", 0.0))
            self.skipped_nan = int(state.get("skipped_nan", 0))
            self.skipped_oom = int(state.get("skipped_oom", 0))
            self.val_loss = state.get("val_loss")
            self.last_saved_step = self.step
        if tr.load_states:
            for n, eng in self.engines.items():
                if n in state.get("engines", {}):
                    eng.load_state_dict(state["engines"][n], source=str(start.step_dir / "state.pt"))
                if hasattr(eng, "load_extra"):
                    eng.load_extra(start.step_dir, True)
            sampler = getattr(self.parts.train_loader, "batch_sampler", None)
            if state.get("sampler") and hasattr(sampler, "load_state_dict"):
                sampler.load_state_dict(state["sampler"])

    def _seed_streams(self, start: _Start) -> None:
        """The random streams: the checkpoint's (with trainer.load_states, the same world size), else
        fresh per-rank ones (dropout, level draws), distinct after a restart at another step."""
        rng = (start.state or {}).get("rng") if self.cfg.trainer.load_states else None
        if rng and len(rng) == self.world:
            set_rng_state(rng[self.rank])
            return
        if rng:
            logger.warning("checkpoint has RNG states for %d ranks, this run has %d: reseeding", len(rng), self.world)
        seed = self.cfg.seed + 1000 * self.rank + self.step
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ data
    def _new_iter(self) -> Any:
        """A fresh pass over the training loader. A DataLoader without its own generator seeds its
        workers from the global RNG; shielding that draw keeps an epoch boundary from shifting the
        training RNG stream (a resumed run creates its iterator at a different moment)."""
        with torch.random.fork_rng(devices=[]):
            return iter(self.parts.train_loader)

    def _next_batch(self) -> dict[str, Any]:
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = self._new_iter()
            try:
                return next(self.data_iter)
            except StopIteration:
                raise UserError("the training data loader yields no batches (too few utterances for "
                                "hyperparameters.batch_size?)") from None

    def _count(self, micro: list[dict[str, Any]]) -> tuple[int, int]:
        samples = sum(len(b["text"]) for b in micro)
        tokens = sum(int(t.numel()) for b in micro for t in b["text"]) + \
            sum(int(r.shape[0]) for b in micro for r in b["resps"])
        if self.world > 1:
            t = torch.tensor([samples, tokens], dtype=torch.long, device=self.device)
            dist.all_reduce(t)
            samples, tokens = int(t[0]), int(t[1])
        return samples, tokens

    # ------------------------------------------------------------------ checkpoints and export
    def save(self, reason: str = "") -> Path | None:
        """A checkpoint of the current step on every rank's behalf (rank 0 writes)."""
        if self.last_saved_step == self.step:
            return None
        sds = {n: eng.full_state_dict() for n, eng in self.engines.items()}
        rngs = _gather(get_rng_state(), self.world)
        ds = [eng for eng in self.engines.values() if eng.backend == "deepspeed"]
        path = None
        if self.is_main:
            sampler = getattr(self.parts.train_loader, "batch_sampler", None)
            sampler_state = None
            if hasattr(sampler, "state_dict"):
                try:
                    sampler_state = sampler.state_dict(self.last_batch)
                except TypeError:
                    sampler_state = sampler.state_dict()
            state = {
                "step": self.step, "samples": self.samples, "tokens": self.tokens,
                "elapsed": self._elapsed(), "skipped_nan": self.skipped_nan, "skipped_oom": self.skipped_oom,
                "val_loss": self.val_loss, "world_size": self.world,
                "engines": {n: eng.state_dict() for n, eng in self.engines.items()},
                "sampler": sampler_state, "rng": rngs, "meta": self.meta,
                "config": json.dumps(self.cfg.to_dict(), default=str),
            }

            def extra(tmp: Path) -> None:
                _broadcast_str(str(tmp), self.world)
                for eng in ds:
                    eng.extra_checkpoint(tmp)
                _barrier(self.world)

            path = save_checkpoint(self.run_dir, self.step, flat_weights(sds), state,
                                   keep_last=int(self.cfg.trainer.keep_last_checkpoints),
                                   write_extra=extra if ds else None)
            logger.info("saved checkpoint %s%s", path, f" ({reason})" if reason else "")
        elif ds:
            tmp = Path(_broadcast_str(None, self.world))
            for eng in ds:
                eng.extra_checkpoint(tmp)
            _barrier(self.world)
        _barrier(self.world)
        self.last_saved_step = self.step
        return path

    def export(self) -> Path | None:
        """`ckpt/{name}/model.safetensors` from the weights in memory (rank 0)."""
        sds = {n: eng.full_state_dict() for n, eng in self.engines.items()}
        path = None
        if self.is_main:
            path = write_export(self.run_dir / "model.safetensors", sds, self.meta["models"], self.meta["symmap"],
                                self.meta["langmap"], self.meta["codec"],
                                {"step": self.step, "samples": self.samples, "tokens": self.tokens,
                                 "val_loss": self.val_loss})
            logger.info("exported %s", path)
        _barrier(self.world)
        return path

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, synthesize: bool = True) -> dict[str, float]:
        """Teacher-forced validation loss/accuracy with forced AR and NAR levels (`val.` keys).

        Every rank evaluates its shard of the validation batches; the sums are combined. The RNG
        states are put back afterwards, so evaluation never changes the training run.
        """
        loader = self.parts.val_loader
        if loader is None:
            return {}
        sampler = getattr(loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(0)  # the same validation batches every time, from the start
        rng = get_rng_state()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        budget = math.ceil(int(self.cfg.evaluation.size) / self.world)
        seen = 0
        first_batch = None
        try:
            for batch in loader:
                if first_batch is None:
                    first_batch = batch
                B = len(batch["text"])
                for name, eng in self.engines.items():
                    cfgd = self.meta["models"][name]
                    for part, levels in _eval_levels(cfgd.get("kind", "ar+nar"), int(cfgd.get("n_levels", 8)),
                                                     B, seen):
                        loss, stats = eng.eval_forward({**batch, "levels": levels})
                        for k, v in (("loss", loss), *((k, v) for k, v in stats.items() if k.startswith(part + "."))):
                            key = f"{part}.loss" if k == "loss" else k
                            if key.endswith(".tokens") or not math.isfinite(float(v)):
                                continue
                            sums[key] = sums.get(key, 0.0) + float(v) * B
                            counts[key] = counts.get(key, 0) + B
                seen += B
                if seen >= budget:
                    break
        finally:
            set_rng_state(rng)
        gathered = _gather((sums, counts), self.world)
        tot_s: dict[str, float] = {}
        tot_c: dict[str, int] = {}
        for s, c in gathered:
            for k in s:
                tot_s[k] = tot_s.get(k, 0.0) + s[k]
                tot_c[k] = tot_c.get(k, 0) + c[k]
        out = {f"val.{k}": tot_s[k] / tot_c[k] for k in sorted(tot_s) if tot_c[k]}
        losses = [out[k] for k in ("val.ar.loss", "val.nar.loss") if k in out]
        if losses:
            out["val.loss"] = sum(losses) / len(losses)
            self.val_loss = out["val.loss"]
        if self.is_main and out:
            logger.info("validation at step %d: %s", self.step,
                        ", ".join(f"{k}={v:.4f}" for k, v in out.items()))
        n_synth = int(getattr(self.cfg.evaluation, "synthesize", 0))
        if n_synth > 0 and synthesize:
            if self.is_main and all(e.backend == "local" for e in self.engines.values()):
                batches = [("val", first_batch)] if first_batch is not None else []
                if self.last_batch is not None:
                    batches.append(("train", self.last_batch))
                synthesize_samples(self.models, self.meta, batches, n_synth, self.log_dir / "eval" / str(self.step),
                                   self.cfg, self.device)
            _barrier(self.world)
        return out

    # ------------------------------------------------------------------ metrics
    def _elapsed(self) -> float:
        return self.elapsed + (time.monotonic() - self._t0)

    def _record(self, results: dict[str, Any], extra: dict[str, float]) -> dict[str, Any] | None:
        """Combine this step's results across networks and ranks into one metrics record (rank 0)."""
        local = {n: (r.loss, r.stats, r.grad_norm, r.lr) for n, r in results.items()}
        per_rank = _gather(local, self.world)
        if not self.is_main:
            return None
        multi = len(results) > 1
        rec: dict[str, Any] = {"step": self.step}
        if self.parts.n_train:
            rec["epoch"] = self.samples / self.parts.n_train
        total_loss, norms = 0.0, []
        stats_out: dict[str, float] = {}
        for n in results:
            loss = sum(pr[n][0] for pr in per_rank) / len(per_rank)
            stats = mean_stats([pr[n][1] for pr in per_rank])
            total_loss += loss
            gn, lr = per_rank[0][n][2], per_rank[0][n][3]
            norms.append(gn)
            if multi:
                rec[f"{n}.loss"], rec[f"{n}.grad_norm"], rec[f"{n}.lr"] = loss, gn, lr
            for k, v in stats.items():
                key = f"{n}.{k}" if multi and "." not in k else k
                if key.endswith(".tokens"):
                    stats_out[key] = stats_out.get(key, 0.0) + v
                elif key not in stats_out or key.startswith(n + "."):
                    stats_out[key] = v
        stats_out.pop("loss", None)
        rec["loss"] = total_loss
        rec.update(stats_out)
        rec["lr"] = next(iter(results.values())).lr
        scales = [r.loss_scale for r in results.values() if r.loss_scale is not None]
        if scales:
            rec["loss_scale"] = min(scales)
        rec["grad_norm"] = math.sqrt(sum(g * g for g in norms)) if multi else norms[0]
        now = time.monotonic()
        rec.update({"tokens_processed": self.tokens, "samples_processed": self.samples,
                    "elapsed": round(self._elapsed(), 3),
                    "it_per_s": round((self.step - self._last_log_step) / max(1e-9, now - self._last_log_t), 4),
                    "skipped_nan": self.skipped_nan, "skipped_oom": self.skipped_oom})
        rec.update(extra)
        self._last_log_step, self._last_log_t = self.step, now
        return rec

    # ------------------------------------------------------------------ commands
    def _handle(self, line: str) -> bool:
        """Act on one command line; True means quit."""
        cmd = parse_command(line)
        if cmd is None:
            return False
        name, arg = cmd
        tr = self.cfg.trainer
        if name == "save":
            self.save("requested")
            if tr.export_on_save:
                self.export()
        elif name == "export":
            self.save("export requested")
            self.export()
        elif name == "eval":
            out = self.evaluate()
            if out:
                self.metrics.write({"step": self.step, **out})
        elif name == "lr":
            try:
                value = float(arg)
                for n, eng in self.engines.items():
                    msg = eng.set_lr(value, self.step)
                    if self.is_main:
                        logger.info("%s: %s", n, msg)
            except (ValueError, UserError) as e:
                if self.is_main:
                    logger.error("lr: %s (usage: lr 1e-4)", e if isinstance(e, UserError) else f"bad value {arg!r}")
        elif name == "time":
            if self.is_main:
                done = self.step - self._start_step
                left = self.cfg.trainer.iterations - self.step
                secs = (time.monotonic() - self._t0) / done * left if done else float("nan")
                logger.info("step %d of %d; about %s left", self.step, self.cfg.trainer.iterations,
                            "unknown" if not math.isfinite(secs) else _humanize(secs))
        elif name == "quit":
            return True
        else:
            if self.is_main:
                logger.info("%s%s", "" if name == "help" else f"unknown command {name!r}; ", HELP)
        return False

    def _quit(self, why: str) -> None:
        tr = self.cfg.trainer
        if tr.save_on_quit:
            self.save(why)
        if tr.export_on_quit:
            self.export()

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        try:
            self._setup()
            return self._loop()
        finally:
            for eng in getattr(self, "engines", {}).values():
                eng.close()
            if hasattr(self, "metrics"):
                self.metrics.close()
            root = logging.getLogger("vall_e")
            for h in getattr(self, "_handlers", []):
                root.removeHandler(h)
                h.close()
            if hasattr(self, "_log_saved"):
                root.setLevel(self._log_saved[0])
                root.propagate = self._log_saved[1]

    def _schedule_position(self, control: Controller) -> int:
        """The step the LR schedule is evaluated at. `schedule_clock: time` moves it by the share of
        `trainer.max_minutes` spent as well, so a run that the time budget ends still finishes its
        schedule (a plan sized from a step time measured up front is always a guess on a shared
        machine). Rank 0's clock decides; every rank uses the same position."""
        tr = self.cfg.trainer
        if self.cfg.hyperparameters.schedule_clock != "time" or not tr.max_minutes:
            return self.step
        by_time = 0
        if self.is_main:
            spent = (time.monotonic() - self._t0) / (60 * tr.max_minutes)
            by_time = int(min(1.0, spent) * tr.iterations)
        return max(self.step, control.agree_max(by_time))

    def _loop(self) -> int:
        cfg, tr = self.cfg, self.cfg.trainer
        eval_freq = int(cfg.evaluation.frequency)
        save_freq = int(tr.save_frequency) or eval_freq
        log_freq = max(1, int(tr.log_frequency))
        self._t0 = self._last_log_t = time.monotonic()
        self._start_step = self._last_log_step = self.step
        bad_in_a_row = 0
        with SignalHandler() as signals:
            control = Controller(signals, self.rank, self.world, self.read_stdin and self.is_main, self.device)
            bar = ProgressBar(tr.iterations, self.step, enabled=self.is_main)
            if self.is_main and self.step < tr.iterations:
                logger.info("training %s from step %d to %d (type `help` for commands)", self.name, self.step,
                            tr.iterations)
            if eval_freq and self.step == 0 and tr.iterations > 0:
                base = self.evaluate(synthesize=False)  # the untrained baseline, so validation curves start at step 0
                if base:
                    self.metrics.write({"step": 0, **base})
            try:
                while self.step < tr.iterations:
                    micro = [self._next_batch() for _ in range(self.ga)]
                    position = self._schedule_position(control)
                    results = {n: eng.train_step(micro, position) for n, eng in self.engines.items()}
                    samples, tokens = self._count(micro)
                    self.samples += samples
                    self.tokens += tokens
                    self.last_batch = micro[-1]
                    if any(r.skipped_oom for r in results.values()):
                        self.skipped_oom += 1
                    elif any(r.skipped_nan for r in results.values()) and \
                            all(e.backend == "local" for e in self.engines.values()):
                        self.skipped_nan += 1
                        bad_in_a_row += 1
                        if self.is_main:
                            logger.warning("step %d: loss or gradients are NaN/inf, step skipped (%d so far)",
                                           self.step + 1, self.skipped_nan)
                        if bad_in_a_row >= MAX_BAD_STEPS:
                            raise UserError(f"loss or gradients NaN/inf for {MAX_BAD_STEPS} steps in a row; "
                                            "lower hyperparameters.learning_rate or use weight_dtype=bfloat16")
                    else:
                        if any(r.skipped_nan for r in results.values()):
                            self.skipped_nan += 1  # DeepSpeed: counted, its step went ahead with a zero loss
                        bad_in_a_row = 0
                        self.step += 1
                        extra = self.evaluate() if eval_freq and self.step % eval_freq == 0 else {}
                        if self.step % log_freq == 0 or extra:
                            rec = self._record(results, extra)
                            if rec is not None:
                                self.metrics.write(rec)
                                bar.update(self.step, rec["loss"], rec["lr"])
                        if save_freq and self.step % save_freq == 0:
                            self.save("autosave")
                            if tr.export_on_save:
                                self.export()
                        # rank 0's clock decides, and every rank stops at the same step
                        if tr.max_minutes and control.agree(
                                self.is_main and time.monotonic() - self._t0 >= 60 * tr.max_minutes):
                            if self.is_main:
                                logger.info("time budget of %g min reached at step %d", tr.max_minutes, self.step)
                            break
                    lines, stop = control.poll()
                    quit_now = False
                    for line in lines:
                        if self.is_main:
                            logger.info("command: %s", line.strip())
                        if self._handle(line):
                            quit_now = True
                            break
                    if quit_now or stop:
                        why = "quit" if quit_now else (signals.signal_name or "signal")
                        self._quit(why)
                        if self.is_main:
                            logger.info("stopped at step %d (%s)", self.step, why)
                        return 0
                # finished
                self.save("finished")
                if tr.export_on_quit or tr.export_on_save:
                    self.export()
                if self.is_main:
                    logger.info("finished %d steps", self.step)
                return 0
            finally:
                bar.close()


def _humanize(secs: float) -> str:
    secs = int(secs)
    d, rem = divmod(secs, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    parts = [f"{d}d"] if d else []
    parts += [f"{h}h"] if h or d else []
    parts += [f"{m}m", f"{s}s"]
    return " ".join(parts)


def main(argv: Sequence[str] | None = None, builder: Builder | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vall_e.train",
                                     description="Train a VALL-E model. Type `help` while it runs for live commands.")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    cfg, _ = parse_config(argv, parser)
    return Trainer(cfg, builder=builder).run()
