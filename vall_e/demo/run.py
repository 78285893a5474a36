"""`vall-e demo`: the whole system, end to end, on a machine with no network.

1. generate a multi-speaker speech corpus with espeak-ng (plus held-out sentences per voice);
2. phonemize it (`vall_e.emb.g2p`);
3. fit the offline WORLD codec on it and quantize (`vall_e.emb.qnt codec.name=world --fit`);
4. train a small model for a bounded time (`vall_e.train`), export it (`vall_e.export`);
5. synthesize held-out sentences of every voice, prompted with a held-out utterance of that voice;
6. score them (MCD-DTW against espeak's rendering of the same sentence by the same voice) beside two
   baselines: the untrained model, and espeak's rendering of a *different* sentence by that voice.

Everything lands in one folder: wavs, `metrics.json`, `metrics.md`, the loss plot and the run itself.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from vall_e.utils.errors import UserError, run_main

logger = logging.getLogger("vall_e.demo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vall-e demo", description="Offline end-to-end demo: corpus -> train -> speak.")
    p.add_argument("--out", default="demo-out", help="output folder (default: ./demo-out)")
    p.add_argument("--speakers", type=int, default=4, help="voices in the generated corpus")
    p.add_argument("--utterances", type=int, default=150, help="training utterances per voice")
    p.add_argument("--heldout", type=int, default=2, help="held-out sentences per voice to synthesize")
    p.add_argument("--train-minutes", type=float, default=11.0, help="training time budget")
    p.add_argument("--train-steps", type=int, default=0,
                   help="train exactly this many steps instead of for --train-minutes (same result on any machine)")
    p.add_argument("--codes", type=int, default=1024, help="codes per codec level")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--p-ar", type=float, default=0.75, help="share of training samples that train the AR")
    p.add_argument("--text-heads", type=int, default=1,
                   help="heads per layer that read only the text, guided to the diagonal (0 = plain VALL-E)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    return p


def _stage(name: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:6.0f} s] {name}", flush=True)


def _heldout_pairs(root: Path, n_speakers: int, n_heldout: int, seed: int) -> list[dict[str, Any]]:
    """Held-out clips per voice: utterance 0 is the prompt, the rest are sentences to synthesize."""
    from vall_e.data.synthetic import generate_corpus

    paths = generate_corpus(root, n_speakers=n_speakers, n_utterances=n_heldout + 1, seed=seed + 10_007,
                            group="heldout", progress=False)
    by_speaker: dict[str, list[Path]] = {}
    for p in sorted(paths):
        if p.suffix == ".wav":
            by_speaker.setdefault(p.parent.name, []).append(p)
    items = []
    for speaker, wavs in sorted(by_speaker.items()):
        prompt, targets = wavs[0], wavs[1:]
        for i, target in enumerate(targets):
            other = targets[(i + 1) % len(targets)] if len(targets) > 1 else prompt
            items.append({"speaker": speaker, "prompt": str(prompt), "reference": str(target),
                          "text": target.with_suffix(".txt").read_text(encoding="utf-8").strip(),
                          "other": str(other)})
    return items


def _write_config(out: Path, corpus: Path, codebooks: Path, args: argparse.Namespace, iterations: int) -> Path:
    import yaml

    speaker_dirs = sorted(str(d.relative_to(out)) for d in (corpus / "synth").iterdir() if d.is_dir())
    cfg = {
        "seed": args.seed,
        "dataset": {"training": speaker_dirs, "validation_fraction": 0.03, "prompt_duration": 1.5,
                    "max_prompts": 1, "duration_range": [0.5, 12.0], "sample_type": "path"},
        "model": {"kind": "ar+nar", "size": "tiny", "d_model": args.d_model, "n_heads": args.heads,
                  "n_layers": args.layers, "n_codes": args.codes, "dropout": 0.0, "name": "demo",
                  # most samples train the AR: it is the part that has to learn to read the text
                  "p_ar": args.p_ar, "text_heads": args.text_heads, "guided_attention": 1.0 if args.text_heads else 0.0},
        "hyperparameters": {"batch_size": args.batch_size, "learning_rate": args.lr, "scheduler": "cosine",
                            "warmup_steps": min(100, iterations // 10), "min_lr_ratio": 0.05,
                            "gradient_clipping": 1.0},
        "evaluation": {"frequency": max(50, iterations // 4), "size": 8, "synthesize": 0},
        "trainer": {"iterations": iterations, "max_minutes": 0 if args.train_steps else args.train_minutes,
                    "save_frequency": 0,
                    "keep_last_checkpoints": 1, "weight_dtype": "float32", "tensorboard": False},
        "codec": {"name": "world", "codebooks": str(codebooks.relative_to(out))},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _estimate_iterations(cfg_path: Path, minutes: float) -> tuple[int, float]:
    """Time a few training steps of the configured model on real batches to size the LR schedule.

    The fastest step (after the first) sizes it: on a shared machine a median taken in a busy moment
    left most of the budget unused; sized from the fastest, the schedule is a little long and the
    time budget (`trainer.max_minutes`) ends the run on time."""
    import torch

    from vall_e.config import load_config
    from vall_e.data import VALLEDataset, make_dataloader
    from vall_e.models.build import build_models

    cfg = load_config(cfg_path)
    ds = VALLEDataset(cfg, "train")
    loader = make_dataloader(ds, cfg, "train")
    model = next(iter(build_models(cfg.model, len(ds.symmap), len(ds.languages)).values()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    it = iter(loader)
    for i in range(6):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        t = time.perf_counter()
        loss, _ = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    per_step = min(times[1:]) * 1.1  # + the trainer's own work (data, clipping, metrics, evaluation)
    return max(20, int(minutes * 60 / per_step)), per_step


def _mcd_table(items: list[dict[str, Any]], columns: dict[str, list[str]]) -> dict[str, Any]:
    import numpy as np

    from vall_e.utils.audio import load_audio
    from vall_e.evaluation.metrics import analyse, mcd_dtw

    rows = []
    for idx, item in enumerate(items):
        ref = analyse(load_audio(item["reference"], 24_000).numpy(), 24_000)
        row = {"speaker": item["speaker"], "text": item["text"]}
        for name, wavs in columns.items():
            wav = load_audio(wavs[idx], 24_000, allow_silent=True).numpy()
            row[name] = float(mcd_dtw(analyse(wav, 24_000), ref)) if wav.size > 2400 else float("nan")
        rows.append(row)
    means = {name: float(np.nanmean([r[name] for r in rows])) for name in columns}
    return {"items": rows, "mean": means}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.train_steps < 0:
        raise UserError(f"--train-steps must be >= 0, got {args.train_steps}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    train_min = args.train_steps * 0.5 / 60 if args.train_steps else args.train_minutes  # ~0.5 s/step on 2 cores
    total_est = 2.5 + args.speakers * args.utterances / 240 + train_min + 1.5
    budget = f"{args.train_steps} training steps" if args.train_steps else f"{args.train_minutes:g} min of training"
    print(f"vall-e demo: corpus of {args.speakers} voices x {args.utterances} utterances, "
          f"{budget}; about {total_est:.0f} minutes in all on 2 CPU cores.\n"
          f"Everything is written to {out}", flush=True)
    t0 = time.monotonic()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # 1. corpus + held-out sentences
    from vall_e.data.synthetic import generate_corpus

    _stage("generating the espeak-ng corpus", t0)
    corpus = out / "corpus"
    generate_corpus(corpus, n_speakers=args.speakers, n_utterances=args.utterances, seed=args.seed, group="synth")
    heldout = _heldout_pairs(out / "heldout", args.speakers, args.heldout, args.seed)

    # 2. phonemes
    from vall_e.emb.g2p import main as g2p_main

    _stage("phonemizing", t0)
    g2p_main([str(corpus), "--quiet"])

    # 3. offline codec: fit, then quantize
    from vall_e.codecs.world import fit_world_codec
    from vall_e.emb.qnt import main as qnt_main

    codebooks = out / "codebooks.safetensors"
    train_wavs = sorted(corpus.rglob("*.wav"))
    if not codebooks.exists():
        # ~120 clips hold the 20k frames the fit samples anyway: analysing all of them only costs time
        fit_wavs = random.Random(args.seed).sample(train_wavs, min(len(train_wavs), 120))
        _stage(f"fitting the WORLD codec (8 levels x {args.codes} codes) on {len(fit_wavs)} clips", t0)
        fit_world_codec(fit_wavs, codebooks, n_levels=8, n_codes=args.codes, seed=args.seed, max_frames=20_000,
                        workers=os.cpu_count() or 1)
    _stage("quantizing", t0)
    qnt_main([str(corpus), "codec.name=world", f"codec.codebooks={codebooks}"])

    # 4. train + export
    from vall_e.config import load_config
    from vall_e.training.trainer import Trainer

    # The symbol map starts with the held-out sentences' phonemes: a small corpus may never use one of
    # them (say 'ᵻ'), and synthesis would refuse a phoneme the model has no embedding for.
    from vall_e.text.phonemes import phonemize_many
    from vall_e.text.symmap import Symmap

    symmap_path = out / "symmap.json"
    if not symmap_path.exists():
        Symmap.build(phonemize_many([item["text"] for item in heldout])).save(symmap_path)
    if args.train_steps:
        iterations = args.train_steps
        cfg_path = _write_config(out, corpus, codebooks, args, iterations=iterations)
        _stage(f"training {iterations} steps", t0)
    else:
        cfg_path = _write_config(out, corpus, codebooks, args, iterations=1000)
        iterations, per_step = _estimate_iterations(cfg_path, args.train_minutes)
        cfg_path = _write_config(out, corpus, codebooks, args, iterations=iterations)
        _stage(f"training about {iterations} steps ({per_step:.2f} s/step, budget {args.train_minutes:g} min)", t0)
    cfg = load_config(cfg_path)
    trainer = Trainer(cfg, read_stdin=False)
    trainer.run()
    model_path = trainer.export() or cfg.ckpt_dir / cfg.model.full_name / "model.safetensors"
    from vall_e.training.plot import main as plot_main

    plot_main([f"yaml={cfg_path}", "--ys", "loss", "ar.acc", "nar.acc", "--out", str(out / "loss.png")])

    # 5. synthesize held-out sentences, and the same with an untrained copy of the model
    from vall_e.utils.audio import save_audio
    from vall_e.models.model_file import read_export
    from vall_e.generation.settings import GenerationSettings
    from vall_e.generation.tts import TTS
    from vall_e.models.valle import VALLE, VALLEConfig
    from vall_e.generation.sampling import SamplingParams

    _stage("synthesizing held-out sentences", t0)
    tts = TTS.from_pretrained(model_path, device="cpu")
    settings = GenerationSettings(ar=replace(SamplingParams.ar_defaults(), temperature=0.8, seed=args.seed),
                                  nar=replace(SamplingParams.nar_defaults(), temperature=0.0, seed=args.seed),
                                  input_prompt_length=1.5, split_sentences=False,
                                  max_ar_steps=450)  # 6 s: the held-out sentences take 2-4 s
    wav_dir = out / "wavs"
    trained, wrong_text, untrained = [], [], []
    _, meta = read_export(model_path)
    fresh_models = {n: VALLE(VALLEConfig.from_dict(c)) for n, c in meta["models"].items()}
    untrained_tts = TTS(fresh_models, meta, tts.codec)
    # the control: the trained model saying the *other* sentence, scored against this one. A model that
    # follows its text lands closer with the right text than with the wrong one; a model that only
    # learned the voice's average sound scores the same on both.
    other_texts = [Path(it["other"]).with_suffix(".txt").read_text(encoding="utf-8").strip() for it in heldout]
    texts = [it["text"] for it in heldout]
    prompts = [it["prompt"] for it in heldout]
    runs = ((tts, texts, trained, "trained"), (tts, other_texts, wrong_text, "trained_other_text"),
            (untrained_tts, texts, untrained, "untrained"))
    for engine, batch_texts, bucket, tag in runs:  # one batched call per column
        wavs = engine.synthesize(batch_texts, prompts, settings)
        for i, (item, wav) in enumerate(zip(heldout, wavs)):
            path = wav_dir / f"{i:02d}_{item['speaker']}_{tag}.wav"
            save_audio(path, wav if wav.numel() else torch.zeros(2400), tts.sample_rate)
            bucket.append(str(path))
    for i, item in enumerate(heldout):
        shutil.copy(item["reference"], wav_dir / f"{i:02d}_{item['speaker']}_espeak.wav")

    # 6. score
    _stage("scoring", t0)
    table = _mcd_table(heldout, {"trained": trained, "trained_other_text": wrong_text, "untrained": untrained,
                                 "other_sentence": [it["other"] for it in heldout]})
    stats = json.loads(json.dumps(meta.get("stats", {})))
    report = {"mcd_dtw_db": table, "training": {"steps": stats.get("step"),
                                                "minutes": None if args.train_steps else args.train_minutes,
                                                "model": meta["models"]}, "elapsed_s": time.monotonic() - t0}
    from vall_e.utils.io import atomic_write_text

    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))
    cols = ("trained", "trained_other_text", "untrained", "other_sentence")
    lines = ["| voice | text | trained | trained, other text (control) | untrained | espeak, other sentence |",
             "|---|---|---|---|---|---|"]
    for r in table["items"]:
        lines.append(f"| {r['speaker']} | {r['text'][:40]} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    m = table["mean"]
    lines.append("| **mean** | | " + " | ".join(f"**{m[c]:.2f}**" for c in cols) + " |")
    atomic_write_text(out / "metrics.md", "MCD-DTW (dB) to espeak's rendering of the same sentence by the same "
                      "voice; lower is closer. The control column is the trained model saying the other sentence: "
                      "only a gap between it and 'trained' shows the model follows its text.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    _stage(f"done: wavs in {wav_dir}, metrics in {out / 'metrics.md'}, loss plot {out / 'loss.png'}", t0)
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
