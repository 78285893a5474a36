"""Text front end: G2P (phonemizer + espeak-ng from the espeakng-loader wheel), the phoneme symbol
map with the `.phn.txt` format, and the language map. Importing this package loads no library;
espeak-ng is loaded on the first phonemize call."""
from vall_e.text.languages import LanguageMap, normalize_language, supported_languages
from vall_e.text.phonemes import BOUNDARY, phonemize, phonemize_many, tokenize
from vall_e.text.symmap import (Symmap, corpus_symmap, format_phonemes, inventory_symmap, parse_phonemes,
                               read_phonemes)

__all__ = [
    "BOUNDARY",
    "LanguageMap",
    "Symmap",
    "corpus_symmap",
    "format_phonemes",
    "inventory_symmap",
    "normalize_language",
    "parse_phonemes",
    "phonemize",
    "phonemize_many",
    "read_phonemes",
    "supported_languages",
    "tokenize",
]
