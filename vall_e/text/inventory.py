"""Each language's phoneme inventory: every token the tokenizer can emit for it in separate stress mode.

A symbol map built from a language's inventory (`vall_e.text.symmap.corpus_symmap`) knows every
phoneme of that language, whatever its training corpus happened to contain, so synthesis never meets
an unknown phoneme. The table below holds the phone tokens (a phone with its length mark and
combining marks, `vall_e.text.phonemes`); `inventory_symbols` adds what every language shares: the
two stress tokens and every punctuation mark the G2P keeps.

The table is computed, never edited by hand: `python scripts/phoneme_inventory.py --write` phonemizes
a large, varied text per language through espeak-ng (the synthetic corpus's sentences, Faker's word
lists and names in several languages, pseudo-words from the language's spellings, random letter
strings, numbers and symbols) and rewrites it; its docstring has the exact commands, and each row
records its tool versions and arguments (`GENERATED_WITH`). Run it again after an espeak-ng or
phonemizer upgrade; `tests/test_inventory.py` fails when espeak-ng emits a token the table lacks.

Stored: en-us (what `en` means), en-gb, de, fr-fr (`fr`), es and the other alphabetic languages of
`vall_e.text.languages.ALIASES` (it, pt, nl, pl, sv, da, nb, fi, cs, sk, hu, ro, tr, vi, id, ca, ru,
uk, el), keyed by espeak-ng code. Any other code (ja, zh, ko, ar, he, hi, a regional variant such as
pt-br) has no row: `phone_inventory` returns None, a corpus in it gets a map of its own tokens and a
warning (`vall_e.text.symmap.corpus_symmap`), and `inventory_symmap` refuses it in a one-line error.
"""
from __future__ import annotations

from typing import Iterable

from vall_e.text.languages import ALIASES, normalize_language
from vall_e.text.phonemes import PUNCTUATION, STRESS_MARKS
from vall_e.utils.errors import UserError

# BEGIN GENERATED TABLE (scripts/phoneme_inventory.py; do not edit by hand)
GENERATED_WITH = 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 600000 --faker-items 40000 --seed 0'
PHONES: dict[str, str] = {
    'de': '- a aː b c d e eː f h i iː j k l m n n̩ oː p r s t u uː v w x yː z ç ð ø øː ŋ œ œ̃ ɐ ɑ ɑː ɑ̃ ɒ ɔ ɔː ɔ̃ ɕ ə ɛ ɛː ɛ̃ ɜ ɜː ɡ ɨ ɪ ɬ ɲ ɹ ɾ ʃ ʊ ʌ ʏ ʑ ʒ ʲ θ',
    'en-gb': 'a aː b d e f h i iː j k l m n p r s t uː v w x z ð ŋ ɐ ɑː ɑ̃ ɒ ɔ ɔː ə ɛ ɜː ɡ ɪ ɬ ɹ ʃ ʊ ʌ ʒ ʲ θ',
    'en-us': 'a b d e f h i iː j k l m n n̩ o p r s t uː v w x z æ ð ŋ ɐ ɑː ɑ̃ ɔ ɔː ə ɚ ɛ ɜː ɡ ɪ ɬ ɹ ɾ ʃ ʊ ʌ ʒ ʔ ʲ θ ᵻ',
    'es': 'a b d e f h i iː j k l m n o p pː r s t u v w x ð ŋ ɐ ɑː ɔː ə ɛ ɟ ɡ ɣ ɪ ɲ ɹ ɾ ʃ ʊ ʌ ʎ ʒ ʝ β θ',
    'fr-fr': '- a aː b d e f h i iː j k kː l m n o oː p r s t u uː v w x y yː z ð ø øː ŋ œ œ̃ ɐ ɑː ɑ̃ ɒ ɔ ɔː ɔ̃ ə ɛ ɛ̃ ɜː ɡ ɪ ɪː ɬ ɲ ɹ ʁ ʃ ʊ ʌ ʒ θ',
}
# END GENERATED TABLE


def _espeak_code(language: str) -> str | None:
    """The table's key for a user code (`en` -> `en-us`), without loading espeak-ng when possible."""
    key = language.strip().lower().replace("_", "-") if isinstance(language, str) else ""
    if key in PHONES:
        return key
    if key in ALIASES:
        return ALIASES[key]
    try:
        return normalize_language(language)
    except UserError:
        return None


def phone_inventory(language: str) -> tuple[str, ...] | None:
    """The phone tokens espeak-ng emits for `language` (any code `normalize_language` accepts), or
    None when no inventory is stored for it."""
    code = _espeak_code(language)
    table = PHONES.get(code) if code is not None else None
    return tuple(table.split()) if table is not None else None


def stored_languages() -> list[str]:
    """The espeak-ng codes that have an inventory."""
    return sorted(PHONES)


def inventory_symbols(languages: Iterable[str], missing: list[str] | None = None) -> list[str]:
    """Sorted: the phone tokens of every language in `languages` that has an inventory, the stress tokens
    and the punctuation marks. Languages without one are appended to `missing` when it is given."""
    out = set(STRESS_MARKS) | set(PUNCTUATION)
    for lang in dict.fromkeys(languages):
        phones = phone_inventory(lang)
        if phones is None:
            if missing is not None:
                missing.append(lang)
        else:
            out.update(phones)
    return sorted(out)
