"""Amphion VALL-E's text side: its phone symbol table (`symbols.dict`, one `symbol id` per line).

The table is read here so a converted Amphion checkpoint carries it. Amphion's own G2P (espeak
through phonemizer with its separators, then `<bos>` + phones + `<eos>`) is not ported yet:
encoding text for an Amphion model is a one-line error until it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vall_e.utils.errors import UserError


def parse_symbols(text: str, source: str) -> dict[str, int]:
    table: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
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


class AmphionFrontend:
    name = "amphion"
    uses_reference_text = True

    def __init__(self, spec: dict[str, Any]) -> None:
        self.symbols = dict(spec.get("symbols") or {})

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "symbols": self.symbols}

    def encode(self, text: str, language: str = "en", force_language: str | None = None) -> list[int]:
        raise UserError("Amphion VALL-E's text front end (espeak phones with its symbol table) is not ported "
                        "yet; this model can be converted and its weights run, but not from text")

    def language_of(self, text: str, language: str) -> str:
        return "en"
