"""VALL-E X's text front end: text -> IPA characters -> ids of its 70-entry table, with a language per id.

What VALL-E X's model was trained on (facts of its format, Plachtaa/VALL-E-X@3faaf8c):

* text is marked by language, `[EN]...[EN]`, `[ZH]...[ZH]`, `[JA]...[JA]`; only tagged spans are
  read, each turned into IPA characters followed by a space, trailing spaces cut, and a final '.'
  added unless the span ends in punctuation;
* English: ASCII transliteration (unidecode), lower case, abbreviations and numbers spelled out
  (inflect), CMU-dictionary IPA (eng_to_ipa), dark l marked 'ɫ', r -> 'ɹ', ʤ -> dʒ, ʧ -> tʃ,
  '...' -> '…';
* spaces become '_', and every character maps to its id in the table below (an unknown one to 0,
  [UNK]; whitespace is dropped);
* the model adds a language embedding per id (en 0, zh 1, ja 2): `encode` folds it into the id
  (language * 2048 + table id), which is what `VallexModel` reads.

English needs `eng-to-ipa`, `inflect` and `Unidecode` (in the base install). Chinese needs
`pip install "vall-e[vallex-zh]"` (pypinyin, jieba, cn2an; without them Chinese text is a one-line
error naming the extra). Japanese needs `pip install "vall-e[vallex-ja]"` (pyopenjtalk-plus, which
bundles OpenJTalk's dictionary; see vallex_ja).
Untagged text is tagged with `language`, or with langid's guess among en/zh/ja for "auto".
"""
from __future__ import annotations

import re
from typing import Any

from vall_e.text.amphion import AmphionFrontend
from vall_e.utils.errors import UserError

LANGS = ("en", "zh", "ja")
TAGS = {"en": "[EN]", "zh": "[ZH]", "ja": "[JA]"}
N_TEXT_TOKENS = 2048  # the checkpoint's text table size (ids are folded per language at this stride)

# bpe_69.json's vocabulary (its 0 merges make it a character table): 5 specials, then the characters
SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
CHARACTERS = "!#*,-.=?NQ^_`abdefghijklmnopstuvwxyz~æçðŋɑɔəɛɥɪɫɯɸɹɾʃʊʑʒʰˈˌθ…⁼↑→↓"
TABLE = {s: i for i, s in enumerate(SPECIALS + list(CHARACTERS))}

_SPAN = re.compile(r"\[(EN|ZH|JA)\](.*?)\[\1\]", re.S)


# ------------------------------------------------------------------------------------ English

_ABBREVIATIONS = [(re.compile(r"\b%s\." % a, re.IGNORECASE), b) for a, b in [
    ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"), ("co", "company"), ("jr", "junior"),
    ("maj", "major"), ("gen", "general"), ("drs", "doctors"), ("rev", "reverend"), ("lt", "lieutenant"),
    ("hon", "honorable"), ("sgt", "sergeant"), ("capt", "captain"), ("esq", "esquire"), ("ltd", "limited"),
    ("col", "colonel"), ("ft", "fort")]]
_COMMA_NUMBER = re.compile(r"([0-9][0-9,]+[0-9])")
_DECIMAL = re.compile(r"([0-9]+\.[0-9]+)")
_POUNDS = re.compile(r"£([0-9,]*[0-9]+)")
_DOLLARS = re.compile(r"\$([0-9.,]*[0-9]+)")
_ORDINAL = re.compile(r"[0-9]+(st|nd|rd|th)")
_NUMBER = re.compile(r"[0-9]+")
_DARK_L = re.compile(r"l([^aeiouæɑɔəɛɪʊ ]*(?: |$))")
_IPA2 = [("r", "ɹ"), ("ʤ", "dʒ"), ("ʧ", "tʃ")]

_inflect_engine: Any = None


def _missing(what: str, extra: str, error: ImportError) -> UserError:
    how = f'pip install "vall-e[{extra}]"' if extra else "it is part of vall-e's base install: pip install -e ."
    return UserError(f"{what} needs {error.name or 'a package'}: {how}")


def _inflect() -> Any:
    global _inflect_engine
    if _inflect_engine is None:
        try:
            import inflect
        except ImportError as e:
            raise _missing("English text (VALL-E X front end)", "", e) from None
        _inflect_engine = inflect.engine()
    return _inflect_engine


def _dollars(m: re.Match) -> str:
    parts = m.group(1).split(".")
    if len(parts) > 2:
        return m.group(1) + " dollars"
    dollars = int(parts[0]) if parts[0] else 0
    cents = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    if dollars and cents:
        return f"{dollars} {'dollar' if dollars == 1 else 'dollars'}, {cents} {'cent' if cents == 1 else 'cents'}"
    if dollars:
        return f"{dollars} {'dollar' if dollars == 1 else 'dollars'}"
    if cents:
        return f"{cents} {'cent' if cents == 1 else 'cents'}"
    return "zero dollars"


def _number(m: re.Match) -> str:
    num, words = int(m.group(0)), _inflect().number_to_words
    if 1000 < num < 3000:
        if num == 2000:
            return "two thousand"
        if 2000 < num < 2010:
            return "two thousand " + words(num % 100)
        if num % 100 == 0:
            return words(num // 100) + " hundred"
        return words(num, andword="", zero="oh", group=2).replace(", ", " ")
    return words(num, andword="")


def spell_numbers(text: str) -> str:
    text = _COMMA_NUMBER.sub(lambda m: m.group(1).replace(",", ""), text)
    text = _POUNDS.sub(r"\1 pounds", text)
    text = _DOLLARS.sub(_dollars, text)
    text = _DECIMAL.sub(lambda m: m.group(1).replace(".", " point "), text)
    text = _ORDINAL.sub(lambda m: _inflect().number_to_words(m.group(0)), text)
    return _NUMBER.sub(_number, text)


def english_ipa(text: str) -> str:
    """English text -> the IPA string VALL-E X was trained on."""
    try:
        import eng_to_ipa
        from unidecode import unidecode
    except ImportError as e:
        raise _missing("English text (VALL-E X front end)", "", e) from None
    text = unidecode(text).lower()
    for pattern, replacement in _ABBREVIATIONS:
        text = pattern.sub(replacement, text)
    text = spell_numbers(text)
    ipa = re.sub(r"\s+", " ", eng_to_ipa.convert(text))
    ipa = _DARK_L.sub(lambda m: "ɫ" + m.group(1), ipa)
    for a, b in _IPA2:
        ipa = ipa.replace(a, b)
    return ipa.replace("...", "…")


def span_ipa(lang: str, text: str) -> str:
    if lang == "en":
        return english_ipa(text)
    if lang == "zh":
        try:
            from vall_e.text.vallex_zh import chinese_ipa
        except ImportError as e:
            raise _missing("Chinese text", "vallex-zh", e) from None
        return chinese_ipa(text)
    try:
        from vall_e.text.vallex_ja import japanese_ipa
    except ImportError as e:
        raise _missing("Japanese text", "vallex-ja", e) from None
    return japanese_ipa(text)


# ------------------------------------------------------------------------------------ tagging

_identifier: Any = None


def detect_language(text: str) -> str:
    """langid's guess among en/zh/ja (its own identifier, so langid's global setting is untouched)."""
    global _identifier
    if _identifier is None:
        try:
            from langid.langid import LanguageIdentifier, model
        except ImportError as e:
            raise _missing("language detection (--language auto)", "", e) from None
        _identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        _identifier.set_languages(list(LANGS))
    return _identifier.classify(text)[0]


def _close_tags(text: str) -> str:
    """A tag left open by sentence splitting ("[EN]One." / "Two.[EN]") is closed at the piece's end
    or opened at its start, so each sentence of a tagged text is still read."""
    for marker in TAGS.values():
        if text.count(marker) % 2:
            text = text + marker if text.lstrip().startswith(marker) else marker + text
    return text


def tag(text: str, language: str) -> str:
    """Text with language tags: kept as it is if it has any, else wrapped in `language`'s tag
    ("auto": detected). Outside tags nothing is read, as in the original."""
    text = _close_tags(text)
    if _SPAN.search(text):
        return text
    language = (language or "en").lower()
    if language in ("auto", "mix"):
        language = detect_language(text)
    if language not in TAGS:
        raise UserError(f"language {language!r}: VALL-E X speaks en, zh and ja (or auto)")
    return f"{TAGS[language]}{text}{TAGS[language]}"


# ------------------------------------------------------------------------------------ ids

def phonemes(text: str) -> tuple[str, list[str]]:
    """Tagged text -> (IPA string, its per-character languages), as VALL-E X's cleaners produce it."""
    out, langs = "", []
    for m in _SPAN.finditer(text):
        lang = m.group(1).lower()
        phon = span_ipa(lang, m.group(2)) + " "
        phon = re.sub(r"\s+$", "", phon)
        phon = re.sub(r"([^\.,!\?\-…~])$", r"\1.", phon)
        out += phon
        langs += [lang] * len(phon)
    return out, langs


def token_ids(text: str) -> tuple[list[int], list[str]]:
    """Tagged text -> (table ids, languages), one per character; whitespace dropped."""
    phon, langs = phonemes(text)
    phon = phon.replace(" ", "_")
    ids, id_langs = [], []
    for ch, lang in zip(phon, langs):
        if ch.isspace():
            continue
        ids.append(TABLE.get(ch, 0))
        id_langs.append(lang)
    return ids, id_langs


class VallexFrontend:
    """Text -> folded ids (language * 2048 + table id) for `VallexModel`."""

    name = "vallex"
    uses_reference_text = True

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        spec = spec or {}
        table = spec.get("table")
        if table is not None and table != TABLE:
            raise UserError("text front end: the model's character table differs from VALL-E X's bpe_69 table")

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "table": TABLE}

    def encode(self, text: str, language: str = "auto", force_language: str | None = None) -> list[int]:
        """Folded ids of `text`; `force_language` gives every id that language (a prompt transcript)."""
        ids, langs = token_ids(tag(text, language))
        if not ids:
            raise UserError(f"the text {text[:40]!r} has nothing to say (no tagged span or no letters)")
        if force_language is not None:
            langs = [force_language] * len(ids)
        return [LANGS.index(lang) * N_TEXT_TOKENS + i for i, lang in zip(ids, langs)]

    def encode_with_reference(self, text: str, language: str, reference_text: str = "") -> list[int]:
        """The reference transcript's ids (all in its one language, as VALL-E X's prompts are) then the text's."""
        ids = self.encode(text, language)
        if reference_text.strip():
            ref_lang = self.language_of(reference_text, language)
            ids = self.encode(reference_text, ref_lang, force_language=ref_lang) + ids
        return ids

    def language_of(self, text: str, language: str) -> str:
        """The one language of a prompt transcript (its first tag, the given one, or detected)."""
        m = _SPAN.search(text)
        if m:
            return m.group(1).lower()
        language = (language or "auto").lower()
        return detect_language(text) if language in ("auto", "mix") else language


def build_frontend(spec: dict[str, Any]) -> Any:
    name = spec.get("name")
    if name == "vallex":
        return VallexFrontend(spec)
    if name == "amphion":
        return AmphionFrontend(spec)
    raise UserError(f"text front end {name!r} is not known to this vall-e")
