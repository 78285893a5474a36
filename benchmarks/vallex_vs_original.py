"""VALL-E X at its real size (1024/16/12, 370M parameters): the original `inference` against this engine.

    python benchmarks/vallex_vs_original.py --upstream /tmp/vallex-src     # checkout of Plachtaa/VALL-E-X@3faaf8c

Both run the same random weights (`random_state_dict`, speed does not depend on the values), the same
texts (folded ids; 12 phones each), a 3 s prompt (225 frames) and greedy decoding: the original's
sampler is replaced by argmax, ours runs `SamplingParams(temperature=0)`. Random weights never emit
STOP, so every decode runs to the original's own limit, 16 frames per text token (192 frames), and
both produce the same codes (checked). Measured: AR + all 7 NAR levels, excluding the codec.

* batch 1: one text, best of `--repeats`;
* batch 4: four texts; the original decodes one text at a time (its `inference` takes one), ours
  decodes them as one batch.

Writes benchmarks/vallex_vs_original.json (atomically) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="checkout of Plachtaa/VALL-E-X at 3faaf8c")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
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

    config = VallexConfig()
    sd = random_state_dict(config, 0)
    theirs = theirs_module.VALLE(1024, 16, 12, norm_first=True, add_prenet=False, prefix_mode=1, share_embedding=True,
                                 nar_scale_factor=1.0, prepend_bos=True, num_quantizers=8).eval()
    theirs.load_state_dict(sd, strict=True)
    tts = TTS({"ar+nar": build_from_state_dict(sd, "random")}, {"symmap": Symmap().to_json()}, codec=None,
              decode_layout=True)
    del sd
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(5, 70, (12,), generator=g) for _ in range(4)]
    prompt = torch.randint(0, 1024, (225, 8), generator=g)
    greedy = SamplingParams(temperature=0.0, ras_window=0)
    theirs_module.topk_sampling = lambda logits, top_k=None, top_p=None, temperature=None: (
        logits.argmax(-1, keepdim=True), torch.zeros(1))

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

    def best(fn, *a):
        times, out = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn(*a)
            times.append(time.perf_counter() - t)
        return min(times), times, out

    load = os.getloadavg()[0]
    rows = {}
    t1, t1_all, c1 = best(run_theirs, texts[0])
    o1, o1_all, d1 = best(run_ours, texts[:1])
    assert torch.equal(c1, d1[0]), "batch 1: the codes differ"
    t4, t4_all, c4 = best(lambda: [run_theirs(t) for t in texts])
    o4, o4_all, d4 = best(run_ours, texts)
    assert all(torch.equal(a, b) for a, b in zip(c4, d4)), "batch 4: the codes differ"
    frames = int(c1.shape[0])
    rows["batch1"] = {"original_s": t1, "ours_s": o1, "speedup": t1 / o1, "frames": frames,
                      "original_runs": t1_all, "ours_runs": o1_all}
    rows["batch4"] = {"original_s": t4, "ours_s": o4, "speedup": t4 / o4, "frames": 4 * frames,
                      "original_runs": t4_all, "ours_runs": o4_all}
    result = {"upstream": "Plachtaa/VALL-E-X@3faaf8c", "threads": args.threads, "device": "cpu",
              "torch": torch.__version__, "load_average_start": load, "load_average_end": os.getloadavg()[0],
              "text_tokens": 12, "prompt_frames": 225, "results": rows}
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"{'':8} {'original':>10} {'ours':>10} {'speedup':>8}   ({frames} frames per text, AR + 7 NAR levels)")
    for name, r in rows.items():
        print(f"{name:8} {r['original_s']:9.2f}s {r['ours_s']:9.2f}s {r['speedup']:7.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
