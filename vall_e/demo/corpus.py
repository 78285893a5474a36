"""The demo's data: a training corpus that teaches phonemes, the unseen-word test set, and their codes.

* training: `--utterances` sentences per voice from `vall_e.data.lexicon` (made-up and common words),
  with every word of the Harvard lists kept out;
* unseen: every voice says the Harvard test sentences (`vall_e.demo.harvard.TEST_LISTS`); it is the
  training run's validation set (so the loss on unseen words is logged over time) and the source of the
  synthesis test's prompts and references;
* held-out: a few more lexicon sentences per voice (new made-up words, the training distribution), for
  the table that compares with the demo's earlier reports.

Then the usual pipeline: `vall_e.emb.g2p`, a WORLD codec fitted on training clips, `vall_e.emb.qnt`.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path


from vall_e.codecs.world import fit_world_codec
from vall_e.data.listing import speaker_metadata
from vall_e.data.synthetic import generate_corpus, speakers
from vall_e.demo.harvard import TEST_LISTS, all_words, sentences
from vall_e.emb.g2p import main as g2p_main
from vall_e.emb.qnt import main as qnt_main

FIT_CLIPS = 120  # ~120 clips hold the 20k frames the codebook fit samples: analysing more only costs time
N_TARGETS = 8  # test sentences per voice; one more is its prompt


@dataclass
class DemoData:
    root: Path
    corpus: Path  # training speaker folders under corpus/synth/
    unseen: Path  # unseen/unseen/{voice}/ : every voice says the Harvard test sentences
    heldout: Path  # heldout/heldout/{voice}/ : more lexicon sentences
    codebooks: Path

    def speaker_dirs(self, group_root: Path) -> list[Path]:
        return sorted(d for d in group_root.iterdir() if d.is_dir())


def make_corpora(out: Path, n_speakers: int, n_utterances: int, n_heldout: int, seed: int) -> DemoData:
    """Generate (or resume) the three corpora as wav + txt."""
    data = DemoData(out, out / "corpus", out / "unseen", out / "heldout", out / "codebooks.safetensors")
    generate_corpus(data.corpus, n_speakers, n_utterances, seed=seed, group="synth", sentences="lexicon",
                    exclude=all_words())
    generate_corpus(data.unseen, n_speakers, texts=sentences(), group="unseen", progress=False)
    generate_corpus(data.heldout, n_speakers, n_heldout + 1, seed=seed + 10_007, group="heldout",
                    sentences="lexicon", exclude=all_words(), progress=False)
    return data


def phonemize(data: DemoData) -> None:
    for folder in (data.corpus, data.unseen, data.heldout):
        g2p_main([str(folder), "--quiet"])


def fit_and_quantize(data: DemoData, n_codes: int, seed: int) -> None:
    """Fit the WORLD codebooks on training clips only, then quantize all three corpora."""
    if not data.codebooks.exists():
        train_wavs = sorted(data.corpus.rglob("*.wav"))
        fit_wavs = random.Random(seed).sample(train_wavs, min(len(train_wavs), FIT_CLIPS))
        fit_world_codec(fit_wavs, data.codebooks, n_levels=8, n_codes=n_codes, seed=seed, max_frames=20_000,
                        workers=os.cpu_count() or 1)
    for folder in (data.corpus, data.unseen, data.heldout):
        qnt_main([str(folder), "codec.name=world", f"codec.codebooks={data.codebooks}"])


def frames_per_token(data: DemoData) -> float:
    """The training corpus's mean audio frames per text token (BOS and EOS included, as the model
    reads them): the text heads' position rate (`model.text_head_rate`). From the speaker folders'
    metadata cache, which the dataset reads next anyway."""
    frames = tokens = 0
    for folder in data.speaker_dirs(data.corpus / "synth"):
        for entry in speaker_metadata(folder).values():
            frames += entry["frames"]
            tokens += entry["phones"]
    if not tokens:
        raise ValueError(f"{data.corpus}: no quantized utterances")
    return frames / tokens


@dataclass
class TestItem:
    """One synthesis of the unseen-word test: a voice saying `text`, prompted by another sentence of it."""

    speaker: str
    index: int  # sentence index in the test list
    text: str
    reference: Path  # espeak's rendering of `text` by this voice
    prompt: Path  # this voice saying another test sentence
    others: list[Path]  # this voice saying the voice's other target sentences
    other_text: str  # the next target's text (the control: the right voice saying the wrong words)
    other_reference: Path  # espeak's rendering of `other_text` by this voice


def unseen_items(data: DemoData, n_speakers: int, lists: tuple[int, ...] = TEST_LISTS) -> list[TestItem]:
    """Per voice v: targets (8v + i) mod N for i < 8 and the prompt (8v + 8) mod N, so the voices
    between them say different sentences and no voice is prompted by a sentence it is asked to say.
    `lists`: the Harvard lists spoken in `data.unseen` (the test lists; the development lists when
    choosing settings)."""
    texts = sentences(lists)
    n = len(texts)
    items = []
    for v, voice in enumerate(speakers(n_speakers)):
        folder = data.unseen / "unseen" / voice.name
        wav = lambda i: folder / f"{voice.name}_{i:04d}.wav"  # noqa: E731
        targets = [(N_TARGETS * v + i) % n for i in range(N_TARGETS)]
        prompt = (N_TARGETS * v + N_TARGETS) % n
        for j, t in enumerate(targets):
            nxt = targets[(j + 1) % len(targets)]
            items.append(TestItem(voice.name, t, texts[t], wav(t), wav(prompt),
                                  [wav(o) for o in targets if o != t], texts[nxt], wav(nxt)))
    return items


def heldout_items(data: DemoData) -> list[TestItem]:
    """Per voice: utterance 0 is the prompt, the rest are sentences to synthesize."""
    items = []
    for folder in data.speaker_dirs(data.heldout / "heldout"):
        wavs = sorted(folder.glob("*.wav"))
        prompt, targets = wavs[0], wavs[1:]
        for j, target in enumerate(targets):
            other = targets[(j + 1) % len(targets)] if len(targets) > 1 else prompt
            items.append(TestItem(folder.name, j, target.with_suffix(".txt").read_text(encoding="utf-8").strip(),
                                  target, prompt, [o for o in targets if o != target],
                                  other.with_suffix(".txt").read_text(encoding="utf-8").strip(), other))
    return items
