"""`vall-e demo`: the whole system, end to end, on a machine with no network, judged on words it never heard.

1. corpora (`vall_e.demo.corpus`): a training corpus of made-up and common words in 4 espeak-ng voices,
   the Harvard test sentences in the same voices (none of their words is in the training corpus), and
   a few held-out training-style sentences;
2. phonemes (`vall_e.emb.g2p`), the offline WORLD codec fitted on training clips, codes (`vall_e.emb.qnt`);
3. training (`vall_e.train`) for a fixed step count or for what is left of the time budget, with the
   Harvard sentences as the validation set (the loss on unseen words is logged over time) and the text
   heads' alignment on two of them recorded at every evaluation;
4. synthesis of every voice saying test sentences, prompted by another test sentence of that voice,
   beside controls (the same model saying another sentence's text, the untrained model, espeak saying
   another sentence) and oracle swaps (true level-0 codes with the model's NAR, ...);
5. scores (`vall_e.demo.scoring`) and reports (`vall_e.demo.report`) in one folder.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import Tensor

from vall_e.config import load_config
from vall_e.data import VALLEDataset, make_dataloader
from vall_e.demo import report
from vall_e.demo.corpus import (DemoData, TestItem, fit_and_quantize, frames_per_token, heldout_items, make_corpora,
                                phonemize, unseen_items)
from vall_e.demo.scoring import Analyses, score_column, speaker_identification
from vall_e.emb.codes import read_codes
from vall_e.generation.sampling import SamplingParams
from vall_e.generation.settings import GenerationSettings
from vall_e.generation.tts import TTS
from vall_e.models.backbones.base import check_kv_heads
from vall_e.models.build import build_models
from vall_e.models.model_file import read_export
from vall_e.models.valle import VALLE, VALLEConfig
from vall_e.text.symmap import Symmap, read_phonemes
from vall_e.training.trainer import Trainer
from vall_e.utils.audio import save_audio
from vall_e.utils.errors import UserError, run_main

logger = logging.getLogger("vall_e.demo")

# Prep stages' cost per training utterance on an idle 2-core machine (espeak, phonemes, WORLD analysis
# and quantization), and synthesis plus scoring after training: with the time each stage actually took,
# they size the training budget (benchmarks/README.md, "Demo timing").
PREP_SECONDS_PER_UTTERANCE = 0.09
AFTER_TRAINING_SECONDS = 150.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vall-e demo", description="Offline end-to-end demo: corpus -> train -> speak "
                                "words it never heard.")
    p.add_argument("--out", default="demo-out", help="output folder (default: ./demo-out)")
    p.add_argument("--speakers", type=int, default=4, help="voices in the generated corpus")
    p.add_argument("--utterances", type=int, default=600, help="training utterances per voice")
    p.add_argument("--heldout", type=int, default=2, help="held-out training-style sentences per voice")
    p.add_argument("--minutes", type=float, default=20.0,
                   help="time budget of the whole demo; training gets what the other stages leave")
    p.add_argument("--train-steps", type=int, default=0,
                   help="train exactly this many steps instead (same result on any machine)")
    p.add_argument("--codes", type=int, default=1024, help="codes per codec level")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=0,
                   help="key/value heads (grouped-query attention; 0 = --heads; --text-heads must then be a "
                        "multiple of heads / kv-heads)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--p-ar", type=float, default=1.0,
                   help="share of training samples that train the AR (default 1.0: the demo decodes level 0 only, "
                        "and on the development sentences at 1800 steps the AR trained alone scored 5.92 dB against "
                        "6.42 with 0.75; below 1.0 the rest trains the NAR, for --nar-levels > 0)")
    p.add_argument("--ar-group", type=int, default=2, help="level-0 codes per AR step (VALL-E 2's grouping; 1 = plain)")
    p.add_argument("--text-heads", type=int, default=1,
                   help="heads per layer that read only the text, guided to the diagonal (0 = plain VALL-E)")
    p.add_argument("--nar-levels", type=int, default=0, choices=range(8),
                   help="NAR levels decoded at synthesis (default 0: level 0 only; at the demo's training budget "
                        "the NAR's levels add error, see the oracle table; 7 = all)")
    p.add_argument("--ar-temperature", type=float, default=0.6,
                   help="AR sampling temperature at synthesis (0 = greedy; 0.6 was chosen on the development "
                        "sentences: greedy decoding of the small model often runs on past the sentence's end)")
    p.add_argument("--ar-min-p", type=float, default=0.1,
                   help="AR min-p filter at synthesis (drops codes below this share of the likeliest one's "
                        "probability; 0.1 chosen on the development sentences, 4 sampling seeds: 0.25 dB better "
                        "than none at temperature 0.6, durations as good)")
    p.add_argument("--pitch-guard", type=float, default=4.0,
                   help="sample an output again when its median pitch is more than this many semitones from its "
                        "prompt's (0 = off; 4 chosen on the development sentences: the outputs that drifted into "
                        "another voice sat 7-13 semitones away, every other within 1.6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first")
    return p


class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def stage(self, name: str) -> None:
        print(f"[{self.elapsed:6.0f} s] {name}", flush=True)


# ---------------------------------------------------------------------------------------------------- config

def write_config(args: argparse.Namespace, data: DemoData, rate: float, iterations: int, minutes: float) -> Path:
    """The run's YAML: the Harvard sentences are the validation set, so `val.*` is the unseen-word loss."""
    out = data.root
    train_dirs = [str(d.relative_to(out)) for d in data.speaker_dirs(data.corpus / "synth")]
    val_dirs = [str(d.relative_to(out)) for d in data.speaker_dirs(data.unseen / "unseen")]
    cfg = {
        "seed": args.seed,
        "dataset": {"training": train_dirs, "validation": val_dirs, "prompt_duration": 1.5, "max_prompts": 1,
                    "duration_range": [0.5, 12.0], "sample_type": "path"},
        "model": {"kind": "ar+nar", "size": "tiny", "d_model": args.d_model, "n_heads": args.heads,
                  "n_layers": args.layers, "n_codes": args.codes, "dropout": 0.0, "name": "demo",
                  # most samples train the AR: it is the part that has to learn to read the text
                  "p_ar": args.p_ar, "text_heads": args.text_heads,
                  "guided_attention": 1.0 if args.text_heads else 0.0,
                  "text_head_rate": round(rate, 4) if args.text_heads else 0.0, "ar_group": args.ar_group,
                  "kv_heads": args.kv_heads},
        "hyperparameters": {"batch_size": args.batch_size, "learning_rate": args.lr, "scheduler": "cosine",
                            "warmup_steps": min(100, iterations // 10), "min_lr_ratio": 0.05,
                            "gradient_clipping": 1.0,
                            # the time budget ends the run, so the time spent drives the schedule too: it
                            # finishes on time even when the machine runs slower than the timed steps
                            "schedule_clock": "time" if minutes else "steps"},
        "evaluation": {"frequency": max(25, iterations // 8), "size": 32, "synthesize": 0},
        "trainer": {"iterations": iterations, "max_minutes": minutes, "save_frequency": 0,
                    "keep_last_checkpoints": 1, "weight_dtype": "float32", "tensorboard": False},
        "codec": {"name": "world", "codebooks": str(data.codebooks.relative_to(out))},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def time_training_step(cfg_path: Path, steps: int = 6) -> dict[str, Any]:
    """Time and profile a few training steps of the configured model on real batches.

    The fastest step after the first sizes the schedule: on a shared machine a median taken in a busy
    moment left most of the budget unused; sized from the fastest, the schedule runs a little long and
    the time budget (`trainer.max_minutes`) ends it on time. One step is profiled by operator."""
    cfg = load_config(cfg_path)
    ds = VALLEDataset(cfg, "train")
    loader = itertools.cycle(make_dataloader(ds, cfg, "train"))  # a tiny corpus may hold fewer batches
    model = next(iter(build_models(cfg.model, len(ds.symmap), len(ds.languages)).values()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, frames = [], []
    for i in range(steps):
        batch = next(loader)
        t = time.perf_counter()
        if i == steps - 1:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                loss, _ = model(batch)
                loss.backward()
                opt.step()
        else:
            loss, _ = model(batch)
            loss.backward()
            opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        frames.append(sum(int(r.shape[0]) for r in batch["resps"]))
    per_step = min(times[1:-1]) * 1.1  # + the trainer's own work (data, clipping, metrics, evaluation)
    return {"seconds_per_step": per_step, "frames_per_second": sum(frames[1:-1]) / sum(times[1:-1]),
            "threads": torch.get_num_threads(), "profile": report.profile_shares(prof)}


class DemoTrainer(Trainer):
    """The trainer, also recording the text heads' alignment on two unseen sentences at every
    evaluation (the `alignment.png` report shows how the model learns to read)."""

    def __init__(self, cfg: Any, items: list[TestItem]) -> None:
        super().__init__(cfg, read_stdin=False)
        self.items = items
        self.probes: list[dict[str, Any]] | None = None
        self.alignments: list[tuple[int, list[Tensor]]] = []

    def evaluate(self, synthesize: bool = True) -> dict[str, float]:
        out = super().evaluate(synthesize)
        model = next(iter(self.models.values()))
        if self.probes is None:  # the symbol map exists once the run is set up
            self.probes = alignment_probes(self.items, Symmap.from_json(self.parts.meta["symmap"]))
        if self.probes and getattr(model.config, "text_heads", 0):
            was = model.training
            model.eval()
            maps = [model.text_alignment(p["text"], 0, p["prompt"], p["codes0"]).cpu() for p in self.probes]
            model.train(was)
            self.alignments.append((self.step, maps))
            out = {**out, "val.alignment_error": report.alignment_error(maps)}
        return out


def alignment_probes(items: list[TestItem], symmap: Any, n: int = 2) -> list[dict[str, Any]]:
    """Text ids (as the dataset reads them), prompt and true level-0 codes of the first test
    sentence of the first `n` voices."""
    probes: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in items:
        if item.speaker in seen or len(probes) >= n:
            continue
        seen.add(item.speaker)
        ids = symmap.encode(read_phonemes(item.reference.with_suffix(".phn.txt")))  # <s> ... </s> included
        probes.append({"text": torch.tensor(ids), "prompt": _codes(item.prompt)[:112],
                       "codes0": _codes(item.reference)[:, 0], "label": f"{item.speaker}: {item.text}"})
    return probes


def _codes(wav: Path) -> Tensor:
    return read_codes(wav.with_suffix(".qnt.pt"))[0]


# ---------------------------------------------------------------------------------------------------- synthesis

@dataclass
class Column:
    name: str
    wavs: list[Path]


def write_column(tts: TTS, name: str, codes: list[Tensor], wav_dir: Path, tags: list[str]) -> Column:
    """Decode codes and write them as `{tag}_{name}.wav` (an empty output as 0.1 s of silence)."""
    paths = []
    for tag, wav in zip(tags, tts.decode(codes)):
        path = wav_dir / f"{tag}_{name}.wav"
        save_audio(path, wav if wav.numel() else torch.zeros(2400), tts.sample_rate)
        paths.append(path)
    return Column(name, paths)


def run_synthesis(tts: TTS, untrained: TTS, items: list[TestItem], held: list[TestItem], args: argparse.Namespace,
                  wav_dir: Path) -> dict[str, list[Column]]:
    """Every column of the report's tables. The NAR runs for the levels a column decodes; the trained
    model's test sentences get all 7, which the oracle table needs."""
    levels = args.nar_levels
    settings = GenerationSettings(ar=replace(SamplingParams.ar_defaults(), temperature=args.ar_temperature,
                                             min_p=args.ar_min_p, seed=args.seed),
                                  nar=replace(SamplingParams.nar_defaults(), temperature=0.0, seed=args.seed),
                                  input_prompt_length=1.5, split_sentences=False,
                                  max_ar_steps=450, max_nar_levels=levels,  # 450 steps: 6-12 s; the sentences take 2-3 s
                                  pitch_guard=args.pitch_guard)
    prompts = [tts.encode_reference(str(it.prompt), 1.5) for it in items]
    tags = [f"{i:02d}_{it.speaker}" for i, it in enumerate(items)]
    texts = [it.text for it in items]
    zeros = torch.zeros(len(items), dtype=torch.long)
    ids = [tts.encode_text(t) for t in texts]
    codes = tts.generate_codes(texts, prompts, settings)  # the pitch guard judges what is decoded
    # all 7 NAR levels on the same level 0, for the oracle table (the NAR is greedy: the same codes either way)
    codes_all = tts.generate_nar(ids, zeros, prompts, [c[:, 0] for c in codes], settings.nar, 7)
    trained = write_column(tts, "trained", codes, wav_dir, tags)
    control = write_column(tts, "trained_other_text",
                           tts.generate_codes([it.other_text for it in items], prompts, settings), wav_dir, tags)
    # the untrained control without the guard: its outputs are noise, which the guard would only sample again
    fresh = write_column(untrained, "untrained",
                         untrained.generate_codes(texts, prompts, replace(settings, pitch_guard=0.0)), wav_dir, tags)
    true = [_codes(it.reference) for it in items]
    true_nar = tts.generate_nar(ids, zeros, prompts, [t[:, 0] for t in true], settings.nar, 7)
    level0 = (Column("model_ar_level0_only", trained.wavs) if levels == 0
              else write_column(tts, "model_ar_level0_only", [c[:, :1] for c in codes], wav_dir, tags))
    columns = {"unseen": [trained, control, fresh, Column("other_sentence", [it.other_reference for it in items])],
               "oracle": [write_column(tts, "codec_round_trip", true, wav_dir, tags),
                          write_column(tts, "true_level0_only", [t[:, :1] for t in true], wav_dir, tags),
                          write_column(tts, "true_level0_model_nar", true_nar, wav_dir, tags),
                          write_column(tts, "model_ar_model_nar", codes_all, wav_dir, tags), level0]}
    held_prompts = [tts.encode_reference(str(it.prompt), 1.5) for it in held]
    held_tags = [f"heldout_{i:02d}_{it.speaker}" for i, it in enumerate(held)]
    held_codes = tts.generate_codes([it.text for it in held], held_prompts, settings)
    columns["heldout"] = [write_column(tts, "trained", held_codes, wav_dir, held_tags),
                          Column("other_sentence", [it.other_reference for it in held])]
    for i, it in enumerate(items):
        shutil.copy(it.reference, wav_dir / f"{tags[i]}_espeak.wav")
    return columns


# ---------------------------------------------------------------------------------------------------- main

def plan_training(args: argparse.Namespace, clock: Clock, timing: dict[str, Any], n_utterances: int) -> tuple[int, float]:
    """(iterations, minutes): a fixed step count, or the steps that fit in what the budget leaves after
    the time already spent and the time synthesis and scoring will take at this machine's pace."""
    if args.train_steps:
        return args.train_steps, 0.0
    slowdown = max(1.0, clock.elapsed / (30.0 + PREP_SECONDS_PER_UTTERANCE * n_utterances))
    left = 60 * args.minutes - clock.elapsed - slowdown * AFTER_TRAINING_SECONDS
    if left < 60:
        raise UserError(f"--minutes {args.minutes:g}: preparing the data took {clock.elapsed / 60:.1f} min, which "
                        "leaves no time to train; raise --minutes or lower --utterances")
    return max(20, int(left / timing["seconds_per_step"])), left / 60


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.train_steps < 0:
        raise UserError(f"--train-steps must be >= 0, got {args.train_steps}")
    try:  # the backbone's own rule, checked before hours of preparation rather than at the first step
        check_kv_heads(args.heads, args.kv_heads, args.text_heads)
    except ValueError:
        raise UserError(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}, and --text-heads "
                        f"{args.text_heads} must be a multiple of heads / kv-heads") from None
    if args.nar_levels > 0 and args.p_ar >= 1.0:
        raise UserError(f"--nar-levels {args.nar_levels} decodes NAR levels, but --p-ar {args.p_ar:g} trains no NAR; "
                        "give --p-ar below 1 (e.g. 0.75)")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    budget = f"{args.train_steps} training steps" if args.train_steps else f"a budget of {args.minutes:g} minutes"
    print(f"vall-e demo: {args.speakers} voices x {args.utterances} training utterances, {budget} on "
          f"{torch.get_num_threads()} CPU threads; tested on {args.speakers * 8} sentences whose words it never "
          f"heard.\nEverything is written to {out}", flush=True)
    clock = Clock()
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    clock.stage("generating the espeak-ng corpora")
    data = make_corpora(out, args.speakers, args.utterances, args.heldout, args.seed)
    clock.stage("phonemizing")
    phonemize(data)
    clock.stage(f"fitting the WORLD codec (8 levels x {args.codes} codes) and quantizing")
    fit_and_quantize(data, args.codes, args.seed)
    rate = frames_per_token(data)

    cfg_path = write_config(args, data, rate, iterations=1000, minutes=0)
    timing = time_training_step(cfg_path)
    iterations, minutes = plan_training(args, clock, timing, args.speakers * args.utterances)
    cfg_path = write_config(args, data, rate, iterations, minutes)
    clock.stage(f"training {iterations} steps ({timing['seconds_per_step']:.2f} s/step"
                + (f", budget {minutes:.1f} min)" if minutes else ")"))
    cfg = load_config(cfg_path)
    items, held = unseen_items(data, args.speakers), heldout_items(data)
    trainer = DemoTrainer(cfg, items if args.text_heads else [])
    trainer.run()
    model_path = trainer.export() or cfg.ckpt_dir / cfg.model.full_name / "model.safetensors"

    clock.stage("synthesizing the test sentences")
    tts = TTS.from_pretrained(model_path, device="cpu")
    _, meta = read_export(model_path)
    untrained = TTS({n: VALLE(VALLEConfig.from_dict(c)) for n, c in meta["models"].items()}, meta, tts.codec)
    wav_dir = out / "wavs"
    columns = run_synthesis(tts, untrained, items, held, args, wav_dir)

    clock.stage("scoring")
    analyses = Analyses()
    tables = {name: {c.name: score_column(items if name != "heldout" else held, c.wavs, analyses) for c in cols}
              for name, cols in columns.items()}
    voice_clips = {v: sorted((data.unseen / "unseen" / v).glob("*.wav")) for v in sorted({it.speaker for it in items})}
    speaker_id = speaker_identification(items, columns["unseen"][0].wavs, voice_clips)
    metrics = report.collect(trainer, cfg, meta, tables, items, held, speaker_id, timing, rate, clock.elapsed,
                             args)
    report.write(out, metrics, tables, items, held)
    report.plot_training(cfg, out / "loss.png")
    report.plot_alignments(trainer.alignments, trainer.probes or [], out / "alignment.png")
    print(report.headline(metrics))
    clock.stage(f"done: wavs in {wav_dir}, metrics in {out / 'metrics.md'}, plots {out / 'loss.png'}, "
                f"{out / 'alignment.png'}")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
