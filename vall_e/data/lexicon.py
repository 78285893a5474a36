"""English sentences that teach a TTS model phonemes rather than a word list.

A model trained on a small grammar's sentences learns that grammar's words, not how to read: on words
it never saw it was no better than chance (README, "What the demo does"). These sentences mix made-up
words that look like English (syllables of English spelling: an onset, a vowel spelling and a coda,
which espeak-ng reads with its letter-to-sound rules) with common English words and names (faker's
word lists), 4 to 10 words, with an occasional comma and question or exclamation marks. Nearly every
sentence is new, and the phonemes, stress patterns and word boundaries vary as widely as English
allows. Words an evaluation set uses are kept out by spelling (`excluded`).

    lexicon_sentences(1000, seed=0, excluded={"birch", "canoe"})
"""
from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Collection, Iterable, Sequence

from faker.providers.lorem.en_US import Provider as _Lorem
from faker.providers.person.en_US import Provider as _Person

# English spellings of syllable onsets, vowels and codas; the empty onsets and codas make vowel-initial
# and open syllables as common as English has them
ONSETS = ("b", "bl", "br", "c", "ch", "cl", "cr", "d", "dr", "f", "fl", "fr", "g", "gl", "gr", "h", "j", "k",
          "l", "m", "n", "p", "pl", "pr", "qu", "r", "s", "sc", "sh", "sk", "sl", "sm", "sn", "sp", "spl", "spr",
          "st", "str", "sw", "t", "th", "tr", "tw", "v", "w", "wh", "y", "z", "", "", "")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "oa", "ay", "ie", "oi",
          "ow", "au", "ue", "y")
CODAS = ("", "", "", "b", "ck", "d", "f", "g", "k", "l", "ll", "m", "n", "nd", "ng", "nk", "nt", "p", "r", "rd",
         "rk", "rn", "rt", "s", "sh", "sk", "st", "t", "th", "x", "ve", "ch", "tch", "mp", "lt", "ft", "ct", "ss",
         "ze", "ge", "dge", "se", "te", "ne", "ke", "me", "pe", "de", "rm", "lk", "nch")


def made_up_word(rng: random.Random, onsets: Sequence[str] = ONSETS, vowels: Sequence[str] = VOWELS,
                 codas: Sequence[str] = CODAS, syllables: Sequence[int] = (4, 4, 2), coda_share: float = 0.5) -> str:
    """One to len(syllables) syllables (weighted by `syllables`) of a language's spelling, by default
    English's, e.g. 'shorpam', 'gleest', 'trounvick'. The last syllable always takes a coda (which
    may be empty), the others with probability `coda_share`."""
    n = rng.choices(range(1, len(syllables) + 1), weights=syllables)[0]
    word = ""
    for k in range(n):
        word += rng.choice(onsets) + rng.choice(vowels)
        if k == n - 1 or rng.random() < coda_share:
            word += rng.choice(codas)
    return word


@lru_cache(maxsize=1)
def common_words() -> tuple[str, ...]:
    """Common English words and first and last names (faker's en_US lists), lower case, sorted."""
    words = {w.lower() for w in _Lorem.word_list}
    words |= {n.lower() for n in (*_Person.first_names, *_Person.last_names)}
    return tuple(sorted(w for w in words if w.isalpha()))


def words_of(text: str) -> set[str]:
    """The words of a text as `excluded` expects them: lower case, with and without apostrophes
    ("It's" gives "it's", "its", "it" and "s")."""
    out = {w.lower().strip("'") for w in re.findall(r"[A-Za-z']+", text)}
    return out | {w.lower() for w in re.findall(r"[A-Za-z]+", text)}


def lexicon_sentence(rng: random.Random, excluded: Collection[str] = (), made_up: float = 0.5) -> str:
    """4 to 10 words, each made up with probability `made_up`, else a common word; none in `excluded`."""
    reals = common_words()
    words: list[str] = []
    target = rng.randint(4, 10)
    while len(words) < target:
        word = made_up_word(rng) if rng.random() < made_up else rng.choice(reals)
        if word.lower() not in excluded:
            words.append(word)
    for i in range(1, len(words) - 1):
        if rng.random() < 0.08:
            words[i] += ","
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choices((".", "?", "!"), weights=(8, 2, 1))[0]


def lexicon_sentences(n: int, seed: int = 0, excluded: Iterable[str] = (), made_up: float = 0.5) -> list[str]:
    """`n` sentences, the same for the same arguments."""
    rng = random.Random(f"lexicon:{seed}")
    banned = {w.lower() for w in excluded}
    return [lexicon_sentence(rng, banned, made_up) for _ in range(n)]
