"""A generated multi-speaker English speech corpus, made offline with espeak-ng (no downloads).

Speech comes from the espeak-ng library of the espeakng-loader wheel, driven through ctypes: a private
copy of the library (see `vall_e.text.espeak`) is initialised in synchronous mode and a callback
collects its int16 samples at espeak's native 22050 Hz, which soxr resamples to the requested rate.
Speakers differ by espeak voice variant (`en-us+m1`, `en-us+f2`, ...), accent, speaking rate, pitch
and pitch range. Sentences come from a small seeded generator (common words, simple grammatical
sentences of 4 to 12 words), so the same seed always gives the same corpus.

Layout: `{out}/{group}/{speaker}/{id}.wav` (16-bit PCM) and `{id}.txt` (the sentence), the standard
`{group}/{speaker}/` folders the data tools read. `python -m vall_e.emb.g2p` and `vall_e.emb.qnt`
turn them into training files.

    python -m vall_e.data.synthetic OUT [--speakers 4] [--utterances 20] [--seed 0]
"""
from __future__ import annotations

import argparse
import ctypes
import random
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from vall_e.errors import UserError, run_main
from vall_e.utils.io import atomic_path, atomic_write_text

# espeak-ng API constants (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 0x02
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4

_RAND_SEED = 1  # fixed seed of espeak's noise generator: same text and voice, same samples
PAD_SECONDS = 0.15  # silence added before and after each corpus utterance, like recorded speech


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: an espeak voice (`base+variant`) plus prosody settings."""

    name: str  # speaker folder name
    espeak: str  # espeak-ng voice, e.g. "en-us+f2"
    rate: int = 175  # words per minute (espeak's default is 175)
    pitch: int = 50  # base pitch 0..100 (default 50)
    range: int = 50  # pitch range 0..100 (default 50)


# Alternating sex, different accents, rates and pitches, so that speakers differ clearly.
VOICES: tuple[Voice, ...] = (
    Voice("us_m1", "en-us+m1", rate=165, pitch=40, range=45),
    Voice("us_f2", "en-us+f2", rate=180, pitch=60, range=70),
    Voice("gb_m3", "en+m3", rate=185, pitch=50, range=40),
    Voice("rp_f4", "en-gb-x-rp+f4", rate=160, pitch=55, range=60),
    Voice("us_m7", "en-us+m7", rate=170, pitch=35, range=55),
    Voice("sc_f1", "en-gb-scotland+f1", rate=175, pitch=65, range=50),
    Voice("ny_m2", "en-us-nyc+m2", rate=190, pitch=45, range=65),
    Voice("us_f5", "en-us+f5", rate=155, pitch=50, range=80),
)


def speakers(n: int) -> list[Voice]:
    """The first `n` corpus speakers: the table, then variations of it (other rate and pitch)."""
    if n < 1:
        raise UserError(f"number of speakers must be at least 1, got {n}")
    out = []
    for k in range(n):
        base = VOICES[k % len(VOICES)]
        lap = k // len(VOICES)
        if lap == 0:
            out.append(base)
        else:  # deterministic variation per lap: different rate, pitch and range
            out.append(replace(base, name=f"{base.name}_{lap}",
                               rate=150 + (base.rate - 150 + 13 * lap) % 45,
                               pitch=max(0, min(100, base.pitch + (-1) ** lap * 8 * ((lap + 1) // 2))),
                               range=20 + (base.range + 17 * lap) % 70))
    return out


# ---------------------------------------------------------------------------------------------
# espeak-ng through ctypes


class _Espeak:
    """espeak-ng synthesis from a private copy of the library.

    espeak-ng keeps state (oscillator phase, filter memory) in static variables that survive
    `espeak_Terminate`, so the same text would come out slightly different depending on what was
    spoken before, and it seeds its noise generator from the clock. Each utterance therefore loads
    the library, initialises it, seeds the noise, speaks and unloads it again (about 10 ms), which
    makes every utterance depend only on its text and voice.
    """

    lock = threading.Lock()
    _sample_rate: int | None = None
    _callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self) -> None:
        from vall_e.text.espeak import data_path

        self.data = data_path()
        self.chunks: list[np.ndarray] = []
        self._callback = self._callback_type(self._collect)  # keep a reference: espeak holds a raw pointer

    def _collect(self, wav, n, events) -> int:
        if n > 0 and wav:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue

    def _open(self) -> ctypes.CDLL:
        """Load and initialise a fresh library instance (call under `lock`)."""
        from vall_e.text.espeak import load_private_library, unload_library

        lib = load_private_library()
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                     self.data.encode() if self.data else None, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            unload_library(lib)
            raise UserError("espeak-ng failed to initialise (is its data folder present?)")
        _Espeak._sample_rate = int(rate)  # 22050 for espeak-ng
        if hasattr(lib, "espeak_ng_SetRandSeed"):  # breathy variants use noise from a clock-seeded generator
            lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
            lib.espeak_ng_SetRandSeed(_RAND_SEED)
        lib.espeak_SetSynthCallback(self._callback)
        return lib

    @staticmethod
    def _close(lib: ctypes.CDLL) -> None:
        from vall_e.text.espeak import unload_library

        lib.espeak_Terminate()
        unload_library(lib)

    @property
    def sample_rate(self) -> int:
        if _Espeak._sample_rate is None:
            with self.lock:
                self._close(self._open())
        assert _Espeak._sample_rate is not None
        return _Espeak._sample_rate

    def _check_variant(self, voice: str) -> None:
        if "+" in voice and self.data:
            variant = voice.split("+", 1)[1]
            if not (Path(self.data) / "voices" / "!v" / variant).is_file():
                raise UserError(f"unknown espeak-ng voice variant {variant!r} in voice {voice!r}")

    def speak(self, text: str, voice: Voice) -> np.ndarray:
        """int16 samples at `sample_rate` for `text` in `voice`."""
        self._check_variant(voice.espeak)
        data = text.replace("\x00", " ").encode("utf-8")
        with self.lock:
            lib = self._open()
            try:
                if lib.espeak_SetVoiceByName(voice.espeak.encode("utf-8")) != 0:
                    raise UserError(f"unknown espeak-ng voice {voice.espeak!r}")
                for param, value in ((_RATE, voice.rate), (_PITCH, voice.pitch), (_RANGE, voice.range),
                                     (_VOLUME, 100)):
                    lib.espeak_SetParameter(param, int(value), 0)
                self.chunks = []
                err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
                chunks, self.chunks = self.chunks, []
            finally:
                self._close(lib)
                del lib
        if err != 0:
            raise UserError(f"espeak-ng failed to synthesize {text[:40]!r} (error {err})")
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


_engine: _Espeak | None = None


def _get_engine() -> _Espeak:
    global _engine
    if _engine is None:
        _engine = _Espeak()
    return _engine


def native_sample_rate() -> int:
    """espeak-ng's own output rate (22050 Hz)."""
    return _get_engine().sample_rate


def synthesize(text: str, voice: str | Voice = "en-us", sample_rate: int = 24000) -> np.ndarray:
    """Speech for `text` as mono float32 in [-1, 1] at `sample_rate`.

    `voice` is a `Voice` or an espeak-ng voice name such as "en-us+f2" (default prosody).
    """
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"text to synthesize must be a non-empty string, got {text!r}")
    if isinstance(voice, str):
        voice = Voice(name=voice, espeak=voice)
    if not isinstance(sample_rate, int) or sample_rate < 1000:
        raise UserError(f"sample rate must be an integer of at least 1000 Hz, got {sample_rate!r}")
    engine = _get_engine()
    pcm = engine.speak(text, voice)
    if pcm.size == 0:
        raise UserError(f"espeak-ng produced no audio for {text[:40]!r}")
    wav = pcm.astype(np.float32) / 32768.0
    if sample_rate != engine.sample_rate:
        import soxr

        wav = soxr.resample(wav, engine.sample_rate, sample_rate, quality="HQ").astype(np.float32)
    return np.clip(wav, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# sentences

_PEOPLE = ("teacher", "farmer", "child", "doctor", "friend", "neighbor", "baker", "pilot", "student",
           "driver", "dog", "cat", "bird", "horse")
_THINGS = ("letter", "book", "boat", "house", "table", "window", "song", "story", "apple", "basket",
           "kitchen", "garden", "picture", "bicycle", "door", "map", "coat", "lamp", "bottle", "box")
_ADJECTIVES = ("small", "old", "green", "bright", "cold", "heavy", "little", "warm", "empty", "red",
               "strange", "new", "blue", "clean", "large")
_PEOPLE_ADJECTIVES = ("old", "quiet", "happy", "busy", "tall", "gentle", "young", "little", "clever", "lazy")
# (past, base); objects: things, people or animals, either
_THING_VERBS = (("found", "find"), ("painted", "paint"), ("carried", "carry"), ("opened", "open"),
                ("cleaned", "clean"), ("bought", "buy"), ("moved", "move"), ("washed", "wash"),
                ("sold", "sell"), ("dropped", "drop"))
_PERSON_VERBS = (("visited", "visit"), ("followed", "follow"), ("helped", "help"), ("called", "call"),
                 ("met", "meet"), ("thanked", "thank"))
_ANY_VERBS = (("saw", "see"), ("watched", "watch"), ("noticed", "notice"), ("liked", "like"))
_INTRANSITIVE = (("slept", "sleep"), ("laughed", "laugh"), ("waited", "wait"), ("danced", "dance"),
                 ("arrived", "arrive"), ("smiled", "smile"), ("rested", "rest"), ("sang", "sing"),
                 ("walked", "walk"), ("worked", "work"))
_ADVERBS = ("slowly", "quickly", "today", "yesterday", "again", "quietly", "early", "later", "often", "together")
_PLACES = ("near the river", "in the garden", "at the market", "by the window", "on the road",
           "in the kitchen", "behind the house", "at school", "under the old bridge", "in the city")
_NAMES = ("Anna", "Peter", "Maria", "David", "Susan", "Thomas", "Laura", "James")


def _noun_phrase(rng: random.Random, person: bool) -> list[str]:
    """A name or `det [adj] noun`, of a person/animal or of a thing."""
    if person and rng.random() < 0.25:
        return [rng.choice(_NAMES)]
    noun = rng.choice(_PEOPLE if person else _THINGS)
    adj = rng.choice(_PEOPLE_ADJECTIVES if person else _ADJECTIVES) if rng.random() < 0.5 else None
    det = rng.choice(("the", "the", "a", "my", "our", "this", "that"))
    if det == "a" and (adj or noun)[0] in "aeiou":
        det = "an"
    return [det] + ([adj] if adj else []) + [noun]


def _predicate(rng: random.Random, tense: int) -> list[str]:
    """Verb phrase: tense 0 = past, 1 = base form."""
    r = rng.random()
    if r < 0.4:
        return [rng.choice(_THING_VERBS)[tense]] + _noun_phrase(rng, person=False)
    if r < 0.55:
        return [rng.choice(_PERSON_VERBS)[tense]] + _noun_phrase(rng, person=True)
    if r < 0.7:
        return [rng.choice(_ANY_VERBS)[tense]] + _noun_phrase(rng, person=rng.random() < 0.5)
    return [rng.choice(_INTRANSITIVE)[tense]]


def _clause(rng: random.Random) -> list[str]:
    words = _noun_phrase(rng, person=True) + _predicate(rng, 0)
    if rng.random() < 0.4:
        words += rng.choice(_PLACES).split()
    if rng.random() < 0.3:
        words.append(rng.choice(_ADVERBS))
    return words


def make_sentence(rng: random.Random) -> str:
    """One simple grammatical English sentence of 4 to 12 words."""
    while True:
        kind = rng.random()
        if kind < 0.6:
            words, end = _clause(rng), "."
        elif kind < 0.75:
            a, b = _clause(rng), _clause(rng)
            words, end = a[:-1] + [a[-1] + ","] + [rng.choice(("and", "but", "so"))] + b, "."
        elif kind < 0.9:
            words, end = ["did"] + _noun_phrase(rng, person=True) + _predicate(rng, 1), "?"
            if rng.random() < 0.4:
                words += rng.choice(_PLACES).split()
        else:
            words, end = ["please"] + _predicate(rng, 1), "."
            if rng.random() < 0.6:
                words += rng.choice(_PLACES).split()
        if 4 <= len(words) <= 12:
            words[0] = words[0][0].upper() + words[0][1:]
            return " ".join(words) + end


def make_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` sentences, the same for the same seed."""
    rng = random.Random(f"sentences:{seed}")
    return [make_sentence(rng) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# corpus


def generate_corpus(out_dir: str | Path, n_speakers: int = 4, n_utterances: int = 20, seed: int = 0,
                    sample_rate: int = 24000, language: str = "en", group: str = "synth",
                    progress: bool = True) -> list[Path]:
    """Write `{out_dir}/{group}/{speaker}/{id}.wav` + `{id}.txt`; return all the wav paths.

    Utterances whose wav and txt both exist are skipped (an interrupted run resumes). Each
    utterance's sentence depends only on (seed, speaker index, utterance index).
    """
    from tqdm import tqdm

    if str(language).strip().lower().replace("_", "-") not in ("en", "en-us"):
        raise UserError(f"the synthetic corpus has English sentences only; language must be 'en', not {language!r}")
    if n_utterances < 1:
        raise UserError(f"number of utterances must be at least 1, got {n_utterances}")
    if not group or "/" in group or "\\" in group or group.startswith("."):
        raise UserError(f"group must be a plain folder name, got {group!r}")
    import soundfile as sf

    root = Path(out_dir) / group
    voices = speakers(n_speakers)
    paths: list[Path] = []
    with tqdm(total=len(voices) * n_utterances, desc="corpus", unit="utt", disable=not progress,
              file=sys.stderr) as bar:
        for k, voice in enumerate(voices):
            folder = root / voice.name
            for i in range(n_utterances):
                uid = f"{voice.name}_{i:04d}"
                wav_path, txt_path = folder / f"{uid}.wav", folder / f"{uid}.txt"
                paths.append(wav_path)
                bar.update(1)
                if wav_path.exists() and txt_path.exists():
                    continue
                text = make_sentence(random.Random(f"{seed}:{k}:{i}"))
                wav = synthesize(text, voice, sample_rate)
                pad = np.zeros(int(round(PAD_SECONDS * sample_rate)), np.float32)
                wav = np.concatenate([pad, wav, pad])
                with atomic_path(wav_path) as tmp:
                    sf.write(tmp, wav, sample_rate, subtype="PCM_16", format="WAV")
                atomic_write_text(txt_path, text + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vall_e.data.synthetic",
                                     description="Generate an offline multi-speaker espeak-ng speech corpus.")
    parser.add_argument("out", metavar="OUT", help="output folder")
    parser.add_argument("--speakers", type=int, default=4, help="number of speakers (default 4)")
    parser.add_argument("--utterances", type=int, default=20, help="utterances per speaker (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="sentence seed (default 0)")
    parser.add_argument("--sample-rate", type=int, default=24000, help="output sample rate (default 24000)")
    parser.add_argument("--group", default="synth", help="group folder name (default synth)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    paths = generate_corpus(args.out, args.speakers, args.utterances, args.seed, args.sample_rate,
                            group=args.group, progress=not args.quiet)
    print(f"{len(paths)} utterances in {Path(args.out) / args.group}")
    return 0


if __name__ == "__main__":
    run_main(main)
