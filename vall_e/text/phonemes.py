"""Text -> IPA phoneme tokens with phonemizer's espeak-ng backend.

Token rules (the reference's, with its word-boundary quirk fixed: docs/reference-differences.md #2):
- espeak's IPA output (stress and punctuation kept) is split into single characters; a combining
  mark (e.g. the nasal tilde in French `ɑ̃`) stays on its base character, and the length mark `ː`
  stays on the phone before it (`iː`: length is phonemic in English and German).
- the stress marks `ˈ ˌ` depend on the stress mode (`stress=`):
  - `"separate"` (the default for new data and models): each stress mark is its own token, where
    espeak puts it, i.e. before the stressed syllable's vowel (`həlˈoʊ` -> `h ə l ˈ o ʊ`). A phone is
    then one token whatever its stress, so a language's tokens are a small closed set
    (`vall_e.text.inventory`).
  - `"merged"` (the reference's rule, and every model and dataset made before the modes existed):
    stress marks are merged onto the preceding phone (`lˈ`, `hˌ`), so `h`, `hˈ` and `hˌ` are three
    unrelated tokens.
  In both, a mark at the start of a word, where no phone precedes it, goes onto the next phone
  (merged mode) or waits for it (`ː`, combining marks).
- a word boundary is exactly one `" "` token (never two empty tokens); runs of spaces collapse and
  the tokens never start or end with a boundary.
- each punctuation mark that espeak keeps (`, . ! ? ; : ( ) « »` ...) is its own token.

Which mode a token list was made in shows in its tokens (`stress_of`): a stress mark joined to a
phone means merged, a lone stress mark means separate, neither fits both. The mode travels with
the symbol map (`Symmap.stress`), so data, checkpoints and model files say how their text was cut.

Text is cut into chunks at sentence ends before phonemizing, so very long text stays fast; all the
chunks of a batch of texts go to espeak in one call. espeak-ng runs in one child process
(`vall_e.text.espeak_process`), used under one lock (espeak-ng is not thread-safe): a text that crashes
the library gets a UserError naming it instead of ending the program.
"""
from __future__ import annotations

import atexit
import os
import re
import threading
import unicodedata
from typing import Iterable, Literal, Sequence, overload

from vall_e.text.espeak_process import EspeakCrashed, PhonemizerProcess
from vall_e.text.languages import normalize_language
from vall_e.utils.errors import UserError

BOUNDARY = " "
STRESS_MARKS = frozenset("ˈˌ")
LENGTH_MARK = "ː"
MERGE_MARKS = STRESS_MARKS | {LENGTH_MARK}
PUNCTUATION = frozenset(';:,.!?¡¿—…"«»“”(){}[]')  # phonemizer's default marks: the ones espeak keeps

SEPARATE, MERGED = "separate", "merged"
STRESS_MODES = (SEPARATE, MERGED)
DEFAULT_STRESS = SEPARATE  # new data and models
LEGACY_STRESS = MERGED  # what a symbol map, dataset or model file that records no mode was made with
MAX_CHUNK_CHARS = 500

_lock = threading.RLock()
_process: PhonemizerProcess | None = None  # espeak-ng runs in a child process: see `espeak_process`
_process_pid = 0  # the process `_process` belongs to
_SENTENCE_END = re.compile(r"(?<=[.!?;:…。！？])\s+|\n+")


def _worker() -> PhonemizerProcess:
    """The process-wide phonemizer child (call under `_lock`); a forked process (a data loader worker)
    starts its own instead of sharing its parent's pipes."""
    global _process, _process_pid
    if _process is None or _process_pid != os.getpid():
        _process, _process_pid = PhonemizerProcess(), os.getpid()
        atexit.register(_process.close)
    return _process


def phonemize_in_child(code: str, chunks: list[str], profile: str = "vall_e") -> list[str | EspeakCrashed]:
    """IPA per chunk from the child process under a profile's options (`espeak_process.PROFILES`); a
    chunk espeak-ng crashed on gets its EspeakCrashed (the batch is retried one chunk at a time to
    find it)."""
    with _lock:
        try:
            return list(_worker().phonemize(code, chunks, profile))
        except EspeakCrashed as e:
            if len(chunks) == 1:
                return [e]
        out: list[str | EspeakCrashed] = []
        for chunk in chunks:
            try:
                out.extend(_worker().phonemize(code, [chunk], profile))
            except EspeakCrashed as e:
                out.append(e)
        return out


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


def check_stress(stress: str) -> str:
    """`stress` if it names a stress mode, else a UserError listing the modes."""
    if stress not in STRESS_MODES:
        raise UserError(f"unknown stress mode {stress!r}: choose {' or '.join(STRESS_MODES)}")
    return stress


def stress_of(tokens: Iterable[str]) -> str | None:
    """The stress mode a token list was made in: MERGED when a stress mark is joined to a phone,
    SEPARATE when a stress mark stands alone, None when it has no stress mark (fits either)."""
    lone = False
    for tok in tokens:
        if len(tok) > 1 and any(c in STRESS_MARKS for c in tok):
            return MERGED
        lone = lone or tok in STRESS_MARKS
    return SEPARATE if lone else None


def tokenize(phonemized: str, stress: str = DEFAULT_STRESS) -> list[str]:
    """Split espeak's IPA string into tokens by the rules in the module docstring."""
    separate = check_stress(stress) == SEPARATE
    tokens: list[str] = []
    prefix = ""  # marks seen where no phone precedes them, waiting for the next phone

    def is_phone(tok: str) -> bool:
        return tok != BOUNDARY and tok not in PUNCTUATION and not (separate and tok in STRESS_MARKS)

    for ch in phonemized:
        if ch.isspace() or ch == "|":  # `|` is the on-disk boundary mark, never a phone
            if tokens and tokens[-1] != BOUNDARY:
                tokens.append(BOUNDARY)
            continue
        if ch in PUNCTUATION or (separate and ch in STRESS_MARKS):
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
    texts: Sequence[str], language: str = ..., on_error: Literal["raise"] = ..., stress: str = ...
) -> list[list[str]]: ...
@overload
def phonemize_many(
    texts: Sequence[str], language: str = ..., on_error: Literal["return"] = ..., stress: str = ...
) -> list[list[str] | UserError]: ...


def phonemize_many(texts: Sequence[str], language: str = "en", on_error: str = "raise",
                   stress: str = DEFAULT_STRESS) -> list:
    """Phonemize many texts in one batched espeak call, cut into tokens in stress mode `stress`.

    `on_error="raise"` raises the first text's UserError; `"return"` puts the UserError in that
    text's place instead, so a caller can report which file it came from and keep the others.
    """
    if on_error not in ("raise", "return"):
        raise ValueError(f"on_error must be 'raise' or 'return', not {on_error!r}")
    check_stress(stress)
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
        out = phonemize_in_child(code, flat)
        if len(out) != len(flat):
            raise UserError(f"espeak-ng returned {len(out)} lines for {len(flat)} text chunks ({code})")
        for i, a, b in spans:
            crash = next((o for o in out[a:b] if isinstance(o, EspeakCrashed)), None)
            if crash is not None:
                results[i] = UserError(f"espeak-ng ({code}) crashed on text {_preview(texts[i])} (exit "
                                       f"{crash.returncode}); change or remove the characters it cannot take")
                continue
            tokens = tokenize(" ".join(out[a:b]), stress)
            if not any(t != BOUNDARY and t not in PUNCTUATION and t not in STRESS_MARKS for t in tokens):
                results[i] = UserError(f"text {_preview(texts[i])} has nothing espeak-ng ({code}) can pronounce")
            else:
                results[i] = tokens
    if on_error == "raise":
        for i, r in enumerate(results):
            if isinstance(r, UserError):
                raise UserError(f"{r} (text #{i})" if len(texts) > 1 else str(r))
    return results


def phonemize(text: str, language: str = "en", stress: str = DEFAULT_STRESS) -> list[str]:
    """Phoneme tokens of one text; UserError for empty or unpronounceable text or an unknown language."""
    if not isinstance(text, str):
        raise UserError(f"text must be a string, got {type(text).__name__}")
    return phonemize_many([text], language, stress=stress)[0]
