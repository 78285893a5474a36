"""Phoneme symbol map (symbol <-> id) and the `{id}.phn.txt` file format.

Ids: `<pad>`=0, `<s>`=1, `</s>`=2, `" "`=3 (the word boundary), then the phoneme symbols. New symbols
are appended in sorted order, so the same data always gives the same map, and every id has exactly
one symbol (the reference gave `?` and `p` the same id).

`{id}.phn.txt`: one line of phoneme tokens separated by single spaces, UTF-8. The word boundary is
written as `|` (a token espeak never produces) and read back as `" "`. The reader also accepts the
reference's files, where a boundary is a run of spaces (three, i.e. two empty tokens); any run of two
or more spaces, a tab or a line break reads as one boundary, and repeated boundaries collapse.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_write_text, read_text

PAD, BOS, EOS, BOUNDARY = "<pad>", "<s>", "</s>", " "
SPECIALS = (PAD, BOS, EOS, BOUNDARY)
PAD_ID, BOS_ID, EOS_ID, BOUNDARY_ID = 0, 1, 2, 3
BOUNDARY_ON_DISK = "|"


class Symmap:
    """Bidirectional phoneme symbol map with fixed special ids and one id per symbol."""

    def __init__(self, symbols: Iterable[str] = ()):
        """Specials first, then `symbols` in the given order (duplicates and specials skipped)."""
        self._symbols: list[str] = list(SPECIALS)
        self._ids: dict[str, int] = {s: i for i, s in enumerate(self._symbols)}
        for s in symbols:
            self._add(s)

    def _add(self, sym: str) -> bool:
        if not isinstance(sym, str) or sym == "":
            raise UserError(f"phoneme symbol must be a non-empty string, got {sym!r}")
        if sym in self._ids:
            return False
        self._ids[sym] = len(self._symbols)
        self._symbols.append(sym)
        return True

    @classmethod
    def build(cls, token_lists: Iterable[Sequence[str]], base: "Symmap | None" = None) -> "Symmap":
        """A map covering every token in `token_lists`: `base`'s ids kept, new symbols appended sorted."""
        out = cls(base.symbols[len(SPECIALS):]) if base is not None else cls()
        out.extend(tok for tokens in token_lists for tok in tokens)
        return out

    def extend(self, tokens: Iterable[str]) -> list[str]:
        """Add unseen tokens (sorted, for determinism); return the symbols added."""
        new = sorted({t for t in tokens if t not in self._ids})
        for s in new:
            self._add(s)
        return new

    def encode(self, tokens: Sequence[str], source: str | None = None, add_bos_eos: bool = True) -> list[int]:
        """Ids of `tokens` (wrapped in <s> ... </s>); UserError naming `source` for an unknown symbol."""
        ids = [BOS_ID] if add_bos_eos else []
        for sym in tokens:
            i = self._ids.get(sym)
            if i is None:
                raise UserError(f"unknown phoneme {sym!r} in {source or 'text'} (not in the symbol map)")
            ids.append(i)
        if add_bos_eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> list[str]:
        """Symbols of `ids`; <pad>, <s> and </s> are dropped unless `keep_special`."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._symbols):
                raise UserError(f"phoneme id {i} is outside the symbol map (0..{len(self._symbols) - 1})")
            if keep_special or i not in (PAD_ID, BOS_ID, EOS_ID):
                out.append(self._symbols[i])
        return out

    @property
    def symbols(self) -> list[str]:
        """All symbols, indexed by id."""
        return list(self._symbols)

    def id(self, sym: str) -> int:
        return self._ids[sym]

    def __getitem__(self, sym: str) -> int:
        return self._ids[sym]

    def __len__(self) -> int:
        return len(self._symbols)

    def __contains__(self, sym: object) -> bool:
        return sym in self._ids

    def __iter__(self) -> Iterator[str]:
        return iter(self._symbols)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Symmap) and self._symbols == other._symbols

    def __repr__(self) -> str:
        return f"Symmap({len(self)} symbols)"

    def to_dict(self) -> dict[str, int]:
        return dict(self._ids)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any], source: str | None = None) -> "Symmap":
        """Parse a {symbol: id} object; UserError (naming `source`) unless ids are 0..n-1, each once,
        with the special symbols at their fixed ids."""
        where = source or "symbol map"
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except ValueError as e:
                raise UserError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: must be a JSON object of symbol -> id, got {type(data).__name__}")
        by_id: dict[int, str] = {}
        for sym, i in data.items():
            if not isinstance(sym, str) or sym == "":
                raise UserError(f"{where}: bad symbol {sym!r}")
            if not isinstance(i, int) or isinstance(i, bool):
                raise UserError(f"{where}: id of {sym!r} must be an integer, got {i!r}")
            if i in by_id:
                raise UserError(f"{where}: symbols {by_id[i]!r} and {sym!r} share id {i}")
            by_id[i] = sym
        if sorted(by_id) != list(range(len(by_id))):
            raise UserError(f"{where}: ids must be 0..{len(by_id) - 1} with no gaps")
        for k, sym in enumerate(SPECIALS):
            if by_id.get(k) != sym:
                raise UserError(f"{where}: id {k} must be {sym!r}, found {by_id.get(k)!r}")
        return cls(by_id[i] for i in range(len(SPECIALS), len(by_id)))

    def save(self, path: str | os.PathLike) -> None:
        """Write the map as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Symmap":
        return cls.from_json(read_text(path, "symbol map file"), source=str(path))


_SPLIT = re.compile(r"(\s+)")


def parse_phonemes(text: str) -> list[str]:
    """Tokens of a `.phn.txt` line (ours or the reference's); see the module docstring."""
    tokens: list[str] = []
    for part in _SPLIT.split(text.strip()):
        if part == "" or part == " ":
            continue
        if part.isspace() or part == BOUNDARY_ON_DISK:
            if tokens and tokens[-1] != BOUNDARY:
                tokens.append(BOUNDARY)
        else:
            tokens.append(part)
    while tokens and tokens[-1] == BOUNDARY:
        tokens.pop()
    return tokens


def format_phonemes(tokens: Sequence[str]) -> str:
    """One `.phn.txt` line (no newline) for `tokens`; ValueError for a token that cannot be written."""
    out = []
    for tok in tokens:
        if tok == BOUNDARY:
            out.append(BOUNDARY_ON_DISK)
        elif tok == "" or tok == BOUNDARY_ON_DISK or any(c.isspace() for c in tok):
            raise ValueError(f"phoneme token {tok!r} cannot be written to a .phn.txt file")
        else:
            out.append(tok)
    return " ".join(out)


def read_phonemes(path: str | os.PathLike) -> list[str]:
    """Tokens of a `.phn.txt` file; UserError naming the file if it is unreadable, not UTF-8 or empty."""
    tokens = parse_phonemes(read_text(path, "phoneme file"))
    if not tokens:
        raise UserError(f"{path}: no phonemes in file")
    return tokens
