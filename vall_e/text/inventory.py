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
# language -> the tool versions and arguments its row was measured with
GENERATED_WITH: dict[str, str] = {
    'ca': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'cs': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'da': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'de': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 600000 --faker-items 40000 --seed 0',
    'el': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'en-gb': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 600000 --faker-items 40000 --seed 0',
    'en-us': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 600000 --faker-items 40000 --seed 0',
    'es': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 600000 --faker-items 40000 --seed 0',
    'fi': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'fr-fr': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 600000 --faker-items 40000 --seed 0',
    'hu': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'id': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'it': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'nb': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'nl': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'pl': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'pt': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'ro': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'ru': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'sk': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'sv': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'tr': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'uk': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
    'vi': 'espeak-ng 1.52.0, phonemizer 3.4.0, Faker 40.63.0; --words 200000 --faker-items 16000 --seed 0',
}
# language -> its phone tokens, sorted
PHONES: dict[str, str] = {
    'ca': 'a b d e f h i j k l m n o p r s t u v w z ð ŋ ɐ ɑː ɔ ɔː ə ɛ ɡ ɣ ɪ ɱ ɲ ɹ ɾ ʃ ʌ ʎ ʒ β θ χ',
    'cs': 'a aː b c d e eː f h i iː j k l l̩ m n o oː p r r̝ r̝̊ r̩ s t u uː v w x z ð ŋ ɑː ɔː ɛ ɟ ɡ ɣ ɪ ɲ ɹ ʃ ʊ ʎ ʑ ʒ θ',
    'da': '- a aː b d e eː f h i iː j k l m n o oː p pː r s t u uː v w x y yː z ð ø ŋ œ œː ɐ ɐ̯ ɑ ɑː ɑ̃ ɒ ɔ ɔː ə ɛ ɛː ɛ̃ ɜ ɜː ɟ ɡ ɣ ɪ ɪː ɲ ɹ ɾ ʁ ʃ ʊ ʋ ʌ ʌː ʎ ʒ ʔ ʝ β ε θ',
    'de': '- a aː b c d e eː f h i iː j k l m n n̩ oː p r s t u uː v w x yː z ç ð ø øː ŋ œ œ̃ ɐ ɑ ɑː ɑ̃ ɒ ɔ ɔː ɔ̃ ɕ ə ɛ ɛː ɛ̃ ɜ ɜː ɡ ɨ ɪ ɬ ɲ ɹ ɾ ʃ ʊ ʌ ʏ ʑ ʒ ʲ θ',
    'el': 'a aː b c d e eː f h i iː j k l m n o p r s t u uː v w x z ç ð ŋ ɐ ɑː ɑ̃ ɒ ɔ ɔː ə ɛ ɜː ɡ ɣ ɪ ɬ ɲ ɹ ʂ ʃ ʊ ʌ ʎ ʒ ʲ θ',
    'en-gb': 'a aː b d e f h i iː j k l m n p r s t uː v w x z ð ŋ ɐ ɑː ɑ̃ ɒ ɔ ɔː ə ɛ ɜː ɡ ɪ ɬ ɹ ʃ ʊ ʌ ʒ ʲ θ',
    'en-us': 'a b d e f h i iː j k l m n n̩ o p r s t uː v w x z æ ð ŋ ɐ ɑː ɑ̃ ɔ ɔː ə ɚ ɛ ɜː ɡ ɪ ɬ ɹ ɾ ʃ ʊ ʌ ʒ ʔ ʲ θ ᵻ',
    'es': 'a b d e f h i iː j k l m n o p pː r s t u v w x ð ŋ ɐ ɑː ɔː ə ɛ ɟ ɡ ɣ ɪ ɲ ɹ ɾ ʃ ʊ ʌ ʎ ʒ ʝ β θ',
    'fi': 'a aː b bː d dː e eː f h i iː j k kː l m n o oː p pː q r s t tː u uː v w y yː z æ æː ð ø øː ŋ ŋː ɐ ɑː ɒ ɔː ə ɛ ɡ ɡː ɪ ɪː ɹ ʃ ʊ ʌ ʒ θ',
    'fr-fr': '- a aː b d e f h i iː j k kː l m n o oː p r s t u uː v w x y yː z ð ø øː ŋ œ œ̃ ɐ ɑː ɑ̃ ɒ ɔ ɔː ɔ̃ ə ɛ ɛ̃ ɜː ɡ ɪ ɪː ɬ ɲ ɹ ʁ ʃ ʊ ʌ ʒ θ',
    'hu': '- a aː b bː c cː d dː eː eːː f h i iː j k kː l m n o oː p pː r s sː t tː u uː v w x y yː z zː ç ð ø øː ŋ ɐ ɑ ɑː ɒ ɔ ɔː ɔ̃ ɕ ə ɛ ɛː ɜ ɜː ɟ ɟː ɡ ɡː ɨ ɪ ɲ ɹ ɾ ʃ ʃː ʊ ʌ ʎ ʑ ʒ ʒː ʲ θ',
    'id': 'a b d e f h i iː j k l m n o p r s t u v w x z ç ð ŋ ɐ ɑː ɔ ɔː ə ɛ ɡ ɪ ɲ ɹ ʃ ʊ ʌ ʒ ʔ θ χ',
    'it': 'a aː b bː c d dː d̪ e eː f fː h i iː j k kː l m n o oː p pː r s sː t tː t̪ t̪ː u uː v w x z zː ð ø ŋ ɑː ɒ ɔ ɔː ə əː ɛ ɛː ɜ ɜː ɡ ɡː ɪ ɪː ɲ ɹ ɾ ʃ ʃː ʊ ʊː ʌ ʎ ʒ ʒː θ θː',
    'nb': 'a aː b bː d dː e eː f h iː j k kː l m n oː p pː r s t tː uː v w x y yː z ð ø øː ŋ œ ɐ ɑ ɑː ɒ ɔ ɔː ə ɛ ɛː ɡ ɡː ɪ ɹ ʂ ʃ ʉ ʉː ʊ ʊː ʌ ʒ θ',
    'nl': 'a aː b d e eː f h i iː j k l m n oː p r s t u uː v w x y yː z ð øː ŋ œ ɑ ɑː ɑ̃ ɒ ɔ ɔː ə ɛ ɛː ɛ̃ ɜː ɡ ɣ ɪ ɪː ɲ ɵ ɹ ɾ ʁ ʃ ʊ ʋ ʌ ʒ ʲ θ',
    'pl': 'a b c d f h i j k l m n p r s t u v w x z ç ð ŋ ɑː ɔ ɔː ɔ̃ ɕ ɛ ɛ̃ ɡ ɣ ɨ ɪ ɲ ɹ ʂ ʃ ʑ ʒ ʲ θ',
    'pt': '- a aː b bː c d e eː f h i iː ĩ j k kː l m n o oː õ p pː r s t tː u uː ũ v w x yː z ç ð ŋ œ ɐ ɐ̃ ɑ ɑː ɑ̃ ɒ ɔ ɔː ɔ̃ ɕ ə ɛ ɛː ɛ̃ ɜː ɡ ɨ ɪ ɪː ɬ ɲ ɹ ɾ ʁ ʂ ʃ ʊ ʊ̃ ʌ ʎ ʑ ʒ ʲ θ',
    'ro': 'a b c d e f h i j k l m n o p r s t u uː v w y z ç ð ø ŋ ɐ ɑː ɔ ɔː ə ɛ ɡ ɨ ɪ ɹ ɾ ʃ ʊ ʌ ʒ ʲ θ',
    'ru': '1 ^ a aː b d e eː f h i iː j k l m n o oː p r s t u uː v w x y z ð ø ŋ ɐ ɑ ɑː ɑ̃ ɒ ɔ ɔː ɕ ə ɛ ɛː ɜː ɡ ɣ ɪ ɪː ɬ ɭ ɵ ɹ ʂ ʃ ʊ ʌ ʑ ʒ ʲ θ',
    'sk': 'a aː b d e eː f h i iː j k l l̩ l̩ː m n o oː p r r̝ r̝̊ r̩ r̩ː s t u uː v w x z æ ŋ ɐ ɑː ə ɛ ɡ ɣ ɪ ɲ ɹ ɾ ʃ ʊ ʎ ʑ ʒ ʲ',
    'sv': 'a b d e eː f h i iː j k kː l m n oː p r s t tː uː v w x y yː z ð øː ŋ œ ɐ ɑː ɒ ɔ ɔː ɕ ə ɛ ɛː ɜː ɡ ɪ ɵ ɵː ɹ ʂ ʃ ʉ ʊ ʌ ʒ θ',
    'tr': 'a aː b bː c d dː e f h i iː j k kː l m n o oː p pː r s t tː u uː v w y yː z æ ð ø øː ŋ œ œː ɐ ɑː ɔ ɔː ə ɛ ɛː ɟ ɡ ɡː ɣ ɪ ɪː ɫ ɯ ɹ ɾ ʃ ʃː ʊ ʊː ʌ ʒ ʒː θ',
    'uk': '1 a aː b d d̪ e eː f h i iː j k l m n o oː p r s t t̪ u uː v w x z ð ŋ ɐ ɑː ɑ̃ ɒ ɔ ɔː ə ɛ ɛː ɜː ɡ ɣ ɪ ɪː ɬ ɲ ɹ ʃ ʊ ʌ ʎ ʒ ʲ β θ',
    'vi': '- 1 2 4 5 6 7 a aː b c d e f h i iː j k l m n o p r s t t̪ u uː v w x y z ð ŋ ɐ ɑː ɑ̃ ɒ ɔ ɔː ɗ ə əː ɛ ɜ ɜː ɟ ɡ ɣ ɪ ɬ ɲ ɹ ʃ ʊ ʌ ʍ ʐ ʒ θ',
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
