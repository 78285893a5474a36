"""Text -> IPA phoneme tokens with phonemizer's espeak-ng backend.

Token rules (the reference's, with its word-boundary quirk fixed: docs/reference-differences.md #2):
- espeak's IPA output (stress and punctuation kept) is split into single characters; a combining
  mark (e.g. the nasal tilde in French `ɑ̃`) stays on its base character.
- stress marks `ˈ ˌ` and the length mark `ː` are merged onto the preceding phone token, as the
  reference does (`hˈ`, `iː`); at the start of a word, where nothing precedes, onto the next one.
- a word boundary is exactly one `" "` token (never two empty tokens); runs of spaces collapse and
  the tokens never start or end with a boundary.
- each punctuation mark that espeak keeps (`, . ! ? ; : ( ) « »` ...) is its own token.

Text is cut into chunks at sentence ends before phonemizing, so very long text stays fast; all the
chunks of a batch of texts go to espeak in one call. Backends are cached per language and used
under one lock (espeak-ng is not thread-safe).
"""
from __future__ import annotations

import logging
import re
import threading
import unicodedata
from typing import Any, Literal, Sequence, overload

from vall_e.text.espeak import configure_phonemizer
from vall_e.text.languages import normalize_language
from vall_e.utils.errors import UserError

BOUNDARY = " "
MERGE_MARKS = frozenset("ˈˌː")
PUNCTUATION = frozenset(';:,.!?¡¿—…"«»“”(){}[]')
MAX_CHUNK_CHARS = 500

_lock = threading.RLock()
_backends: dict[str, Any] = {}
_SENTENCE_END = re.compile(r"(?<=[.!?;:…。！？])\s+|\n+")


def _backend(espeak_code: str) -> Any:
    """Cached phonemizer EspeakBackend for an espeak language code (call under `_lock`)."""
    backend = _backends.get(espeak_code)
    if backend is None:
        configure_phonemizer()
        from phonemizer.backend import EspeakBackend

        logger = logging.getLogger("vall_e.phonemizer")
        logger.setLevel(logging.ERROR)
        try:
            backend = EspeakBackend(
                espeak_code,
                preserve_punctuation=True,
                with_stress=True,
                language_switch="remove-flags",
                words_mismatch="ignore",
                logger=logger,
            )
        except RuntimeError as e:
            raise UserError(f"espeak-ng cannot phonemize language {espeak_code!r}: {e}") from None
        _backends[espeak_code] = backend
    return backend


def _clean(text: str) -> str:
    """NFC text without control characters or lone surrogates (espeak gets a plain UTF-8 string)."""
    text = unicodedata.normalize("NFC", text)
    return "".join(
        " " if unicodedata.category(c) in ("Cc", "Zl", "Zp") and c != "\n" else c
        for c in text
        if unicodedata.category(c) != "Cs"
    )


def _chunks(text: str, limit: int = MAX_CHUNK_CHARS) -> list[str]:
    """Cut text at sentence ends (and, for run-on text, at spaces or anywhere) into chunks <= limit."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = " ".join(sentence.split())
        while len(sentence) > limit:
            cut = sentence.rfind(" ", 0, limit + 1)
            cut = cut if cut > 0 else limit
            pieces.append(sentence[:cut])
            sentence = sentence[cut:].lstrip()
        if sentence:
            pieces.append(sentence)
    chunks: list[str] = []
    for p in pieces:  # pack short sentences together: fewer, larger calls
        if chunks and len(chunks[-1]) + 1 + len(p) <= limit:
            chunks[-1] += " " + p
        else:
            chunks.append(p)
    return chunks


def tokenize(phonemized: str) -> list[str]:
    """Split espeak's IPA string into tokens by the rules in the module docstring."""
    tokens: list[str] = []
    prefix = ""  # stress marks seen at a word start, waiting for the next phone

    def is_phone(tok: str) -> bool:
        return tok != BOUNDARY and tok not in PUNCTUATION

    for ch in phonemized:
        if ch.isspace() or ch == "|":  # `|` is the on-disk boundary mark, never a phone
            if tokens and tokens[-1] != BOUNDARY:
                tokens.append(BOUNDARY)
            continue
        if ch in PUNCTUATION:
            if prefix:
                tokens.append(prefix)
                prefix = ""
            tokens.append(ch)
            continue
        if ch in MERGE_MARKS or unicodedata.combining(ch):
            if tokens and is_phone(tokens[-1]) and not prefix:
                tokens[-1] += ch
            else:
                prefix += ch
            continue
        tokens.append(prefix + ch)
        prefix = ""
    if prefix:
        tokens.append(prefix)
    while tokens and tokens[-1] == BOUNDARY:
        tokens.pop()
    return tokens


def _preview(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


@overload
def phonemize_many(
    texts: Sequence[str], language: str = ..., on_error: Literal["raise"] = ...
) -> list[list[str]]: ...
@overload
def phonemize_many(
    texts: Sequence[str], language: str = ..., on_error: Literal["return"] = ...
) -> list[list[str] | UserError]: ...


def phonemize_many(texts: Sequence[str], language: str = "en", on_error: str = "raise") -> list:
    """Phonemize many texts in one batched espeak call.

    `on_error="raise"` raises the first text's UserError; `"return"` puts the UserError in that
    text's place instead, so a caller can report which file it came from and keep the others.
    """
    if on_error not in ("raise", "return"):
        raise ValueError(f"on_error must be 'raise' or 'return', not {on_error!r}")
    if isinstance(texts, str):
        raise UserError("phonemize_many takes a list of texts, not one string")
    code = normalize_language(language)
    results: list[list[str] | UserError | None] = [None] * len(texts)
    spans: list[tuple[int, int, int]] = []  # (text index, first chunk, end chunk)
    flat: list[str] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            results[i] = UserError(f"text must be a string, got {type(text).__name__}")
            continue
        chunks = _chunks(_clean(text))
        if not chunks:
            results[i] = UserError("text is empty")
            continue
        spans.append((i, len(flat), len(flat) + len(chunks)))
        flat.extend(chunks)
    if flat:
        with _lock:
            backend = _backend(code)
            try:
                out = backend.phonemize(flat, strip=True, njobs=1)
                if len(out) != len(flat):
                    # phonemizer joins consecutive punctuation-only lines (["«", "«"] -> ["««"]), which
                    # would misalign every text after them: then phonemize one chunk per call
                    out = [(backend.phonemize([chunk], strip=True, njobs=1) or [""])[0] for chunk in flat]
            except (RuntimeError, ValueError) as e:
                raise UserError(f"espeak-ng failed to phonemize ({code}): {e}") from None
        if len(out) != len(flat):
            raise UserError(f"espeak-ng returned {len(out)} lines for {len(flat)} text chunks ({code})")
        for i, a, b in spans:
            tokens = tokenize(" ".join(out[a:b]))
            if not any(t != BOUNDARY and t not in PUNCTUATION for t in tokens):
                results[i] = UserError(f"text {_preview(texts[i])} has nothing espeak-ng ({code}) can pronounce")
            else:
                results[i] = tokens
    if on_error == "raise":
        for i, r in enumerate(results):
            if isinstance(r, UserError):
                raise UserError(f"{r} (text #{i})" if len(texts) > 1 else str(r))
    return results


def phonemize(text: str, language: str = "en") -> list[str]:
    """Phoneme tokens of one text; UserError for empty or unpronounceable text or an unknown language."""
    if not isinstance(text, str):
        raise UserError(f"text must be a string, got {type(text).__name__}")
    return phonemize_many([text], language)[0]
