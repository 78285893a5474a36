"""A generated multi-speaker speech corpus in English, German, French and Spanish, made offline with
espeak-ng (no downloads).

Speech comes from the espeak-ng library of the espeakng-loader wheel, driven through ctypes: a private
copy of the library (see `vall_e.text.espeak`) is initialised in synchronous mode and a callback
collects its int16 samples at espeak's native 22050 Hz, which soxr resamples to the requested rate.
Speakers differ by espeak voice variant (`en-us+m1`, `de+f2`, ...), accent, speaking rate, pitch
and pitch range. Sentences come from small seeded generators, one per language (common words, simple
grammatical sentences of 4 to 12 words), or, in English, from `vall_e.data.lexicon` (made-up words
and common words: sentences that teach phonemes rather than a word list); either way the same seed
always gives the same corpus. A list of given texts can also be spoken by every voice.

Layout: `{out}/{group}/{speaker}/{id}.wav` (16-bit PCM) and `{id}.txt` (the sentence), the standard
`{group}/{speaker}/` folders the data tools read. With several languages each language's speakers go
in a group named after the language (`{out}/en/us_m1/`, `{out}/de/de_m1/`), so that
`dataset.speaker_languages: {de: [de], fr: [fr], es: [es]}` tells the data tools which is which.
`python -m vall_e.emb.g2p` and `vall_e.emb.qnt` turn them into training files.

    python -m vall_e.data.synthetic OUT [--speakers 4] [--utterances 20] [--seed 0] [--language en,de,fr,es]
    python -m vall_e.data.synthetic OUT --sentences lexicon --utterances 600
"""
from __future__ import annotations

import argparse
import ctypes
import random
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from vall_e.data.lexicon import lexicon_sentence
from vall_e.text.espeak import data_path, load_private_library, unload_library
from vall_e.utils.errors import UserError, run_main
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


# Every language has eight voices with the same pattern of espeak variants and prosody: alternating
# sex, different rates and pitches, so that speakers differ clearly: (variant, rate, pitch, range).
_PROSODY: tuple[tuple[str, int, int, int], ...] = (
    ("m1", 165, 40, 45), ("f2", 180, 60, 70), ("m3", 185, 50, 40), ("f4", 160, 55, 60),
    ("m7", 170, 35, 55), ("f1", 175, 65, 50), ("m2", 190, 45, 65), ("f5", 155, 50, 80),
)


def _voices(*accents: tuple[str, str]) -> tuple[Voice, ...]:
    """One voice per prosody slot from its (name prefix, espeak base voice): e.g. ("us", "en-us") and
    slot "m1" give Voice("us_m1", "en-us+m1", ...)."""
    return tuple(Voice(f"{prefix}_{variant}", f"{base}+{variant}", rate=rate, pitch=pitch, range=range_)
                 for (prefix, base), (variant, rate, pitch, range_) in zip(accents, _PROSODY, strict=True))


# English with different accents; the other languages use espeak's regional voices for variety.
# (espeak-ng names the French voice `fr`; `fr-fr` is only its phonemizer language code.)
VOICES: tuple[Voice, ...] = _voices(
    ("us", "en-us"), ("us", "en-us"), ("gb", "en"), ("rp", "en-gb-x-rp"),
    ("us", "en-us"), ("sc", "en-gb-scotland"), ("ny", "en-us-nyc"), ("us", "en-us"))
DE_VOICES: tuple[Voice, ...] = _voices(*[("de", "de")] * 8)
FR_VOICES: tuple[Voice, ...] = _voices(
    ("fr", "fr"), ("fr", "fr"), ("be", "fr-be"), ("fr", "fr"),
    ("ch", "fr-ch"), ("be", "fr-be"), ("fr", "fr"), ("ch", "fr-ch"))
ES_VOICES: tuple[Voice, ...] = _voices(
    ("es", "es"), ("es", "es"), ("lat", "es-419"), ("es", "es"),
    ("es", "es"), ("lat", "es-419"), ("lat", "es-419"), ("es", "es"))
LANGUAGE_VOICES: dict[str, tuple[Voice, ...]] = {"en": VOICES, "de": DE_VOICES, "fr": FR_VOICES, "es": ES_VOICES}
LANGUAGES: tuple[str, ...] = tuple(LANGUAGE_VOICES)  # the corpus languages, by short code
_LANGUAGE_ALIASES = {"en": "en", "en-us": "en", "de": "de", "de-de": "de", "fr": "fr", "fr-fr": "fr",
                     "es": "es", "es-es": "es"}


def corpus_language(code: str) -> str:
    """The corpus's short code (`en`, `de`, `fr`, `es`) for a user code such as `en-US` or `fr-fr`."""
    key = code.strip().lower().replace("_", "-") if isinstance(code, str) else None
    if key not in _LANGUAGE_ALIASES:
        raise UserError(f"the synthetic corpus has sentences in {', '.join(LANGUAGES)} only; "
                        f"unsupported language {code!r}")
    return _LANGUAGE_ALIASES[key]


def corpus_languages(language: str | Sequence[str]) -> list[str]:
    """Short codes of `language`: one code, a comma-separated list (`"en,de"`) or a list of codes."""
    parts = language.split(",") if isinstance(language, str) else list(language)
    if isinstance(language, str) and not language.strip() or not parts:
        raise UserError(f"language must name at least one of {', '.join(LANGUAGES)}, got {language!r}")
    codes = [corpus_language(p) for p in parts]
    dupes = sorted({c for c in codes if codes.count(c) > 1})
    if dupes:
        raise UserError(f"language {language!r} names {', '.join(dupes)} more than once")
    return codes


def speakers(n: int, language: str = "en") -> list[Voice]:
    """The first `n` speakers of a language: its table, then variations of it (other rate and pitch)."""
    if n < 1:
        raise UserError(f"number of speakers must be at least 1, got {n}")
    table = LANGUAGE_VOICES[corpus_language(language)]
    out = []
    for k in range(n):
        base = table[k % len(table)]
        lap = k // len(table)
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
    the library, initialises it, seeds the noise, speaks and unloads it again, which makes every
    utterance depend only on its text and voice (the cost per utterance: benchmarks/README.md,
    "Measurements behind code choices").
    """

    lock = threading.Lock()
    _sample_rate: int | None = None
    _callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self) -> None:
        self.data = data_path()
        self.chunks: list[np.ndarray] = []
        self._callback = self._callback_type(self._collect)  # keep a reference: espeak holds a raw pointer

    def _collect(self, wav, n, events) -> int:
        if n > 0 and wav:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue

    def _open(self) -> ctypes.CDLL:
        """Load and initialise a fresh library instance (call under `lock`)."""
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


def _en_sentence(rng: random.Random) -> str:
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


# The other languages share one sentence shape (statement, two joined statements, question,
# request); each has its own word order and agreement. Nouns carry their gender, and only nouns that
# take no elision or contraction surprises are used (no vowel-initial French nouns, no German weak
# nouns like "Student"), so every generated phrase is grammatical.


class _Grammar:
    """A language's sentence parts; `sentence` assembles them like the English generator.

    A language gives its word lists, `noun_phrase` and `question_words`, and overrides `object_phrase`
    when an object takes another form than a subject, `finite` when the verb needs an auxiliary, and
    `clause` when its word order differs from subject-verb-object-place-adverb.
    """

    conjunctions: tuple[str, ...] = ()
    please: tuple[str, ...] = ()  # the words that open a request
    thing_verbs: tuple[tuple[str, str], ...] = ()  # (finite form, imperative) of verbs taking a thing
    person_verbs: tuple[tuple[str, str], ...] = ()  # ... taking a person
    any_verbs: tuple[tuple[str, str], ...] = ()  # ... taking either
    intransitive: tuple[tuple[str, str], ...] = ()
    places: tuple[str, ...] = ()
    adverbs: tuple[str, ...] = ()

    def noun_phrase(self, rng: random.Random, person: bool) -> list[str]:
        raise NotImplementedError

    def object_phrase(self, rng: random.Random, person: bool) -> list[str]:
        return self.noun_phrase(rng, person)

    def verb_object(self, rng: random.Random) -> tuple[tuple[str, str], list[str]]:
        r = rng.random()
        if r < 0.4:
            return rng.choice(self.thing_verbs), self.object_phrase(rng, False)
        if r < 0.55:
            return rng.choice(self.person_verbs), self.object_phrase(rng, True)
        if r < 0.7:
            return rng.choice(self.any_verbs), self.object_phrase(rng, rng.random() < 0.5)
        return rng.choice(self.intransitive), []

    def finite(self, verb: tuple[str, str]) -> list[str]:
        """The verb's finite form in a statement (and a question)."""
        return [verb[0]]

    def clause(self, rng: random.Random) -> list[str]:
        subject = self.noun_phrase(rng, True)
        verb, obj = self.verb_object(rng)
        words = subject + self.finite(verb) + obj
        if rng.random() < 0.4:
            words += rng.choice(self.places).split()
        if rng.random() < 0.3:
            words += rng.choice(self.adverbs).split()
        return words

    def question_words(self, subject: list[str], verb: list[str], obj: list[str]) -> list[str]:
        raise NotImplementedError

    def question(self, rng: random.Random) -> list[str]:
        subject = self.noun_phrase(rng, True)
        verb, obj = self.verb_object(rng)
        words = self.question_words(subject, self.finite(verb), obj)
        if rng.random() < 0.4:
            words += rng.choice(self.places).split()
        return words

    def request(self, rng: random.Random) -> list[str]:
        verb, obj = self.verb_object(rng)
        words = [*self.please, verb[1]] + obj
        if rng.random() < 0.6:
            words += rng.choice(self.places).split()
        return words

    def sentence(self, rng: random.Random) -> str:
        while True:
            kind = rng.random()
            if kind < 0.6:
                words, end = self.clause(rng), "."
            elif kind < 0.75:
                a, b = self.clause(rng), self.clause(rng)
                words, end = a[:-1] + [a[-1] + ","] + rng.choice(self.conjunctions).split() + b, "."
            elif kind < 0.9:
                words, end = self.question(rng), "?"
            else:
                words, end = self.request(rng), "."
            if 4 <= len(words) <= 12:
                first = words[0]
                k = next(i for i, c in enumerate(first) if c.isalpha())  # past a leading "¿"
                words[0] = first[:k] + first[k].upper() + first[k + 1:]
                return " ".join(words) + end


class _German(_Grammar):
    """Present tense, verb second; articles and adjective endings agree in case and gender."""

    people = (("Lehrer", "m"), ("Arzt", "m"), ("Freund", "m"), ("Bäcker", "m"), ("Fahrer", "m"),
              ("Hund", "m"), ("Vogel", "m"), ("Katze", "f"), ("Lehrerin", "f"), ("Ärztin", "f"),
              ("Freundin", "f"), ("Mädchen", "n"), ("Kind", "n"), ("Pferd", "n"))
    things = (("Brief", "m"), ("Tisch", "m"), ("Korb", "m"), ("Apfel", "m"), ("Mantel", "m"),
              ("Schlüssel", "m"), ("Buch", "n"), ("Boot", "n"), ("Haus", "n"), ("Fenster", "n"),
              ("Lied", "n"), ("Bild", "n"), ("Fahrrad", "n"), ("Tür", "f"), ("Lampe", "f"),
              ("Flasche", "f"), ("Karte", "f"), ("Kiste", "f"), ("Tasche", "f"), ("Geschichte", "f"))
    adjectives = ("klein", "alt", "grün", "hell", "kalt", "schwer", "warm", "leer", "rot", "neu",
                  "blau", "groß", "sauber", "seltsam")
    people_adjectives = ("alt", "jung", "klein", "ruhig", "fleißig", "freundlich", "glücklich", "klug")
    # determiner -> ((nominative m, f, n), (accusative m, f, n)); "der"/"dieser" take weak adjective endings
    determiners = {"der": (("der", "die", "das"), ("den", "die", "das")),
                   "ein": (("ein", "eine", "ein"), ("einen", "eine", "ein")),
                   "mein": (("mein", "meine", "mein"), ("meinen", "meine", "mein")),
                   "unser": (("unser", "unsere", "unser"), ("unseren", "unsere", "unser")),
                   "dieser": (("dieser", "diese", "dieses"), ("diesen", "diese", "dieses"))}
    weak_endings = (("e", "e", "e"), ("en", "e", "e"))
    mixed_endings = (("er", "e", "es"), ("en", "e", "es"))
    # (3rd person singular, imperative); objects: things, people or animals, either
    thing_verbs = (("findet", "finde"), ("malt", "male"), ("trägt", "trage"), ("öffnet", "öffne"),
                   ("putzt", "putze"), ("kauft", "kaufe"), ("verkauft", "verkaufe"), ("wäscht", "wasche"),
                   ("holt", "hole"), ("sucht", "suche"))
    person_verbs = (("besucht", "besuche"), ("trifft", "triff"), ("fragt", "frage"), ("grüßt", "grüße"),
                    ("ruft", "rufe"), ("kennt", "kenne"))
    any_verbs = (("sieht", "sieh"), ("hört", "höre"), ("zeichnet", "zeichne"), ("beobachtet", "beobachte"))
    intransitive = (("schläft", "schlaf"), ("lacht", "lache"), ("wartet", "warte"), ("tanzt", "tanze"),
                    ("singt", "singe"), ("arbeitet", "arbeite"), ("lächelt", "lächle"), ("liest", "lies"),
                    ("schwimmt", "schwimm"), ("spielt", "spiele"))
    adverbs = ("heute", "gestern", "wieder", "langsam", "schnell", "leise", "früh", "später", "oft", "gern")
    places = ("am Fluss", "im Garten", "auf dem Markt", "am Fenster", "auf der Straße", "in der Küche",
              "hinter dem Haus", "in der Schule", "unter der alten Brücke", "in der Stadt")
    names = ("Anna", "Peter", "Maria", "Thomas", "Laura", "Lukas", "Julia", "Felix")
    conjunctions = ("und", "aber", "denn")
    please = ("bitte",)

    def noun_phrase(self, rng: random.Random, person: bool, case: int = 0) -> list[str]:
        """A name or `det [adj] Noun`; case 0 = nominative, 1 = accusative."""
        if person and rng.random() < 0.25:
            return [rng.choice(self.names)]
        noun, gender = rng.choice(self.people if person else self.things)
        g = "mfn".index(gender)
        adj = rng.choice(self.people_adjectives if person else self.adjectives) if rng.random() < 0.5 else None
        det = rng.choice(("der", "der", "ein", "mein", "unser", "dieser"))
        words = [self.determiners[det][case][g]]
        if adj:
            endings = self.weak_endings if det in ("der", "dieser") else self.mixed_endings
            words.append(adj + endings[case][g])
        return words + [noun]

    def object_phrase(self, rng: random.Random, person: bool) -> list[str]:
        return self.noun_phrase(rng, person, 1)  # accusative

    def clause(self, rng: random.Random) -> list[str]:
        subject = self.noun_phrase(rng, True, 0)
        verb, obj = self.verb_object(rng)
        words = subject + [verb[0]]
        if rng.random() < 0.3:  # time/manner before the object and the place
            words.append(rng.choice(self.adverbs))
        words += obj
        if rng.random() < 0.4:
            words += rng.choice(self.places).split()
        return words

    def question_words(self, subject: list[str], verb: list[str], obj: list[str]) -> list[str]:
        return verb + subject + obj


class _French(_Grammar):
    """Passé composé with avoir; articles and adjectives (after the noun) agree in gender."""

    people = (("professeur", "m"), ("médecin", "m"), ("boulanger", "m"), ("voisin", "m"), ("voisine", "f"),
              ("fermier", "m"), ("chien", "m"), ("chat", "m"), ("cheval", "m"), ("fille", "f"),
              ("garçon", "m"), ("pilote", "m"), ("danseuse", "f"), ("cousine", "f"))
    things = (("livre", "m"), ("bateau", "m"), ("panier", "m"), ("tableau", "m"), ("sac", "m"),
              ("manteau", "m"), ("vélo", "m"), ("chapeau", "m"), ("verre", "m"), ("lettre", "f"),
              ("maison", "f"), ("table", "f"), ("fenêtre", "f"), ("porte", "f"), ("chanson", "f"),
              ("lampe", "f"), ("bouteille", "f"), ("boîte", "f"), ("carte", "f"), ("pomme", "f"))
    # (masculine, feminine)
    adjectives = (("rouge", "rouge"), ("vert", "verte"), ("bleu", "bleue"), ("noir", "noire"),
                  ("froid", "froide"), ("lourd", "lourde"), ("vide", "vide"), ("propre", "propre"),
                  ("étrange", "étrange"), ("blanc", "blanche"))
    people_adjectives = (("heureux", "heureuse"), ("calme", "calme"), ("fatigué", "fatiguée"),
                         ("content", "contente"), ("sage", "sage"), ("patient", "patiente"))
    determiners = (("le", "la"), ("le", "la"), ("un", "une"), ("mon", "ma"), ("notre", "notre"),
                   ("ce", "cette"))
    # (past participle, imperative); all conjugate with avoir
    thing_verbs = (("trouvé", "trouvez"), ("peint", "peignez"), ("porté", "portez"), ("ouvert", "ouvrez"),
                   ("nettoyé", "nettoyez"), ("acheté", "achetez"), ("vendu", "vendez"), ("lavé", "lavez"),
                   ("cherché", "cherchez"), ("pris", "prenez"))
    person_verbs = (("suivi", "suivez"), ("appelé", "appelez"), ("aidé", "aidez"), ("rencontré", "rencontrez"),
                    ("remercié", "remerciez"), ("salué", "saluez"))
    any_verbs = (("vu", "voyez"), ("regardé", "regardez"), ("remarqué", "remarquez"), ("dessiné", "dessinez"))
    intransitive = (("dormi", "dormez"), ("ri", "riez"), ("attendu", "attendez"), ("dansé", "dansez"),
                    ("chanté", "chantez"), ("travaillé", "travaillez"), ("souri", "souriez"),
                    ("marché", "marchez"), ("mangé", "mangez"), ("joué", "jouez"))
    adverbs = ("aujourd'hui", "hier", "encore", "lentement", "vite", "tôt", "souvent", "doucement",
               "plus tard", "ce matin")
    places = ("près de la rivière", "dans le jardin", "au marché", "à la fenêtre", "sur la route",
              "dans la cuisine", "derrière la maison", "à l'école", "sous le vieux pont", "en ville")
    names = ("Marie", "Pierre", "Julie", "Paul", "Sophie", "Louis", "Claire", "Thomas")  # no vowel start
    conjunctions = ("et", "mais", "donc")
    please = ("s'il", "vous", "plaît,")

    def noun_phrase(self, rng: random.Random, person: bool) -> list[str]:
        if person and rng.random() < 0.25:
            return [rng.choice(self.names)]
        noun, gender = rng.choice(self.people if person else self.things)
        g = "mf".index(gender)
        adj = rng.choice(self.people_adjectives if person else self.adjectives) if rng.random() < 0.5 else None
        return [rng.choice(self.determiners)[g], noun] + ([adj[g]] if adj else [])


    def finite(self, verb: tuple[str, str]) -> list[str]:
        return ["a", verb[0]]  # passé composé with avoir

    def question_words(self, subject: list[str], verb: list[str], obj: list[str]) -> list[str]:
        return ["est-ce", "que"] + subject + verb + obj  # a subject is never vowel-initial: no elision


class _Spanish(_Grammar):
    """Preterite; articles and adjectives (after the noun) agree in gender; personal "a" (a + el = al)."""

    people = (("maestro", "m"), ("maestra", "f"), ("médico", "m"), ("doctora", "f"), ("panadero", "m"),
              ("vecino", "m"), ("vecina", "f"), ("amigo", "m"), ("amiga", "f"), ("niño", "m"),
              ("niña", "f"), ("perro", "m"), ("gato", "m"), ("caballo", "m"))
    things = (("libro", "m"), ("barco", "m"), ("cesto", "m"), ("cuadro", "m"), ("sombrero", "m"),
              ("abrigo", "m"), ("coche", "m"), ("vaso", "m"), ("carta", "f"), ("casa", "f"), ("mesa", "f"),
              ("ventana", "f"), ("puerta", "f"), ("canción", "f"), ("lámpara", "f"), ("botella", "f"),
              ("caja", "f"), ("manzana", "f"), ("silla", "f"), ("llave", "f"))
    adjectives = (("rojo", "roja"), ("verde", "verde"), ("azul", "azul"), ("nuevo", "nueva"),
                  ("viejo", "vieja"), ("pequeño", "pequeña"), ("grande", "grande"), ("frío", "fría"),
                  ("limpio", "limpia"), ("vacío", "vacía"), ("blanco", "blanca"))
    people_adjectives = (("alegre", "alegre"), ("cansado", "cansada"), ("joven", "joven"),
                         ("amable", "amable"), ("tranquilo", "tranquila"), ("viejo", "vieja"))
    determiners = (("el", "la"), ("el", "la"), ("un", "una"), ("mi", "mi"), ("nuestro", "nuestra"),
                   ("este", "esta"))
    # (preterite, formal imperative)
    thing_verbs = (("encontró", "encuentre"), ("pintó", "pinte"), ("llevó", "lleve"), ("abrió", "abra"),
                   ("limpió", "limpie"), ("compró", "compre"), ("movió", "mueva"), ("lavó", "lave"),
                   ("vendió", "venda"), ("buscó", "busque"))
    person_verbs = (("visitó", "visite"), ("siguió", "siga"), ("ayudó", "ayude"), ("llamó", "llame"),
                    ("saludó", "salude"), ("conoció", "conozca"))
    any_verbs = (("vio", "vea"), ("miró", "mire"), ("escuchó", "escuche"), ("dibujó", "dibuje"))
    intransitive = (("durmió", "duerma"), ("corrió", "corra"), ("esperó", "espere"), ("bailó", "baile"),
                    ("cantó", "cante"), ("trabajó", "trabaje"), ("sonrió", "sonría"), ("caminó", "camine"),
                    ("llegó", "llegue"), ("descansó", "descanse"))
    adverbs = ("hoy", "ayer", "otra vez", "despacio", "temprano", "más tarde", "de nuevo", "esta mañana",
               "rápidamente", "tranquilamente")
    places = ("cerca del río", "en el jardín", "en el mercado", "junto a la ventana", "en la calle",
              "en la cocina", "detrás de la casa", "en la escuela", "bajo el viejo puente", "en la ciudad")
    names = ("Ana", "Pablo", "Lucía", "Carlos", "Sofía", "Miguel", "Elena", "Diego")  # none starts with i
    conjunctions = ("y", "pero", "así que")
    please = ("por", "favor,")

    def noun_phrase(self, rng: random.Random, person: bool, obj: bool = False) -> list[str]:
        """A name or `det noun [adj]`; a person as object takes the personal "a"."""
        if person and rng.random() < 0.25:
            words = [rng.choice(self.names)]
        else:
            noun, gender = rng.choice(self.people if person else self.things)
            g = "mf".index(gender)
            adj = rng.choice(self.people_adjectives if person else self.adjectives) if rng.random() < 0.5 else None
            words = [rng.choice(self.determiners)[g], noun] + ([adj[g]] if adj else [])
        if person and obj:
            words = ["al"] + words[1:] if words[0] == "el" else ["a"] + words
        return words

    def object_phrase(self, rng: random.Random, person: bool) -> list[str]:
        return self.noun_phrase(rng, person, True)

    def question_words(self, subject: list[str], verb: list[str], obj: list[str]) -> list[str]:
        return ["¿" + verb[0]] + subject + obj


_GRAMMARS: dict[str, _Grammar] = {"de": _German(), "fr": _French(), "es": _Spanish()}


def make_sentence(rng: random.Random, language: str = "en") -> str:
    """One simple grammatical sentence of 4 to 12 words in `language` (en, de, fr or es)."""
    lang = corpus_language(language)
    if lang == "en":
        return _en_sentence(rng)
    return _GRAMMARS[lang].sentence(rng)


def _rng_seed(lang: str, seed: int | str) -> str:
    """The sentence seed string of a language; English keeps the seeds it always had."""
    return f"{seed}" if lang == "en" else f"{lang}:{seed}"


def make_sentences(n: int, seed: int = 0, language: str = "en") -> list[str]:
    """`n` sentences in `language`, the same for the same seed."""
    lang = corpus_language(language)
    rng = random.Random(f"sentences:{_rng_seed(lang, seed)}")
    return [make_sentence(rng, lang) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# corpus


def speaker_plan(n_speakers: int, language: str | Sequence[str] = "en") -> dict[str, list[Voice]]:
    """Speakers per corpus language: `n_speakers` dealt out in turn over the languages, in order."""
    langs = corpus_languages(language)
    if n_speakers < 1:
        raise UserError(f"number of speakers must be at least 1, got {n_speakers}")
    if n_speakers < len(langs):
        raise UserError(f"{n_speakers} speaker(s) cannot cover {len(langs)} languages ({', '.join(langs)}); "
                        "use at least one speaker per language")
    counts = [n_speakers // len(langs) + (i < n_speakers % len(langs)) for i in range(len(langs))]
    return {lang: speakers(c, lang) for lang, c in zip(langs, counts)}


SENTENCE_SOURCES = ("grammar", "lexicon")


def generate_corpus(out_dir: str | Path, n_speakers: int = 4, n_utterances: int = 20, seed: int = 0,
                    sample_rate: int = 24000, language: str | Sequence[str] = "en", group: str = "synth",
                    progress: bool = True, sentences: str = "grammar", exclude: Iterable[str] = (),
                    texts: Sequence[str] | None = None) -> list[Path]:
    """Write `{out_dir}/{group}/{speaker}/{id}.wav` + `{id}.txt`; return all the wav paths.

    `language` is one code (en, de, fr, es) or several (`"en,de,fr,es"` or a list); the speakers are
    then dealt out over them in turn and each language's speakers go in the group `{out_dir}/{lang}`
    instead of `group`. Utterances whose wav and txt both exist are skipped (an interrupted run
    resumes). Each utterance's sentence depends only on (language, seed, speaker index within its
    language, utterance index), so an English group is the same alone or beside other languages.
    `sentences`: "grammar" (the per-language generators) or "lexicon" (English only, see
    `vall_e.data.lexicon`; words in `exclude` never occur). `texts`: every voice says these instead
    (n_utterances is then their number).
    """
    plan = speaker_plan(n_speakers, language)
    if sentences not in SENTENCE_SOURCES:
        raise UserError(f"sentences {sentences!r}: choose one of {', '.join(SENTENCE_SOURCES)}")
    if sentences == "lexicon" and set(plan) != {"en"}:
        raise UserError("lexicon sentences are English only (language en)")
    if texts is not None:
        texts = [" ".join(t.split()) for t in texts]
        if not texts or not all(texts):
            raise UserError("texts: give at least one non-empty text")
        n_utterances = len(texts)
    banned = {w.lower() for w in exclude}
    if n_utterances < 1:
        raise UserError(f"number of utterances must be at least 1, got {n_utterances}")
    if not group or "/" in group or "\\" in group or group.startswith("."):
        raise UserError(f"group must be a plain folder name, got {group!r}")
    multi = len(plan) > 1
    paths: list[Path] = []
    with tqdm(total=n_speakers * n_utterances, desc="corpus", unit="utt", disable=not progress,
              file=sys.stderr) as bar:
        for lang, voices in plan.items():
            root = Path(out_dir) / (lang if multi else group)
            for k, voice in enumerate(voices):
                folder = root / voice.name
                for i in range(n_utterances):
                    uid = f"{voice.name}_{i:04d}"
                    wav_path, txt_path = folder / f"{uid}.wav", folder / f"{uid}.txt"
                    paths.append(wav_path)
                    bar.update(1)
                    if wav_path.exists() and txt_path.exists():
                        continue
                    if texts is not None:
                        text = texts[i]
                    elif sentences == "lexicon":
                        text = lexicon_sentence(random.Random(f"lexicon:{seed}:{k}:{i}"), banned)
                    else:
                        text = make_sentence(random.Random(f"{_rng_seed(lang, seed)}:{k}:{i}"), lang)
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
    parser.add_argument("--language", default="en",
                        help=f"language, or comma-separated languages whose speakers each get a group named "
                             f"after the language ({','.join(LANGUAGES)}; default en)")
    parser.add_argument("--group", default="synth", help="group folder name of a one-language corpus (default synth)")
    parser.add_argument("--sentences", default="grammar", choices=SENTENCE_SOURCES,
                        help="grammar: small per-language grammars; lexicon: made-up and common English words, "
                             "which teach a model to read words it never heard (English only; default grammar)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    paths = generate_corpus(args.out, args.speakers, args.utterances, args.seed, args.sample_rate,
                            language=args.language, group=args.group, progress=not args.quiet,
                            sentences=args.sentences)
    langs = corpus_languages(args.language)
    if len(langs) == 1:
        print(f"{len(paths)} utterances in {Path(args.out) / args.group}")
    else:
        print(f"{len(paths)} utterances in {', '.join(str(Path(args.out) / lang) for lang in langs)}")
        groups = ", ".join(f"{lang}: [{lang}]" for lang in langs)
        print(f"for training, set dataset.speaker_languages: {{{groups}}}")
    return 0


if __name__ == "__main__":
    run_main(main)
