#!/usr/bin/env python
"""Training step A/B between two checkouts under issue 16's protocol, for a shared machine.

    python benchmarks/train_ab.py --before /path/to/old/checkout [--after .] [--steps 2] [--out train_ab.json]

Each checkout runs in its own process (PYTHONPATH = the checkout) on ONE thread, alternating, and every
step is timed by the CPU time of that thread (`time.thread_time`) as well as by the wall clock: another
process can stall a thread but does not add to its CPU time, so on a machine with a load average far
above its core count the CPU-time ratio is the comparison to read (the wall-clock one is noise). The
protocol is the benchmark's `train` section's (bench_sections.TRAIN_PROTOCOL: quarter, batch 8 x (60,
225, 375), dropout 0.1, AdamW, fp32, the same batch every step), built only through the `VALLE` API
that both checkouts have; peak RSS is the child's VmHWM.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r'''
import json, os, sys, time
import torch
torch.set_num_threads(1)
from pathlib import Path
from vall_e.models.valle import VALLE, VALLEConfig
from vall_e.config.model import resolve_dims
P = json.loads(sys.argv[1]); steps = int(sys.argv[2]); extra = json.loads(sys.argv[3])
def status(key):
    return next(int(l.split()[1]) / 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
B = P["batch_size"]
g = torch.Generator().manual_seed(0)
batch = {"text": [torch.randint(1, 256, (P["n_text"],), generator=g) for _ in range(B)],
         "prompt": [torch.randint(0, 1024, (P["prompt_frames"], 8), generator=g) for _ in range(B)],
         "resps": [torch.randint(0, 1024, (P["response_frames"], 8), generator=g) for _ in range(B)],
         "levels": torch.tensor(P["levels"][:B])}
d, h, l = resolve_dims(P["preset"])
rss0 = status("VmRSS")
torch.manual_seed(0)
model = VALLE(VALLEConfig(kind="ar+nar", d_model=d, n_heads=h, n_layers=l, n_text_tokens=256, dropout=P["dropout"], **extra)).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
wall, cpu, losses = [], [], []
for i in range(steps + 1):
    t0, c0 = time.perf_counter(), time.thread_time()
    loss, _ = model(batch)
    loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    wall.append(time.perf_counter() - t0); cpu.append(time.thread_time() - c0); losses.append(loss.item())
positions = B * (P["n_text"] + P["prompt_frames"] + P["response_frames"] + 4)
print("RESULT " + json.dumps({"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "wall_s": wall[1:],
      "cpu_s": cpu[1:], "cpu_s_best": min(cpu[1:]), "positions_per_cpu_s": positions / min(cpu[1:]),
      "peak_rss_mb": status("VmHWM"), "rss_before_mb": rss0, "loss": losses, "load_average": os.getloadavg()}))
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, type=Path, help="the old checkout (its repository root)")
    ap.add_argument("--after", default=HERE.parent, type=Path, help="the new checkout (default: this one)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the two checkouts")
    ap.add_argument("--config", default="{}", help="extra VALLEConfig fields as JSON, for both")
    ap.add_argument("--out", type=Path, default=HERE / "train_ab.json")
    args = ap.parse_args(argv)
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from bench_sections import TRAIN_PROTOCOL

    from vall_e.utils.io import atomic_write_text

    runs: dict[str, list] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name, root in (("after", args.after), ("before", args.before)):
            env = {**os.environ, "PYTHONPATH": str(root.resolve()), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(TRAIN_PROTOCOL), str(args.steps), args.config],
                                  capture_output=True, text=True, env=env, cwd=str(root))
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{name} ({root}) failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
            runs[name].append(json.loads(line[7:]))
            print(name, json.dumps(runs[name][-1]), flush=True)
    best = {k: min(r["cpu_s_best"] for r in v) for k, v in runs.items()}
    report = {"protocol": TRAIN_PROTOCOL, "threads": 1, "timing": "CPU time of the one thread (time.thread_time)",
              "before": str(args.before), "after": str(args.after), "runs": runs,
              "cpu_speedup": best["before"] / best["after"],
              "peak_rss_mb": {k: max(r["peak_rss_mb"] for r in v) for k, v in runs.items()}}
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    print(f"after vs before: {report['cpu_speedup']:.2f}x CPU time per step; peak RSS {report['peak_rss_mb']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
