"""Language codes: what the user writes (`en`, `de`, `pt-br`) -> the espeak-ng voice that phonemizes it,
and the language map (name -> id) that the model's language embedding uses.

Short ISO codes go through a fixed table (`en` -> `en-us`, `zh` -> `cmn`, ...); any other code is
accepted when espeak-ng itself knows it (`en-gb`, `en-gb-x-rp`, `es-419`, ...), compared without case
and with `_` read as `-`.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Iterator, Mapping

from vall_e.text.espeak import configure_phonemizer
from vall_e.utils.errors import UserError

# user code -> espeak-ng voice (language) code
ALIASES: dict[str, str] = {
    "en": "en-us",
    "de": "de",
    "fr": "fr-fr",
    "es": "es",
    "it": "it",
    "pt": "pt",
    "ja": "ja",
    "zh": "cmn",
    "zh-cn": "cmn",
    "ko": "ko",
    "ru": "ru",
    "nl": "nl",
    "pl": "pl",
    "sv": "sv",
    "da": "da",
    "no": "nb",
    "nb": "nb",
    "fi": "fi",
    "cs": "cs",
    "sk": "sk",
    "hu": "hu",
    "ro": "ro",
    "el": "el",
    "tr": "tr",
    "uk": "uk",
    "ar": "ar",
    "he": "he",
    "hi": "hi",
    "vi": "vi",
    "id": "id",
    "ca": "ca",
    "yue": "yue",
}


def _key(code: str) -> str:
    return code.strip().lower().replace("_", "-")


@functools.lru_cache(maxsize=1)
def espeak_languages() -> dict[str, str]:
    """espeak-ng's own language codes, lower-cased key -> the code as espeak spells it."""
    configure_phonemizer()
    from phonemizer.backend import EspeakBackend

    try:
        codes = EspeakBackend.supported_languages()
    except RuntimeError as e:  # library present but unusable
        raise UserError(f"espeak-ng does not work: {e}") from None
    return {_key(c): c for c in codes}


def supported_languages() -> list[str]:
    """The short codes of the built-in table (any espeak-ng code is accepted too)."""
    return sorted(k for k in ALIASES if "-" not in k)


def normalize_language(code: str) -> str:
    """Return the espeak-ng code for a user language code, or raise UserError."""
    if not isinstance(code, str) or not code.strip():
        raise UserError(f"language must be a non-empty code like 'en', got {code!r}")
    return _normalize(code)


@functools.lru_cache(maxsize=256)
def _normalize(code: str) -> str:
    key = _key(code)
    if key in ALIASES:
        return ALIASES[key]
    known = espeak_languages()
    if key in known:
        return known[key]
    raise UserError(
        f"unsupported language {code!r} (supported: {', '.join(supported_languages())}, "
        "or any espeak-ng language code such as en-gb)"
    )


class LanguageMap:
    """Language name -> embedding id. Ids are 0..n-1 in insertion order; the default is {"en": 0}."""

    def __init__(self, mapping: Mapping[str, int] | None = None, source: str | None = None):
        mapping = {"en": 0} if mapping is None else mapping
        where = f" in {source}" if source else ""
        if not isinstance(mapping, Mapping):
            raise UserError(f"language map{where} must be an object of name -> id, got {type(mapping).__name__}")
        self._ids: dict[str, int] = {}
        for name, i in mapping.items():
            if not isinstance(name, str) or not name.strip():
                raise UserError(f"language map{where}: bad language name {name!r}")
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise UserError(f"language map{where}: id of {name!r} must be a non-negative integer, got {i!r}")
            if _key(name) in self._ids:
                raise UserError(f"language map{where}: language {name!r} appears twice")
            self._ids[_key(name)] = i
        if sorted(self._ids.values()) != list(range(len(self._ids))):
            raise UserError(f"language map{where}: ids must be 0..{len(self._ids) - 1}, each used once")

    def id(self, lang: str, source: str | None = None) -> int:
        """Id of `lang`; UserError naming `source` (a file or key) when it is unknown."""
        key = _key(lang) if isinstance(lang, str) else None
        if key not in self._ids:
            where = f" in {source}" if source else ""
            raise UserError(f"unknown language {lang!r}{where} (known: {', '.join(self._ids)})")
        return self._ids[key]

    def add(self, lang: str) -> int:
        """Id of `lang`, adding it with the next id if new."""
        key = _key(lang)
        if not key:
            raise UserError("language name must not be empty")
        if key not in self._ids:
            self._ids[key] = len(self._ids)
        return self._ids[key]

    @property
    def names(self) -> list[str]:
        """Names ordered by id."""
        return sorted(self._ids, key=self._ids.__getitem__)

    def to_dict(self) -> dict[str, int]:
        return {n: self._ids[n] for n in self.names}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any], source: str | None = None) -> "LanguageMap":
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except (ValueError, UnicodeDecodeError) as e:
                raise UserError(f"language map{f' in {source}' if source else ''} is not valid JSON: {e}") from None
        return cls(data, source=source)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, lang: object) -> bool:
        return isinstance(lang, str) and _key(lang) in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LanguageMap) and self._ids == other._ids

    def __repr__(self) -> str:
        return f"LanguageMap({self.to_dict()})"
