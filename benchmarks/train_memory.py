"""Training memory of the low-VRAM switches, measured on this machine (CPU: peak RSS).

    python benchmarks/train_memory.py                          # quarter preset (~15-25 min on 2 busy cores)
    python benchmarks/train_memory.py --presets quarter,half   # also half (much longer)
    python benchmarks/train_memory.py --only baseline,bf16     # a subset

Every configuration runs in a fresh subprocess (so one run's allocator state cannot hide another's
peak) that builds an untrained VALLE of the preset, an engine from the real trainer code
(`LocalEngine`, or `DeepSpeedEngine` in a one-process group), and runs `--steps` optimizer steps on a
fixed synthetic batch. It reports:

* `peak_rss_mb`: the process's peak resident memory (VmHWM from /proc/self/status);
* `train_mb`: peak minus the resident memory just before the model was built (Python, torch and the
  batch are not counted): weights + gradients + optimizer state + activations + allocator slack;
* `params_mb`, `grads_mb`, `optimizer_mb`: exact bytes of the weights, of the gradients and of the
  optimizer's state tensors (read from the optimizer after the first step).

Batches (8 codebooks of 1024 codes, 75 frames/s, 13 phonemes/s, 3 s prompt, half AR / half NAR
samples): `typical` = 8 utterances of 4 s; `long` = 8 utterances of 12 s, the worst batch a fixed
`batch_size=8` can meet; `bucketed` = the worst batch under `frames_per_batch=4800` (as many 12 s
utterances as fit: 3). The typical batch (8 x 578 = 4624 padded frames) also fits that budget, so
bucketing keeps the typical batch and caps the worst one.

On a GPU the figures differ: activations and weights sit in GPU memory (plus the CUDA context and
the caching allocator's slack), and CPU RSS is what the host process holds. The ratios between the
switches carry over; the absolute numbers do not.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

FPS, TEXT_PER_SECOND, PROMPT_FRAMES, N_CODES, N_LEVELS, N_TEXT = 75, 13, 225, 1024, 8, 256
BUDGET = 4800  # frames_per_batch of the `bucketed` configuration

# name -> (what it shows, config overrides, batch kind, engine)
CONFIGS: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "baseline": ("AdamW, fp32, batch_size 8 (typical batch)", {}, "typical", "local"),
    "activation_ckpt": ("+ trainer.activation_checkpointing=true", {"trainer.activation_checkpointing": True},
                        "typical", "local"),
    "bf16": ("+ trainer.weight_dtype=bfloat16 (autocast; fp32 weights)", {"trainer.weight_dtype": "bfloat16"},
             "typical", "local"),
    "adamw8bit": ("+ hyperparameters.optimizer=adamw8bit (bitsandbytes)", {"hyperparameters.optimizer": "adamw8bit"},
                  "typical", "local"),
    "all_three": ("activation checkpointing + bf16 + AdamW8bit",
                  {"trainer.activation_checkpointing": True, "trainer.weight_dtype": "bfloat16",
                   "hyperparameters.optimizer": "adamw8bit"}, "typical", "local"),
    "fixed_batch_long": ("batch_size 8, worst case: 8 x 12 s utterances", {}, "long", "local"),
    "bucketed_long": (f"frames_per_batch={BUDGET}, worst case: 3 x 12 s utterances",
                      {"hyperparameters.frames_per_batch": BUDGET}, "bucketed", "local"),
    "deepspeed": ("DeepSpeed engine, ZeRO 0, one process (reference for the next row)",
                  {"trainer.backend": "deepspeed"}, "typical", "deepspeed"),
    "deepspeed_compression": ("+ trainer.deepspeed.use_compression_training=true (8-bit QAT)",
                              {"trainer.backend": "deepspeed", "trainer.deepspeed.use_compression_training": True},
                              "typical", "deepspeed"),
}


# ---------------------------------------------------------------------------------------- child


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _item(seconds: float, g: Any) -> dict[str, Any]:
    import torch

    T, N = int(round(seconds * FPS)), int(round(seconds * TEXT_PER_SECOND))
    return {"text": torch.randint(1, N_TEXT, (N,), generator=g),
            "prompt": torch.randint(0, N_CODES, (PROMPT_FRAMES, N_LEVELS), generator=g),
            "resps": torch.randint(0, N_CODES, (T, N_LEVELS), generator=g)}


def make_batch(kind: str) -> dict[str, Any]:
    """The fixed synthetic batch of a configuration (same tensors in every run)."""
    import torch

    g = torch.Generator().manual_seed(0)
    seconds, n = {"typical": (4.0, 8), "long": (12.0, 8)}.get(kind, (12.0, 0))
    if kind == "bucketed":
        cost = _item(12.0, torch.Generator().manual_seed(0))
        per = sum(int(cost[k].shape[0]) for k in ("text", "prompt", "resps"))
        n = max(1, BUDGET // per)  # what LengthBucketSampler packs: max(cost) * len(batch) <= budget
    items = [_item(seconds, g) for _ in range(n)]
    levels = [0 if i % 2 == 0 else 1 + (i // 2) % (N_LEVELS - 1) for i in range(n)]
    return {"text": [it["text"] for it in items], "lang": torch.zeros(n, dtype=torch.long),
            "prompt": [it["prompt"] for it in items], "resps": [it["resps"] for it in items], "levels": levels}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(name: str, preset: str, steps: int, threads: int) -> dict[str, Any]:
    """One configuration in this (fresh) process."""
    import torch

    torch.set_num_threads(threads)
    from vall_e.config import load_config
    from vall_e.config.model import resolve_dims
    from vall_e.models.valle import VALLE, VALLEConfig

    what, over, kind, engine = CONFIGS[name]
    base = {"device": "cpu", "hyperparameters.batch_size": 8, "hyperparameters.gradient_clipping": 100.0,
            "hyperparameters.scheduler": "constant", "trainer.tensorboard": False}
    cfg = load_config(None, {k: json.dumps(v) if not isinstance(v, str) else v for k, v in {**base, **over}.items()})
    batch = make_batch(kind)
    if engine == "deepspeed":  # a one-process group, as a single-GPU `deepspeed` launch has
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        from vall_e.training.engines.deepspeed import import_deepspeed

        import_deepspeed().init_distributed()
    from vall_e.training.engines import local  # noqa: F401  (imports are not part of the training footprint)

    if "adamw8bit" in json.dumps(over):
        import bitsandbytes  # noqa: F401
    rss_before = _status_kb("VmRSS")
    d, h, L = resolve_dims(preset)
    torch.manual_seed(0)
    model = VALLE(VALLEConfig(kind="ar+nar", d_model=d, n_heads=h, n_layers=L, n_levels=N_LEVELS, n_codes=N_CODES,
                              n_text_tokens=N_TEXT, dropout=0.1))
    n_params = sum(p.numel() for p in model.parameters())
    params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if engine == "deepspeed":
        from vall_e.training.engines.deepspeed import DeepSpeedEngine

        eng: Any = DeepSpeedEngine("ar+nar", model, cfg, torch.device("cpu"), steps)
    else:
        from vall_e.training.engines.local import LocalEngine

        eng = LocalEngine("ar+nar", model, cfg, torch.device("cpu"), steps)
    times, losses, opt_bytes, grad_bytes = [], [], 0, 0
    for step in range(steps):
        t0 = time.perf_counter()
        res = eng.train_step([batch], step)
        times.append(time.perf_counter() - t0)
        losses.append(res.loss)
        if step == 0:
            opt = eng.optimizer
            inner = getattr(opt, "optimizer", opt)  # DeepSpeed wraps the torch optimizer
            opt_bytes = sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
                            if torch.is_tensor(t))
    grad_bytes = sum(p.numel() * 4 for p in eng.module.parameters() if p.requires_grad)  # fp32 master grads
    peak = _status_kb("VmHWM")
    mb = 1 / 1024
    return {"config": name, "what": what, "preset": preset, "batch": kind, "batch_items": len(batch["text"]),
            "padded_frames": max(t.shape[0] + p.shape[0] + r.shape[0] for t, p, r in
                                 zip(batch["text"], batch["prompt"], batch["resps"])) * len(batch["text"]),
            "params": n_params, "params_mb": round(params_bytes / 2**20, 1), "grads_mb": round(grad_bytes / 2**20, 1),
            "optimizer_mb": round(opt_bytes / 2**20, 1), "peak_rss_mb": round(peak * mb, 1),
            "rss_before_model_mb": round(rss_before * mb, 1), "train_mb": round((peak - rss_before) * mb, 1),
            "step_s": [round(t, 2) for t in times], "loss": [round(x, 4) for x in losses], "threads": threads}


# ---------------------------------------------------------------------------------------- parent


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| preset | config | batch (items, padded frames) | peak RSS MB | training MB (peak - before model) "
            "| weights MB | grads MB | optimizer state MB | s/step |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['preset']} | {r['config']} | error: {r['error'][:80]} | | | | | | |")
            continue
        rows.append(f"| {r['preset']} | {r['config']} | {r['batch']} ({r['batch_items']}, {r['padded_frames']}) "
                    f"| {r['peak_rss_mb']:.0f} | {r['train_mb']:.0f} | {r['params_mb']:.0f} | {r['grads_mb']:.0f} "
                    f"| {r['optimizer_mb']:.0f} | {min(r['step_s']):.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="quarter", help="comma-separated model presets (quarter, half, ...)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per configuration (>= 2: the second "
                    "step's peak has the optimizer state and the activations together)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    ap.add_argument("--out", default=str(HERE / "train_memory.json"))
    ap.add_argument("--merge", action="store_true", help="keep --out's results for the (preset, config) pairs "
                    "not run now (to add a preset or rerun one configuration)")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "PRESET"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child[0], args.child[1], args.steps, args.threads)), flush=True)
        return 0

    from tqdm import tqdm

    from vall_e.utils.io import atomic_write_text

    names = [n for n in (args.only.split(",") if args.only else CONFIGS) if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    jobs = [(p, n) for p in args.presets.split(",") if p for n in names]
    results: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    if args.merge and Path(args.out).exists():
        kept = [r for r in json.loads(Path(args.out).read_text()).get("results", [])
                if (r.get("preset"), r.get("config")) not in set(jobs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    load0 = os.getloadavg()
    for preset, name in tqdm(jobs, desc="configs"):
        proc = subprocess.run([sys.executable, __file__, "--child", name, preset, "--steps", str(args.steps),
                               "--threads", str(args.threads)], capture_output=True, text=True, env=env, cwd=str(ROOT))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"config": name, "preset": preset, "error": err})
        else:
            results.append(json.loads(line[len("RESULT "):]))
        tqdm.write(table(results[-1:]).splitlines()[-1])
        report = {"machine": {"cpu_count": os.cpu_count(), "loadavg_start": load0, "loadavg_end": os.getloadavg()},
                  "steps": args.steps, "threads": args.threads, "frames_per_batch": BUDGET,
                  "results": kept + results}
        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    print(table(kept + results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
