"""Amphion VALL-E's text front end: espeak phones (through phonemizer) and its phone table.

What Amphion's checkpoints were trained on (open-mmlab/Amphion@d3de90f, text/g2p_module.py,
processors/phone_extractor.py, text/text_token_collation.py):

* curly double quotes become '"'; espeak (en-us) through phonemizer with word separator '_',
  syllable '-', phone '|', punctuation kept, no stress, no tie, language-switch flags kept;
* each word's phones are the runs of word characters and single other characters between the
  phone separators, words joined by '_';
* ids: '<pad>', '<bos>', '<eos>', then the symbols of `symbols.dict` sorted, numbered in that order
  (a later duplicate wins, as a dict built from the list does); a text is '<bos>' phones '<eos>'.

The phones depend on the espeak-ng version; this project's comes from the espeakng-loader wheel.
espeak-ng runs in the same child process as the rest of the text front end (`vall_e.text.espeak_process`,
profile "amphion"), so a text that crashes it gets a one-line error instead of ending a server.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from vall_e.text.espeak_process import EspeakCrashed
from vall_e.text.phonemes import phonemize_in_child
from vall_e.utils.errors import UserError


def parse_symbols(text: str, source: str) -> dict[str, int]:
    """`symbols.dict`: one 'SYMBOL ID' per line."""
    table: dict[str, int] = {}
    for n, line in enumerate(text.strip().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(f"{source}:{n}: expected 'SYMBOL ID', got {line[:40]!r}")
        table[parts[0]] = int(parts[1])
    if not table:
        raise UserError(f"{source}: no symbols")
    return table


def read_symbols(checkpoint: Path) -> dict[str, int]:
    """symbols.dict beside the checkpoint or in a folder above it."""
    for folder in (checkpoint.parent, *list(checkpoint.parents)[1:4]):
        f = folder / "symbols.dict"
        if f.is_file():
            return parse_symbols(f.read_text(encoding="utf-8"), str(f))
    raise UserError(f"{checkpoint}: no symbols.dict beside it or in the folders above (Amphion's phone table)")


def token_index(symbols: dict[str, int]) -> dict[str, int]:
    ordered = ["<pad>", "<bos>", "<eos>"] + sorted(symbols)
    return {token: i for i, token in enumerate(ordered)}


def split_phones(phonemized: str) -> list[str]:
    fields: list[str] = []
    for word in phonemized.split("_"):
        fields += [p for p in re.findall(r"\w+|[^\w\s]", word, re.UNICODE) if p != "|"] + ["_"]
    return fields[:-1]


def phones(text: str) -> list[str]:
    text = text.replace("”", '"').replace("“", '"').strip()
    out = phonemize_in_child("en-us", [text], profile="amphion")[0]
    if isinstance(out, EspeakCrashed):
        raise UserError(f"espeak-ng crashed on the text {text[:60]!r} (exit {out.returncode}); rephrase it")
    return split_phones(out)


class AmphionFrontend:
    """Text -> Amphion phone ids (no languages: `n_langs` is 0 for these models)."""

    name = "amphion"
    uses_reference_text = True

    def __init__(self, spec: dict[str, Any]) -> None:
        self.symbols = dict(spec.get("symbols") or {})
        if not self.symbols:
            raise UserError("text front end: an Amphion model needs its symbols.dict table")
        self.index = token_index(self.symbols)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "symbols": self.symbols}

    def encode(self, text: str, language: str = "en", force_language: str | None = None,
               bos_eos: bool = True) -> list[int]:
        seq = phones(text)
        unknown = sorted({p for p in seq if p not in self.index})
        if unknown:
            raise UserError(f"the text {text[:40]!r} has phones the model's table lacks: {' '.join(unknown[:5])}")
        ids = [self.index[p] for p in seq]
        return [self.index["<bos>"]] + ids + [self.index["<eos>"]] if bos_eos else ids

    def encode_with_reference(self, text: str, language: str, reference_text: str = "") -> list[int]:
        """Amphion phonemizes "{reference text} {text}" as one text."""
        return self.encode(f"{reference_text} {text}".strip(), language)
