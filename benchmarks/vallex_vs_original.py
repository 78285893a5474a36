"""VALL-E X: the original `inference` against this engine, same process, same weights, same codes.

    python benchmarks/vallex_vs_original.py --upstream /tmp/vallex-src     # checkout of Plachtaa/VALL-E-X@3faaf8c

Sizes: `real` is the checkpoint's architecture (1024 dims, 16 heads, 12 layers, 370M parameters);
`small` is the same module tree at 256 dims, 4 heads, 4 layers (less arithmetic per step, so the
per-step overheads weigh more). Both run the same random weights (`random_state_dict`; speed does not
depend on the values) and the same texts (folded ids), a prompt of `--prompt-frames` frames and greedy
decoding: the original's sampler is replaced by argmax, ours runs `SamplingParams(temperature=0)`.
Random weights never emit STOP, so every decode runs to the original's own limit, 16 frames per text
token (4 text tokens: 64 frames, kept short so the original finishes on 2 CPU cores), and both must
produce the same codes (asserted). Measured: AR + all 7 NAR levels, excluding the codec.

* batch 1: one text; best of `--original-repeats` runs for the original, `--repeats` for ours
  (`--batches 1 4` picks the rows);
* batch 4: four texts; the original decodes one text at a time (its `inference` takes one), ours
  decodes them as one batch.

The original's AR loop keeps a KV cache too (`ar_decoder.infer(past_kv=...)`), but re-embeds the whole
sequence and rebuilds its mask every step and decodes one text at a time. Both sides run in this one
process, one after the other, with the same torch threads; the load average (a shared machine) is
recorded at the start and the end of each size, and every row has the wall time and the process CPU
time (both threads) of each side. Writes benchmarks/vallex_vs_original.json (atomically)
and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"real": dict(d_model=1024, n_heads=16, n_layers=12), "small": dict(d_model=256, n_heads=4, n_layers=4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="checkout of Plachtaa/VALL-E-X at 3faaf8c")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs of ours (best is kept)")
    ap.add_argument("--original-repeats", type=int, default=1, help="runs of the original (best is kept)")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4], choices=[1, 4], help="which rows to measure")
    ap.add_argument("--text-tokens", type=int, default=4, help="text ids per text (the original stops at 16 frames each)")
    ap.add_argument("--prompt-frames", type=int, default=75, help="prompt length in frames (75 = 1 s)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "vallex_vs_original.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    sys.path.insert(0, str(Path(args.upstream).resolve()))
    import models.vallex as theirs_module  # their code

    from vall_e.generation.tts import TTS
    from vall_e.models.vallex import VallexConfig
    from vall_e.models.vallex_checkpoint import build_from_state_dict, random_state_dict
    from vall_e.generation.sampling import SamplingParams
    from vall_e.text.symmap import Symmap
    from vall_e.utils.io import atomic_write_text

    theirs_module.topk_sampling = lambda logits, top_k=None, top_p=None, temperature=None: (
        logits.argmax(-1, keepdim=True), torch.zeros(1))
    greedy = SamplingParams(temperature=0.0, ras_window=0)
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(5, 70, (args.text_tokens,), generator=g) for _ in range(4)]
    prompt = torch.randint(0, 1024, (args.prompt_frames, 8), generator=g)

    result = {"upstream": "Plachtaa/VALL-E-X@3faaf8c", "threads": args.threads, "device": "cpu",
              "cpus": os.cpu_count(), "torch": torch.__version__, "text_tokens": args.text_tokens,
              "prompt_frames": args.prompt_frames, "same_process": True,
              "measured": "AR + 7 NAR levels, greedy, codes asserted equal; codec excluded", "sizes": {}}

    def measure(size: str) -> None:
        shape = SIZES[size]
        config = VallexConfig(**shape)
        sd = random_state_dict(config, 0)
        theirs = theirs_module.VALLE(shape["d_model"], shape["n_heads"], shape["n_layers"], norm_first=True,
                                     add_prenet=False, prefix_mode=1, share_embedding=True, nar_scale_factor=1.0,
                                     prepend_bos=True, num_quantizers=8).eval()
        theirs.load_state_dict(sd, strict=True)
        tts = TTS({"ar+nar": build_from_state_dict(sd, "random", n_heads=shape["n_heads"])},
                  {"symmap": Symmap().to_json()}, codec=None, decode_layout=True)
        del sd
        params = sum(p.numel() for p in theirs.parameters())

        def run_theirs(ids: torch.Tensor) -> torch.Tensor:
            with open(os.devnull, "w") as null:  # their loop prints a line per decode
                saved, sys.stdout = sys.stdout, null
                try:
                    return theirs.inference(ids[None], torch.tensor([len(ids)]), prompt[None], enroll_x_lens=0,
                                            prompt_language="en", text_language="en")[0]
                finally:
                    sys.stdout = saved

        def run_ours(batch: list[torch.Tensor]) -> list[torch.Tensor]:
            langs = torch.zeros(len(batch), dtype=torch.long)
            level0 = tts.generate_ar(batch, langs, [prompt] * len(batch), greedy, [16 * len(t) for t in batch],
                                     max_repeat_frames=10**6)
            return tts.generate_nar(batch, langs, [prompt] * len(batch), level0, greedy, max_levels=7)

        def best(repeats, fn, *a):
            """Best wall time of `repeats` runs, with the process CPU time of that run (both threads):
            on a shared machine the wall time also counts waiting for a core, the CPU time does not."""
            runs, out = [], None
            for _ in tqdm(range(repeats), desc=f"{size} {getattr(fn, '__name__', 'run')}", leave=False):
                w, c = time.perf_counter(), time.process_time()
                out = fn(*a)
                runs.append((time.perf_counter() - w, time.process_time() - c))
            return min(runs), runs, out

        row = {"shape": shape, "parameters": params, "load_average_start": list(os.getloadavg())}
        result["sizes"][size] = row

        def record(name: str, theirs_runs, ours_runs) -> None:
            (tw, tc), (ow, oc) = theirs_runs[0], ours_runs[0]
            row[name] = {"original_s": tw, "ours_s": ow, "speedup": tw / ow,
                         "original_cpu_s": tc, "ours_cpu_s": oc, "speedup_cpu": tc / oc,
                         "original_runs": theirs_runs[1], "ours_runs": ours_runs[1]}
            row["load_average_end"] = list(os.getloadavg())
            atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")  # partial results survive

        run_theirs(texts[0])  # warm-ups (first touch of the weights, first-call allocations), not timed
        run_ours(texts[:1])
        if 1 in args.batches:
            t1 = best(args.original_repeats, run_theirs, texts[0])
            o1 = best(args.repeats, run_ours, texts[:1])
            assert torch.equal(t1[2], o1[2][0]), f"{size} batch 1: the codes differ"
            row["frames_per_text"] = int(t1[2].shape[0])
            record("batch1", t1, o1)
        if 4 in args.batches:
            t4 = best(args.original_repeats, lambda: [run_theirs(t) for t in texts])
            o4 = best(args.repeats, run_ours, texts)
            assert all(torch.equal(a, b) for a, b in zip(t4[2], o4[2])), f"{size} batch 4: the codes differ"
            row["frames_per_text"] = int(t4[2][0].shape[0])
            record("batch4", t4, o4)

    for size in args.sizes:
        measure(size)
    print(f"{'':14} {'original':>10} {'ours':>10} {'speedup':>8}   (AR + 7 NAR levels, greedy, {args.threads} threads)")
    for size, r in result["sizes"].items():
        for name in ("batch1", "batch4"):
            if name not in r:
                continue
            row = r[name]
            print(f"{size + ' ' + name:14} {row['original_s']:9.2f}s {row['ours_s']:9.2f}s {row['speedup']:7.2f}x"
                  f"   CPU time {row['original_cpu_s']:.2f}s / {row['ours_cpu_s']:.2f}s = {row['speedup_cpu']:.2f}x")
        print(f"{'':14} {r['frames_per_text']} frames per text, load average {r['load_average_start'][0]:.1f} -> "
              f"{r['load_average_end'][0]:.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
