"""Training: engines, schedules, checkpoints and exact resume, live control, signals, DDP.

Most tests use a tiny stand-in network and dataset defined here (fast, and able to inject NaN
losses and out-of-memory errors); the end-to-end tests at the bottom run the real `VALLE` on a
generated corpus through `python -m vall_e.train`.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vall_e.config import load_config
from vall_e.models.weights import split_weights
from vall_e.training.engines.checkpoint import find_checkpoint, load_checkpoint, read_latest, save_checkpoint, step_dirs
from vall_e.training.engines.local import LocalEngine
from vall_e.training.engines.metrics_log import iter_metrics
from vall_e.training.engines.optim import LRSchedule, lr_factor, set_lr
from vall_e.training.trainer import TIMING_KEYS, Trainer, TrainingParts
from vall_e.utils.errors import UserError

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# ==============================================================================================
# Stand-ins: a tiny VALLE-shaped network and dataset
# ==============================================================================================

@dataclass
class TinyConfig:
    kind: str = "ar+nar"
    n_levels: int = 2
    n_codes: int = 8
    n_text: int = 16
    d: int = 16
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TinyConfig":
        return cls(**d)


class Body(nn.Module):
    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self.fc1, self.fc2, self.drop = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.drop(F.gelu(self.fc1(x))))


class TinyVALLE(nn.Module):
    """forward(batch) -> (loss, stats) like VALLE; `levels` in the batch forces target levels.
    A batch with `poison` gives a NaN loss; one with `oom` raises an out-of-memory error."""

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        c = self.config = config
        self.text_emb = nn.Embedding(c.n_text, c.d)
        self.code_emb = nn.Embedding(c.n_levels * c.n_codes, c.d)
        self.level_emb = nn.Embedding(c.n_levels, c.d)
        self.pos_emb = nn.Embedding(64, c.d)
        self.body = Body(c.d, c.dropout)
        self.heads = nn.ModuleList(nn.Linear(c.d, c.n_codes) for _ in range(c.n_levels))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TinyVALLE":
        return cls(TinyConfig.from_dict(d))

    def _levels(self, B: int) -> torch.Tensor:
        c = self.config
        if c.kind == "ar":
            return torch.zeros(B, dtype=torch.long)
        if c.kind == "nar":
            return torch.randint(1, c.n_levels, (B,))
        return torch.randint(0, c.n_levels, (B,))

    def logits(self, batch: dict[str, Any], levels: torch.Tensor) -> list[torch.Tensor]:
        c, out = self.config, []
        for i, k in enumerate(levels.tolist()):
            codes = batch["resps"][i].long()
            T = codes.shape[0]
            x = self.text_emb(batch["text"][i]).mean(0) + self.level_emb.weight[k] + self.pos_emb.weight[:T]
            for j in range(k):
                x = x + self.code_emb(codes[:, j] + j * c.n_codes)
            out.append(self.heads[k](self.body(x)))
        return out

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.get("oom"):
            raise torch.OutOfMemoryError("CUDA out of memory. (simulated)")
        B = len(batch["text"])
        levels = batch.get("levels")
        levels = self._levels(B) if levels is None else torch.as_tensor(levels).reshape(B).cpu()
        logits = self.logits(batch, levels)
        targets = [batch["resps"][i][:, k].long() for i, k in enumerate(levels.tolist())]
        lg, tg = torch.cat(logits), torch.cat(targets)
        tok_level = torch.cat([torch.full((len(t),), k) for t, k in zip(targets, levels.tolist())])
        ce = F.cross_entropy(lg.float(), tg, reduction="none")
        loss = ce.mean()
        if batch.get("poison"):
            loss = loss * float("nan")
        stats = {"loss": float(loss.detach()), "nll": float(ce.detach().mean())}
        top = lg.topk(min(3, lg.shape[-1]), -1).indices
        for name, sel in (("ar", tok_level == 0), ("nar", tok_level > 0)):
            if sel.any():
                stats[f"{name}.acc"] = float((top[sel, 0] == tg[sel]).float().mean())
                stats[f"{name}.acc10"] = float((top[sel] == tg[sel, None]).any(-1).float().mean())
        return loss, stats


class TinyData(Dataset):
    """Deterministic items whose codes follow the text (so the loss can fall)."""

    def __init__(self, n: int, cfg: TinyConfig, seed: int = 0, poison: tuple[int, ...] = (),
                 oom: tuple[int, ...] = (), delay: float = 0.0) -> None:
        self.delay = delay  # seconds per item: slows a subprocess down enough to kill it mid-run
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            text = torch.randint(1, cfg.n_text, (4,), generator=g)
            T = 6
            base = int(text.sum())
            resps = torch.stack([(base + 3 * k + torch.arange(T) % 2) % cfg.n_codes for k in range(cfg.n_levels)], 1)
            self.items.append({"text": text, "lang": 0, "prompt": resps[:2].clone(), "resps": resps,
                               "poison": i in poison, "oom": i in oom})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, epoch, position = key
        if self.delay:
            time.sleep(self.delay)
        return {**self.items[index], "epoch": epoch, "position": position}


class TinySampler:
    """Shuffled fixed-size batches per epoch with a resumable (epoch, position)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.bs, self.seed, self.rank, self.world, self.shuffle = n, batch_size, seed, rank, world, shuffle
        self.epoch = self.position = 0

    def _batches(self, epoch: int) -> list[list[int]]:
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch)).tolist()
                 if self.shuffle else list(range(self.n)))
        batches = [order[i:i + self.bs] for i in range(0, self.n - self.bs + 1, self.bs)]
        return batches[self.rank::self.world]

    def __len__(self) -> int:
        return len(self._batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def __iter__(self):
        batches = self._batches(self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self._batches(self.epoch)
        epoch = self.epoch
        while self.position < len(batches):
            pos = self.position
            self.position = pos + 1
            yield [(i, epoch, pos + 1) for i in batches[pos]]
        self.epoch, self.position = epoch + 1, 0

    def state_dict(self, batch: dict[str, Any] | None = None) -> dict[str, int]:
        if batch is not None:
            return {"epoch": int(batch["epoch"]), "position": int(batch["position"])}
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def tiny_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"text": [it["text"] for it in items], "lang": torch.tensor([it["lang"] for it in items]),
            "prompt": [it["prompt"] for it in items], "resps": [it["resps"] for it in items],
            "poison": any(it["poison"] for it in items), "oom": any(it["oom"] for it in items),
            "epoch": items[0]["epoch"], "position": items[0]["position"]}


def tiny_builder(kind: str = "ar+nar", n: int = 10, batch_size: int = 2, dropout: float = 0.1,
                 poison: tuple[int, ...] = (), oom: tuple[int, ...] = (), delay: float = 0.0):
    """A `Builder` for `Trainer` with stand-ins (n items, a 4-item validation set)."""

    def build(cfg: Any, rank: int, world: int, meta: dict[str, Any]) -> TrainingParts:
        names = ["ar+nar"] if kind == "ar+nar" else ["ar", "nar"]
        models = {nm: TinyVALLE(TinyConfig(kind=nm, dropout=dropout)) for nm in names}
        tc = TinyConfig()
        train = DataLoader(TinyData(n, tc, seed=1, poison=poison, oom=oom, delay=delay),
                           batch_sampler=TinySampler(n, batch_size, cfg.seed, rank, world), collate_fn=tiny_collate)
        val = DataLoader(TinyData(4, tc, seed=2), batch_sampler=TinySampler(4, 2, 0, rank, world, shuffle=False),
                         collate_fn=tiny_collate)
        return TrainingParts(models, train, val, n_train=n,
                             meta={"symmap": json.dumps({"a": 4}), "langmap": json.dumps({"en": 0}),
                                   "codec": {"name": "test", "n_levels": 2}})

    return build


def make_cfg(root: Path, **overrides: Any):
    base = {
        "cfg_path": str(root), "device": "cpu", "model.name": "tiny",
        "trainer.iterations": 6, "trainer.save_frequency": 3, "trainer.keep_last_checkpoints": 0,
        "trainer.tensorboard": False, "evaluation.frequency": 2, "evaluation.size": 4, "evaluation.synthesize": 0,
        "hyperparameters.learning_rate": 0.01, "hyperparameters.scheduler": "cosine",
        "hyperparameters.warmup_steps": 2, "hyperparameters.batch_size": 2,
    }
    base.update(overrides)
    return load_config(None, {k: json.dumps(v) if not isinstance(v, str) else v for k, v in base.items()})


def run_tiny(root: Path, builder=None, **overrides: Any) -> Trainer:
    t = Trainer(make_cfg(root, **overrides), builder=builder or tiny_builder(), read_stdin=False)
    assert t.run() == 0
    return t


def records(root: Path, name: str = "tiny") -> list[dict[str, Any]]:
    return list(iter_metrics(root / "logs" / name / "metrics.jsonl"))


def ckpt_weights(root: Path, step: int, name: str = "tiny") -> dict[str, torch.Tensor]:
    return load_checkpoint(root / "ckpt" / name / str(step))[0]


# ==============================================================================================
# Optimizers and schedules
# ==============================================================================================

def test_schedules_warmup_then_decay() -> None:
    total, warm = 100, 10
    assert lr_factor(0, "cosine", total, warm) == pytest.approx(0.1)
    assert lr_factor(9, "cosine", total, warm) == pytest.approx(1.0)
    assert lr_factor(10, "cosine", total, warm, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, "cosine", total, warm, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, "cosine", total, warm, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, "linear", total, warm, 0.2) == pytest.approx(0.2)
    assert lr_factor(50, "constant", total, warm) == 1.0
    one = [lr_factor(s, "onecycle", total) for s in range(total + 1)]
    assert one[0] == pytest.approx(1 / 25) and max(one) == pytest.approx(1.0, abs=1e-3)
    assert one[-1] < 1e-4 and one.index(max(one)) == 30


def test_time_clock_finishes_the_schedule_when_the_budget_ends(tmp_path: Path) -> None:
    """A step count far beyond what the time budget allows: with `schedule_clock: time` the LR still
    decays to its floor by the end, with the step clock it never leaves the peak."""
    runs = {}
    for clock in ("time", "steps"):
        run_tiny(tmp_path / clock, tiny_builder(n=8, delay=0.03), **{
            "trainer.iterations": 100_000, "trainer.max_minutes": 0.02, "trainer.save_frequency": 0,
            "evaluation.frequency": 0, "hyperparameters.warmup_steps": 0, "hyperparameters.min_lr_ratio": 0.1,
            "hyperparameters.schedule_clock": clock})
        runs[clock] = [r["lr"] for r in records(tmp_path / clock) if "lr" in r]
    timed, stepped = runs["time"], runs["steps"]
    assert len(timed) >= 5 and all(b <= a for a, b in zip(timed, timed[1:]))
    assert timed[-1] < 0.3 * 0.01 and timed[0] > 0.8 * 0.01
    assert min(stepped) > 0.99 * 0.01
    with pytest.raises(UserError, match="max_minutes"):
        make_cfg(tmp_path, **{"hyperparameters.schedule_clock": "time"})


def test_lr_command_rescales_schedule_and_prodigy_gets_d_coef() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = LRSchedule(opt, "cosine", 100, 0, 0.1)
    sched.apply(50)
    set_lr(opt, sched, 0.1, 50)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert sched.apply(50) == pytest.approx(0.1)  # the schedule continues from the new value
    assert sched.apply(100) < 0.1
    fake_prodigy = torch.optim.SGD([p], lr=1.0)
    fake_prodigy.param_groups[0]["d_coef"] = 1.0
    set_lr(fake_prodigy, None, 0.5, 0)
    assert fake_prodigy.param_groups[0]["d_coef"] == 0.5 and fake_prodigy.param_groups[0]["lr"] == 1.0
    assert "d_coeff" not in fake_prodigy.param_groups[0]  # the reference's typo (docs/reference-differences.md #11)


def test_prodigy_optimizer_built_with_d_coef() -> None:
    pytest.importorskip("prodigyopt")
    from vall_e.training.engines.optim import build_optimizer

    cfg = make_cfg(Path("/tmp"), **{"hyperparameters.optimizer": "prodigy", "hyperparameters.learning_rate": 0.25})
    opt = build_optimizer([nn.Parameter(torch.zeros(2))], cfg.hyperparameters)
    assert opt.param_groups[0]["d_coef"] == 0.25 and opt.param_groups[0]["lr"] == 1.0


def test_missing_optional_optimizer_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vall_e.training.engines.optim import build_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = make_cfg(Path("/tmp"), **{"hyperparameters.optimizer": "adamw8bit"})
    with pytest.raises(UserError, match="bitsandbytes"):
        build_optimizer([nn.Parameter(torch.zeros(2))], cfg.hyperparameters)


# ==============================================================================================
# Engine: accumulation, NaN, OOM, precision
# ==============================================================================================

def _batch(ds: TinyData, idx: list[int]) -> dict[str, Any]:
    return tiny_collate([ds[(i, 0, 0)] for i in idx])


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    ds = TinyData(4, TinyConfig())
    levels = torch.tensor([0, 1, 1, 0])
    results = []
    for ga in (1, 2):
        torch.manual_seed(0)
        model = TinyVALLE(TinyConfig(dropout=0.0))
        cfg = make_cfg(tmp_path, **{"hyperparameters.optimizer": "sgd", "hyperparameters.learning_rate": 1.0,
                                    "hyperparameters.optimizer_params": {"momentum": 0.0}, "hyperparameters.weight_decay": 0.0,
                                    "hyperparameters.scheduler": "constant", "hyperparameters.warmup_steps": 0,
                                    "hyperparameters.gradient_clipping": 0.0})
        eng = LocalEngine("m", model, cfg, torch.device("cpu"), 10)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        if ga == 1:
            micro = [{**_batch(ds, [0, 1, 2, 3]), "levels": levels}]
        else:
            micro = [{**_batch(ds, [0, 1]), "levels": levels[:2]}, {**_batch(ds, [2, 3]), "levels": levels[2:]}]
        r = eng.train_step(micro, 0)
        assert not r.skipped and math.isfinite(r.grad_norm) and r.grad_norm > 0
        results.append({k: before[k] - v for k, v in model.state_dict().items()})  # = the gradient (lr 1)
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-6, rtol=1e-5)


def test_clipping_limits_the_update_and_reports_the_norm(tmp_path: Path) -> None:
    ds = TinyData(2, TinyConfig())
    torch.manual_seed(0)
    model = TinyVALLE(TinyConfig(dropout=0.0))
    cfg = make_cfg(tmp_path, **{"hyperparameters.optimizer": "sgd", "hyperparameters.learning_rate": 1.0,
                                "hyperparameters.optimizer_params": {"momentum": 0.0}, "hyperparameters.weight_decay": 0.0,
                                "hyperparameters.scheduler": "constant", "hyperparameters.warmup_steps": 0,
                                "hyperparameters.gradient_clipping": 0.01})
    eng = LocalEngine("m", model, cfg, torch.device("cpu"), 10)
    before = [p.clone() for p in model.parameters()]
    r = eng.train_step([_batch(ds, [0, 1])], 0)
    step = torch.sqrt(sum(((b - p) ** 2).sum() for b, p in zip(before, model.parameters())))
    assert r.grad_norm > 0.01  # the reported norm is the norm before clipping
    assert float(step.detach()) == pytest.approx(0.01, rel=1e-3)


def test_bf16_autocast_trains_on_cpu(tmp_path: Path) -> None:
    ds = TinyData(2, TinyConfig())
    model = TinyVALLE(TinyConfig(dropout=0.0))
    cfg = make_cfg(tmp_path, **{"trainer.weight_dtype": "bfloat16", "trainer.amp": True,
                                "trainer.activation_checkpointing": True})
    eng = LocalEngine("m", model, cfg, torch.device("cpu"), 10)
    assert model.body.gradient_checkpointing is True
    r = eng.train_step([_batch(ds, [0, 1])], 0)
    assert not r.skipped and math.isfinite(r.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # amp keeps fp32 master weights


def test_fp16_with_grad_scaler_trains_and_resumes_exactly(tmp_path: Path) -> None:
    over = {"trainer.weight_dtype": "float16", "trainer.amp": True, "evaluation.frequency": 0}
    run_tiny(tmp_path / "a", **over, **{"trainer.iterations": 6})
    run_tiny(tmp_path / "b", **over, **{"trainer.iterations": 3})
    run_tiny(tmp_path / "b", **over, **{"trainer.iterations": 6})
    recs = records(tmp_path / "a")
    assert [r["step"] for r in recs] == list(range(1, 7)) and recs[-1]["skipped_nan"] == 0
    assert all("loss_scale" in r for r in recs)
    state = load_checkpoint(tmp_path / "b" / "ckpt" / "tiny" / "6")[1]
    assert state["engines"]["ar+nar"]["scaler"]["scale"] == recs[-1]["loss_scale"]
    a, b = ckpt_weights(tmp_path / "a", 6), ckpt_weights(tmp_path / "b", 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deepspeed_config_and_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vall_e.training.engines import build_engine
    from vall_e.training.engines.deepspeed import build_ds_config

    cfg = make_cfg(tmp_path, **{"trainer.backend": "deepspeed", "trainer.weight_dtype": "bfloat16",
                                "trainer.deepspeed.zero_optimization_level": 2,
                                "hyperparameters.gradient_accumulation_steps": 4, "hyperparameters.batch_size": 3,
                                "trainer.deepspeed.config": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}},
                                                             "steps_per_print": 5}})
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 3 * 4 * 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["overlap_comm"] and ds["steps_per_print"] == 5
    assert ds["gradient_clipping"] == cfg.hyperparameters.gradient_clipping
    assert "optimizer" not in ds  # our torch optimizer is passed to deepspeed.initialize
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(UserError, match="pip install vall-e\\[deepspeed\\]"):
        build_engine("m", TinyVALLE(TinyConfig()), cfg, torch.device("cpu"), 10)


def test_build_models_kinds_sizes_and_checks(tmp_path: Path) -> None:
    from vall_e.models.build import build_models

    cfg = make_cfg(tmp_path, **{"model.size": "tiny", "model.d_model": 32, "model.n_heads": 2, "model.n_layers": 1,
                                "model.n_levels": 2, "model.n_codes": 16, "model.n_text_tokens": 10,
                                "model.kind": "ar,nar", "model.p_ar": 0.0})
    models = build_models(cfg.model, 10, 1)
    assert {n: m.config.kind for n, m in models.items()} == {"ar": "ar", "nar": "nar"}
    assert models["ar"].config.d_model == 32 and models["ar"].config.p_ar == 0.0  # 0 = 1/n_levels
    with pytest.raises(UserError, match="n_text_tokens=10 is too small"):
        build_models(cfg.model, 11, 1)
    cfg.model.frozen_params = ["nonexistent"]
    with pytest.raises(UserError, match="frozen_params"):
        build_models(cfg.model, 10, 1)
    cfg.model.frozen_params = ["nar.text_emb"]  # a prefix may name the network
    models = build_models(cfg.model, 10, 1)
    assert not models["nar"].text_emb.weight.requires_grad and models["ar"].text_emb.weight.requires_grad
    cfg.model.frozen_params = []
    cfg.bitsandbytes.linear, cfg.bitsandbytes.bitnet = True, True
    from vall_e.models.bitlinear import BitLinear

    models = build_models(cfg.model, 10, 1, cfg.bitsandbytes)
    assert any(isinstance(m, BitLinear) for m in models["ar"].backbone.modules())


def test_endless_nan_losses_stop_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vall_e.training.trainer as train_mod

    monkeypatch.setattr(train_mod, "MAX_BAD_STEPS", 5)
    with pytest.raises(UserError, match="NaN/inf for 5 steps"):
        run_tiny(tmp_path, tiny_builder(poison=tuple(range(10)), n=10), **{"trainer.iterations": 2})


def test_nan_batch_is_skipped_and_weights_stay_finite(tmp_path: Path) -> None:
    builder = tiny_builder(n=10, poison=(3,))
    t = run_tiny(tmp_path, builder, **{"trainer.iterations": 8, "evaluation.frequency": 0})
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert recs[-1]["skipped_nan"] >= 1  # item 3 is met at least once in 8+ batches of 2 out of 10
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert all(torch.isfinite(p).all() for m in t.models.values() for p in m.parameters())


def test_oom_batch_is_skipped_and_counted(tmp_path: Path) -> None:
    t = run_tiny(tmp_path, tiny_builder(n=10, oom=(3,)), **{"trainer.iterations": 8, "evaluation.frequency": 0})
    recs = records(tmp_path)
    assert recs[-1]["step"] == 8 and recs[-1]["skipped_oom"] >= 1
    assert t.skipped_oom == recs[-1]["skipped_oom"]


# ==============================================================================================
# Training loop, metrics, checkpoints, exact resume
# ==============================================================================================

REQUIRED = {"step", "loss", "nll", "lr", "grad_norm", "tokens_processed", "samples_processed", "elapsed",
            "it_per_s", "skipped_nan", "skipped_oom", "epoch"}


def test_training_lowers_loss_and_writes_metrics(tmp_path: Path) -> None:
    run_tiny(tmp_path, tiny_builder(n=8, dropout=0.0), **{
        "trainer.iterations": 40, "evaluation.frequency": 20, "trainer.save_frequency": 40,
        "hyperparameters.learning_rate": 0.03, "hyperparameters.scheduler": "constant"})
    recs = [r for r in records(tmp_path) if "loss" in r]
    assert len(recs) == 40 and all(REQUIRED <= set(r) for r in recs)
    assert recs[-1]["samples_processed"] == 80 and recs[-1]["tokens_processed"] == 80 * (4 + 6)
    assert any(k in recs[-1] for k in ("ar.acc", "nar.acc"))
    first = sum(r["loss"] for r in recs[:5]) / 5
    last = sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.6 * first
    vals = [r for r in recs if "val.loss" in r]
    assert [r["step"] for r in vals] == [20, 40]
    assert {"val.ar.loss", "val.nar.loss", "val.ar.acc", "val.nar.acc", "val.ar.acc10"} <= set(vals[0])
    assert vals[1]["val.loss"] < vals[0]["val.loss"]


def test_evaluation_is_repeatable_and_leaves_training_untouched(tmp_path: Path) -> None:
    t = run_tiny(tmp_path / "a", **{"trainer.iterations": 4, "evaluation.size": 2})  # part of the 4-item set
    rng = torch.get_rng_state()
    first, second = t.evaluate(), t.evaluate()
    assert first == second and "val.loss" in first
    assert torch.equal(rng, torch.get_rng_state())
    run_tiny(tmp_path / "b", **{"trainer.iterations": 4, "evaluation.frequency": 0})
    a, b = ckpt_weights(tmp_path / "a", 4), ckpt_weights(tmp_path / "b", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)  # evaluating every 2 steps changed nothing


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_tiny(straight, **{"trainer.iterations": 6})
    run_tiny(split, **{"trainer.iterations": 3})
    assert read_latest(split / "ckpt" / "tiny") == 3
    run_tiny(split, **{"trainer.iterations": 6})  # a new Trainer resumes from step 3
    a, b = ckpt_weights(straight, 6), ckpt_weights(split, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]  # noqa: E731
    assert strip(records(straight)) == strip(records(split))
    assert [r["step"] for r in records(split)] == [0, 1, 2, 3, 4, 5, 6]  # step 0: the baseline evaluation


def test_resume_after_metrics_ran_ahead_drops_the_extra_lines(tmp_path: Path) -> None:
    run_tiny(tmp_path, **{"trainer.iterations": 5})  # checkpoints at 3 and 5 (final)
    run_dir = tmp_path / "ckpt" / "tiny"
    (run_dir / "latest").write_text("3\n")  # as if killed after logging step 5 but before saving it
    import shutil

    shutil.rmtree(run_dir / "5")
    with open(tmp_path / "logs" / "tiny" / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.0')  # a cut-off line
    run_tiny(tmp_path, **{"trainer.iterations": 5})
    steps = [r["step"] for r in records(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]


def test_keep_last_and_latest(tmp_path: Path) -> None:
    run_tiny(tmp_path, **{"trainer.iterations": 5, "trainer.save_frequency": 1, "trainer.keep_last_checkpoints": 2,
                          "evaluation.frequency": 0})
    run_dir = tmp_path / "ckpt" / "tiny"
    assert step_dirs(run_dir) == [4, 5] and read_latest(run_dir) == 5
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    state = load_checkpoint(run_dir / "5")[1]
    assert state["step"] == 5 and state["samples"] == 10 and "optimizer" in state["engines"]["ar+nar"]


def test_latest_naming_a_missing_folder_falls_back_with_a_log_line(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    for s in (2, 4):
        save_checkpoint(run_dir, s, {"m.w": torch.ones(2) * s}, {"step": s})
    import shutil

    shutil.rmtree(run_dir / "4")
    with caplog.at_level("WARNING"):
        assert find_checkpoint(run_dir) == run_dir / "2"
    assert "names step 4" in caplog.text and "step 2" in caplog.text
    shutil.rmtree(run_dir / "2")
    with pytest.raises(UserError, match="latest"):
        find_checkpoint(run_dir)
    (run_dir / "latest").unlink()
    assert find_checkpoint(run_dir) is None


def test_leftovers_of_a_killed_save_are_cleaned_and_ignored(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, 1, {"m.w": torch.ones(2)}, {"step": 1})
    (run_dir / ".2.k3j4.tmp").mkdir()  # killed while writing step 2
    (run_dir / ".2.k3j4.tmp" / "model.safetensors").write_bytes(b"partial")
    (run_dir / ".latest.abcd.tmp").write_text("2")
    (run_dir / ".1.old").mkdir()
    (run_dir / ".model.safetensors.x.tmp.safetensors").write_bytes(b"partial")
    assert find_checkpoint(run_dir) == run_dir / "1"  # the leftovers are never mistaken for checkpoints
    save_checkpoint(run_dir, 3, {"m.w": torch.ones(2)}, {"step": 3})
    assert sorted(p.name for p in run_dir.iterdir()) == ["1", "3", "latest"]


def test_tampered_or_truncated_checkpoint_is_a_user_error_naming_the_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    d = save_checkpoint(run_dir, 1, {"m.w": torch.arange(100.0)}, {"step": 1, "x": [1, 2]})
    w, st = load_checkpoint(d)
    assert torch.equal(w["m.w"], torch.arange(100.0)) and st["x"] == [1, 2]
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.safetensors"):
        load_checkpoint(d)
    d = save_checkpoint(run_dir, 2, {"m.w": torch.zeros(3)}, {"step": 2})
    (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:50])
    with pytest.raises(UserError, match="state.pt"):
        load_checkpoint(d)
    # a pickle that would run code, with a manifest "fixed" to match: refused by weights_only loading
    d = save_checkpoint(run_dir, 3, {"m.w": torch.zeros(3)}, {"step": 3})

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"format": "vall-e-checkpoint", "evil": Evil()}, d / "state.pt")
    man = json.loads((d / "manifest.json").read_text())
    import hashlib

    man["files"]["state.pt"] = {"size": (d / "state.pt").stat().st_size,
                                "sha256": hashlib.sha256((d / "state.pt").read_bytes()).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(UserError, match="state.pt"):
        load_checkpoint(d)
    assert not (tmp_path / "pwned").exists()


def test_resume_from_tampered_checkpoint_fails_cleanly(tmp_path: Path) -> None:
    run_tiny(tmp_path, **{"trainer.iterations": 3})
    f = tmp_path / "ckpt" / "tiny" / "3" / "state.pt"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(UserError, match="state.pt"):
        run_tiny(tmp_path, **{"trainer.iterations": 6})


def test_two_networks_ar_nar_train_save_and_resume(tmp_path: Path) -> None:
    b = tiny_builder(kind="ar,nar")
    run_tiny(tmp_path, b, **{"trainer.iterations": 3})
    run_tiny(tmp_path, b, **{"trainer.iterations": 4})
    w = ckpt_weights(tmp_path, 4)
    per = split_weights(w, ["ar", "nar"])
    assert per["ar"].keys() == per["nar"].keys()
    rec = records(tmp_path)[-1]
    assert {"ar.loss", "nar.loss", "ar.grad_norm", "nar.lr"} <= set(rec)
    val = [r for r in records(tmp_path) if "val.loss" in r][-1]
    assert "val.ar.loss" in val and "val.nar.loss" in val


def test_frozen_params_do_not_change(tmp_path: Path) -> None:
    from vall_e.models.build import freeze_params

    def builder(cfg, rank, world, meta):
        parts = tiny_builder()(cfg, rank, world, meta)
        for name, m in parts.models.items():
            freeze_params(m, list(cfg.model.frozen_params), name)
        return parts

    torch.manual_seed(0)
    t = run_tiny(tmp_path, builder, **{"model.frozen_params": ["text_emb", "ar+nar.heads.0"],
                                       "trainer.iterations": 3})
    m = t.models["ar+nar"]
    assert not m.text_emb.weight.requires_grad and not m.heads[0].weight.requires_grad
    torch.manual_seed(0)
    fresh = TinyVALLE(TinyConfig())
    assert torch.equal(m.text_emb.weight, fresh.text_emb.weight)
    assert torch.equal(m.heads[0].weight, fresh.heads[0].weight)
    assert not torch.equal(m.heads[1].weight, fresh.heads[1].weight)


def test_load_state_dict_starts_from_exported_weights(tmp_path: Path) -> None:
    t = run_tiny(tmp_path, **{"trainer.iterations": 3})
    t.export()
    exported = {k: v.clone() for k, v in t.models["ar+nar"].state_dict().items()}
    other = tmp_path / "other"
    (other / "ckpt" / "tiny").mkdir(parents=True)
    (other / "ckpt" / "tiny" / "model.safetensors").write_bytes(
        (tmp_path / "ckpt" / "tiny" / "model.safetensors").read_bytes())
    t2 = Trainer(make_cfg(other, **{"trainer.load_state_dict": True, "trainer.iterations": 0}),
                 builder=tiny_builder(), read_stdin=False)
    assert t2.run() == 0
    assert t2.step == 0
    for k, v in t2.models["ar+nar"].state_dict().items():
        assert torch.equal(v, exported[k])


# ==============================================================================================
# Live control and signals (subprocesses)
# ==============================================================================================

SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from tests.test_train import tiny_builder
from vall_e.utils.errors import run_main
from vall_e.training.trainer import main
run_main(lambda argv: main(argv, builder=tiny_builder(n=10, delay={delay})), sys.argv[1:])
"""


def _start(tmp_path: Path, *args: str, delay: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "run_tiny.py"
    script.write_text(SCRIPT.format(repo=str(REPO), delay=delay))
    (tmp_path / "config.yaml").write_text(
        "device: cpu\nmodel: {name: tiny}\ntrainer: {iterations: 1000000, save_frequency: 0, tensorboard: false, "
        "keep_last_checkpoints: 0}\nevaluation: {frequency: 0, synthesize: 0}\n"
        "hyperparameters: {batch_size: 2, scheduler: constant, learning_rate: 0.001}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([PY, str(script), f"yaml={tmp_path / 'config.yaml'}", *args], cwd=str(tmp_path),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stdout.read().decode()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out: {proc.stdout.read().decode()[-3000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_saves_and_exits_zero_then_resumes(tmp_path: Path, sig: signal.Signals) -> None:
    proc = _start(tmp_path)
    try:
        _wait_for(lambda: len(records(tmp_path)) >= 3, proc)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()[-3000:]
    run_dir = tmp_path / "ckpt" / "tiny"
    last = read_latest(run_dir)
    assert last is not None and last >= 3
    assert load_checkpoint(run_dir / str(last))[1]["step"] == last
    # and it resumes from there
    run_tiny(tmp_path, **{"trainer.iterations": last + 2, "evaluation.frequency": 0})
    assert read_latest(run_dir) == last + 2


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """Killed without warning after its step-10 checkpoint (and possibly some steps later), the run
    resumed to step 20 has the same weights and metrics as 20 steps straight."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed.mkdir()
    overrides = {"trainer.save_frequency": 10, "hyperparameters.scheduler": "constant", "evaluation.frequency": 0}
    proc = _start(killed, "trainer.save_frequency=10", delay=0.01)
    try:
        _wait_for(lambda: read_latest(killed / "ckpt" / "tiny") is not None, proc)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert read_latest(killed / "ckpt" / "tiny") == 10
    cfg_over = {**overrides, "hyperparameters.learning_rate": 0.001, "hyperparameters.warmup_steps": 0,
                "trainer.iterations": 20}
    run_tiny(killed, **cfg_over)
    run_tiny(straight, **cfg_over)
    a, b = ckpt_weights(straight, 20), ckpt_weights(killed, 20)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]  # noqa: E731
    assert strip(records(straight)) == strip(records(killed))


# ==============================================================================================
# DDP: two CPU processes over gloo
# ==============================================================================================

DDP_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
torch.set_num_threads(1)
from safetensors.torch import save_file
from tests.test_train import tiny_builder, make_cfg
from vall_e.training.trainer import Trainer
from pathlib import Path
root = Path(sys.argv[1])
t = Trainer(make_cfg(root, **{{"trainer.iterations": 4, "trainer.save_frequency": 2, "evaluation.frequency": 2}}),
            builder=tiny_builder(n=12), read_stdin=False)
assert t.run() == 0
sd = {{k: v.contiguous() for k, v in t.models["ar+nar"].state_dict().items()}}
save_file(sd, str(root / f"rank{{dist.get_rank()}}.safetensors"))
# time budget: only rank 0's clock counts, so ranks whose clocks disagree still stop at the same step
# (here rank 1 alone would train for 1000 minutes; before the fix rank 0 left and rank 1 hung)
budget = root / "budget"
cfg = make_cfg(budget, **{{"trainer.iterations": 50, "trainer.save_frequency": 0, "evaluation.frequency": 0}})
cfg.trainer.max_minutes = 1e-9 if dist.get_rank() == 0 else 1000.0
t = Trainer(cfg, builder=tiny_builder(n=12), read_stdin=False)
assert t.run() == 0
(root / f"budget_step_rank{{dist.get_rank()}}.txt").write_text(str(t.step))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                           str(tmp_path)], capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    from safetensors.torch import load_file

    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP kept the replicas identical
    ck = split_weights(ckpt_weights(tmp_path, 4), ["ar+nar"])["ar+nar"]
    assert all(torch.equal(ck[k], r0[k]) for k in r0)
    recs = [r for r in records(tmp_path) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["samples_processed"] == 4 * 2 * 2  # both ranks' samples are counted
    assert any("val.loss" in r for r in recs)
    state = load_checkpoint(tmp_path / "ckpt" / "tiny" / "4")[1]
    assert len(state["rng"]) == 2 and state["world_size"] == 2
    steps = {(tmp_path / f"budget_step_rank{r}.txt").read_text() for r in (0, 1)}
    assert steps == {"1"}, steps  # both ranks stopped together at rank 0's budget


# ==============================================================================================
# End to end with the real VALLE, dataset and `python -m vall_e.train`
# ==============================================================================================

E2E_PHONES = "a b d e f i k l m n o s t u".split()


def make_corpus(root: Path, speakers: int = 4, per_speaker: int = 6, n_codes: int = 32, seed: int = 0,
                codec: dict[str, Any] | None = None) -> Path:
    """Speaker folders of `.qnt.pt` + `.phn.txt` whose codes follow the phonemes (so they can be learnt);
    returns a YAML for a tiny 2-level model."""
    from vall_e.emb.codes import save_codes

    rng = random.Random(seed)
    dirs = []
    for s in range(speakers):
        d = root / f"grp{s % 2}" / f"spk{s}"
        d.mkdir(parents=True)
        dirs.append(f"grp{s % 2}/spk{s}")
        for u in range(per_speaker):
            phones = [rng.choice(E2E_PHONES) for _ in range(rng.randint(5, 9))]
            T = 6 * len(phones)
            ids = torch.tensor([E2E_PHONES.index(phones[t * len(phones) // T]) for t in range(T)])
            codes = torch.stack([(ids * 2 + k + s) % n_codes for k in range(2)], 1)
            save_codes(d / f"utt{u}.qnt.pt", codes, codec or {"name": "test", "frame_rate": 75.0, "n_levels": 2,
                                                              "n_codes": n_codes})
            (d / f"utt{u}.phn.txt").write_text(" ".join(phones), encoding="utf-8")
    y = root / "config.yaml"
    y.write_text(
        "device: cpu\n"
        f"dataset: {{training: [{', '.join(dirs)}], validation_fraction: 0.25, duration_range: [0.1, 10.0],\n"
        "  prompt_duration: 0.2, random_utterance: 1.0}\n"
        f"model: {{size: tiny, d_model: 32, n_heads: 2, n_layers: 1, n_levels: 2, n_codes: {n_codes},\n"
        "  n_text_tokens: 128, n_langs: 2, dropout: 0.0}\n"
        "hyperparameters: {batch_size: 4, learning_rate: 0.003, scheduler: constant}\n"
        "trainer: {iterations: 10, save_frequency: 0, keep_last_checkpoints: 2, tensorboard: false}\n"
        "evaluation: {frequency: 0, size: 8, batch_size: 4, synthesize: 0}\n")
    return y


def test_real_model_lowers_validation_loss(tmp_path: Path) -> None:
    from vall_e.training.trainer import main

    y = make_corpus(tmp_path)
    assert main([f"yaml={y}", "trainer.iterations=150", "evaluation.frequency=150"]) == 0
    name = load_config(y).model.full_name
    vals = [r for r in records(tmp_path, name) if "val.loss" in r]
    assert [r["step"] for r in vals] == [0, 150]
    assert vals[-1]["val.loss"] < 0.7 * vals[0]["val.loss"], vals
    assert {"val.ar.acc", "val.nar.acc", "val.ar.acc10", "val.nar.acc10"} <= set(vals[-1])
    train = [r for r in records(tmp_path, name) if "loss" in r]
    assert {"ar.acc", "nar.acc"} <= set().union(*train)
    # export, then the exported file reproduces the trained network's outputs
    from vall_e.models.model_file import load_exported
    from vall_e.training.export import main as export_main

    assert export_main([f"yaml={y}"]) == 0
    models, meta = load_exported(tmp_path / "ckpt" / name / "model.safetensors")
    weights, state = load_checkpoint(tmp_path / "ckpt" / name / "150")
    assert meta["stats"]["step"] == 150 and json.loads(meta["symmap"]) and meta["codec"]["n_levels"] == 2
    ck = split_weights(weights, ["ar+nar"])["ar+nar"]
    sd = models["ar+nar"].state_dict()
    assert all(torch.equal(sd[k], ck[k]) for k in ck)


def test_real_training_stdin_commands(tmp_path: Path) -> None:
    y = make_corpus(tmp_path)
    name = load_config(y).model.full_name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([PY, "-m", "vall_e.train", f"yaml={y}", "trainer.iterations=1000000",
                             "hyperparameters.scheduler=cosine"], cwd=str(tmp_path), env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "ckpt" / name
    try:
        _wait_for(lambda: len(records(tmp_path, name)) >= 2, proc, timeout=120)
        proc.stdin.write(b"lr 0.1\nsave\n")
        proc.stdin.flush()
        _wait_for(lambda: read_latest(run_dir) is not None, proc)
        _wait_for(lambda: any(r.get("lr") == pytest.approx(0.1, rel=1e-3) for r in records(tmp_path, name)), proc)
        proc.stdin.write(b"export\neval\ntime\nbogus\nquit\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "unknown command 'bogus'" in text and "left" in text  # `time` answers with the time left
    assert (run_dir / "model.safetensors").exists()
    recs = records(tmp_path, name)
    assert any("val.loss" in r and r["step"] > 0 for r in recs)  # the `eval` command
    last = read_latest(run_dir)
    state = load_checkpoint(run_dir / str(last))[1]
    assert state["step"] == last == [r for r in recs if "loss" in r][-1]["step"]  # quit saved where it stopped
    assert 0.099 < [r for r in recs if "loss" in r][-1]["lr"] <= 0.1  # cosine over 1e6 steps barely moves


def test_evaluation_synthesizes_wavs_with_the_tts_engine(tmp_path: Path, tiny_encodec_dir: Path) -> None:
    pytest.importorskip("vall_e.generation.tts")
    from vall_e.training.trainer import main

    spec = {"name": "encodec", "model": str(tiny_encodec_dir), "bandwidth": 1.5, "frame_rate": 75.0, "n_levels": 2}
    y = make_corpus(tmp_path, codec=spec)
    codec = ["codec.name=encodec", f"codec.model={tiny_encodec_dir}", "codec.bandwidth=1.5"]
    assert main([f"yaml={y}", "trainer.iterations=2", "evaluation.frequency=2", "evaluation.synthesize=1",
                 "evaluation.steps=10", *codec]) == 0
    name = load_config(y).model.full_name
    out = tmp_path / "logs" / name / "eval" / "2"
    wavs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.wav"))
    assert any(w.startswith("val/") and w.endswith(".hyp.wav") for w in wavs), wavs
    assert any(w.startswith("train/") and w.endswith(".ref.wav") for w in wavs), wavs


# ==============================================================================================
# GPU (skipped without CUDA): mixed precision and a real out-of-memory error
# ==============================================================================================

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_mixed_precision_trains_and_resumes(tmp_path: Path, dtype: str) -> None:
    over = {"device": "cuda", "trainer.weight_dtype": dtype, "trainer.amp": True}
    run_tiny(tmp_path / "a", **over, **{"trainer.iterations": 6})
    run_tiny(tmp_path / "b", **over, **{"trainer.iterations": 3})
    run_tiny(tmp_path / "b", **over, **{"trainer.iterations": 6})
    recs = [r for r in records(tmp_path / "a") if "loss" in r]
    assert recs[-1]["step"] == 6 and recs[-1]["skipped_nan"] == 0 and math.isfinite(recs[-1]["loss"])
    assert ("loss_scale" in recs[-1]) == (dtype == "float16")
    a, b = ckpt_weights(tmp_path / "a", 6), ckpt_weights(tmp_path / "b", 6)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


class _RealOOM(TinyVALLE):
    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.get("oom"):
            torch.empty(1 << 45, dtype=torch.uint8, device="cuda")  # 32 TiB
        return super().forward({**batch, "oom": False})


@cuda
def test_cuda_out_of_memory_batch_is_skipped(tmp_path: Path) -> None:
    def builder(cfg, rank, world, meta):
        parts = tiny_builder(oom=(3,))(cfg, rank, world, meta)
        parts.models = {n: _RealOOM(m.config) for n, m in parts.models.items()}
        return parts

    t = run_tiny(tmp_path, builder, **{"device": "cuda", "trainer.iterations": 8, "evaluation.frequency": 0})
    recs = records(tmp_path)
    assert recs[-1]["step"] == 8 and recs[-1]["skipped_oom"] >= 1 and t.skipped_oom == recs[-1]["skipped_oom"]
