"""VALL-E X's Japanese path: OpenJTalk's full-context labels -> romaji with accent marks -> IPA.

Needs `pip install "vall-e[vallex-ja]"`: pyopenjtalk-plus, which imports as `pyopenjtalk` and ships
its dictionary inside the wheel (the original `pyopenjtalk` downloads one on first use). Importing
this module raises ImportError without it; the front end turns that into a one-line error naming
the extra.

What VALL-E X's model was trained on (facts of its format, Plachtaa/VALL-E-X@3faaf8c,
utils/g2p/japanese.py `japanese_to_ipa2`):

* '％' is read 'パーセント'; the text is cut at every character outside the class _JAPANESE below
  (punctuation, spaces, but also '〇' and full-width symbols);
  each run of Japanese characters is read by OpenJTalk, the cut characters are kept as their ASCII
  transliteration (unidecode, spaces removed), and runs are separated by a space;
* per phoneme (pauses and silences skipped; ch -> ʧ, sh -> ʃ, cl -> Q) the accent fields of its
  label mark an accent-phrase boundary (' '), a fall ('↓') or a rise ('↑') after it;
* then '...' -> '…', geminates (Q) and the moraic nasal (N) take the place of articulation of the
  next consonant, and the romaji become IPA (table ROMAJI_TO_IPA, in order).

OpenJTalk options (OPENJTALK_OPTIONS): the checkpoint was trained on the original pyopenjtalk, so
pyopenjtalk-plus runs with its own post-processing off (`use_vanilla`: no accent rewrites of
"ます" forms, no loanword spellings restored, so ヴァ stays "ba" as in the original; no Sudachi
reading corrections, no ONNX "何" model, whose use would otherwise depend on whether onnxruntime
is installed). Its dictionary still differs from open_jtalk_dic 1.11 for some words (README,
"Pretrained models"). The original pyopenjtalk, if that is what is installed, takes no options
and is used as it is.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import re

from unidecode import unidecode

with contextlib.redirect_stdout(io.StringIO()):  # its "ONNX Runtime is not installed" notice
    import pyopenjtalk

_WANTED = {"use_vanilla": True, "use_sudachi_kanji_yomi": False, "predict_nani": False, "run_marine": False}
_ACCEPTED = inspect.signature(pyopenjtalk.extract_fullcontext).parameters
OPENJTALK_OPTIONS = {k: v for k, v in _WANTED.items() if k in _ACCEPTED}

# characters OpenJTalk reads (the original's class): ASCII letters, digits (\d: any Unicode digit,
# full-width ones too), 々, kana, CJK ideographs, full-width letters and half-width katakana
_JAPANESE = "A-Za-z\\d\u3005\u3040-\u30ff\u4e00-\u9fff\uff11-\uff19\uff21-\uff3a\uff41-\uff5a\uff66-\uff9d"
_RUNS = re.compile(f"([{_JAPANESE}]+)")

# one label: its phoneme (between '-' and '+') and its /A: fields (accent nucleus distance, mora
# position forward, mora position backward)
_LABEL = re.compile(r"-([^+]*)\+.*?/A:(-?\d+|xx)\+(\d+|xx)\+(\d+|xx)/")
_SILENT = ("sil", "pau")

_GEMINATE = [(re.compile(a), b) for a, b in [
    (r"Q([↑↓]*[kg])", r"k#\1"), (r"Q([↑↓]*[tdjʧ])", r"t#\1"), (r"Q([↑↓]*[sʃ])", r"s\1"),
    (r"Q([↑↓]*[pb])", r"p#\1")]]
_NASAL = [(re.compile(a), b) for a, b in [
    (r"N([↑↓]*[pbm])", r"m\1"), (r"N([↑↓]*[ʧʥj])", r"n^\1"), (r"N([↑↓]*[tdn])", r"n\1"),
    (r"N([↑↓]*[kg])", r"ŋ\1")]]
ROMAJI_TO_IPA = [(re.compile(a), b) for a, b in [
    ("u", "ɯ"), ("ʧ", "tʃ"), ("j", "dʑ"), ("y", "j"), ("ni", "n^i"), ("nj", "n^"), ("hi", "çi"),
    ("hj", "ç"), ("f", "ɸ"), ("I", "i*"), ("U", "ɯ*"), ("r", "ɾ")]]


def _fields(label: str) -> tuple[str, int, int, int]:
    m = _LABEL.search(label)
    if m is None:
        raise ValueError(f"OpenJTalk label without phoneme or accent fields: {label[:60]!r}")
    phoneme, *accent = m.groups()
    if phoneme in _SILENT:
        return phoneme, 0, -1, 0
    a1, a2, a3 = (int(v) for v in accent)
    return phoneme, a1, a2, a3


def run_romaji(run: str) -> str:
    """One run of Japanese characters -> romaji phonemes with ' ' / '↓' / '↑' accent marks."""
    with contextlib.redirect_stdout(io.StringIO()):
        labels = [_fields(label) for label in pyopenjtalk.extract_fullcontext(run, **OPENJTALK_OPTIONS)]
    out = ""
    for (phoneme, a1, a2, a3), following in zip(labels, labels[1:]):
        if phoneme in _SILENT:
            continue
        out += phoneme.replace("ch", "ʧ").replace("sh", "ʃ").replace("cl", "Q")
        a2_next = following[2]  # -1 before a pause or the final silence
        if a3 == 1 and a2_next == 1:
            out += " "
        elif a1 == 0 and a2_next == a2 + 1:
            out += "↓"
        elif a2 == 1 and a2_next == 2:
            out += "↑"
    return out


def romaji_with_accents(text: str) -> str:
    text = text.replace("％", "パーセント")
    out = ""
    for i, piece in enumerate(_RUNS.split(text)):
        if i % 2:  # a run of Japanese characters
            out += (" " if out else "") + run_romaji(piece)
        else:  # the characters between runs, one by one as the original keeps them
            out += "".join(unidecode(ch).replace(" ", "") for ch in piece)
    return out


def japanese_ipa(text: str) -> str:
    """Japanese text -> the IPA string VALL-E X was trained on."""
    ipa = romaji_with_accents(text).replace("...", "…")
    for rules in (_GEMINATE, _NASAL, ROMAJI_TO_IPA):
        for pattern, replacement in rules:
            ipa = pattern.sub(replacement, ipa)
    return ipa
