"""Phoneme symbol map (symbol <-> id) and the `{id}.phn.txt` file format.

Ids: `<pad>`=0, `<s>`=1, `</s>`=2, `" "`=3 (the word boundary), then the phoneme symbols. New symbols
are appended in sorted order, so the same data always gives the same map, and every id has exactly
one symbol (the reference gave `?` and `p` the same id).

A map also records the stress mode its tokens were cut in (`Symmap.stress`, see
`vall_e.text.phonemes`): its JSON form carries an `"@stress": "separate"` entry beside the
`{symbol: id}` entries; a map without one (every map made before the modes existed, and the
reference's) is `"merged"` and is written without the entry, exactly as before. The map is what
travels with a dataset (`symmap.json`, `data.h5`), a checkpoint and a model file, so the mode does too.

A corpus's map (`corpus_symmap`): the specials, then, in separate mode, the full phoneme inventory of
the corpus's languages (`vall_e.text.inventory`: every token espeak-ng emits for the language, the
stress marks and every punctuation mark the G2P keeps), then any corpus token outside it. So a model
knows every phoneme of its language, whatever its corpus happened to contain. Merged-mode corpora
keep the corpus-only map of the reference.

`{id}.phn.txt`: one line of phoneme tokens separated by single spaces, UTF-8. The word boundary is
written as `|` (a token espeak never produces) and read back as `" "`. The reader also accepts the
reference's files, where a boundary is a run of spaces (three, i.e. two empty tokens); any run of two
or more spaces, a tab or a line break reads as one boundary, and repeated boundaries collapse.
A file's stress mode shows in its tokens (`phonemes.stress_of`: `l ˈ o` is separate, `lˈ o` merged);
a corpus whose files disagree with each other or with its map is a one-line UserError naming a file.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

from vall_e.text.inventory import inventory_symbols, stored_languages
from vall_e.text.phonemes import DEFAULT_STRESS, LEGACY_STRESS, SEPARATE, STRESS_MODES, check_stress, stress_of
from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_write_text, read_text

PAD, BOS, EOS, BOUNDARY = "<pad>", "<s>", "</s>", " "
SPECIALS = (PAD, BOS, EOS, BOUNDARY)
PAD_ID, BOS_ID, EOS_ID, BOUNDARY_ID = 0, 1, 2, 3
BOUNDARY_ON_DISK = "|"
STRESS_KEY = "@stress"  # the JSON entry that records the stress mode (absent: LEGACY_STRESS)

logger = logging.getLogger(__name__)


class Symmap:
    """Bidirectional phoneme symbol map with fixed special ids and one id per symbol, and the stress
    mode (`"separate"` or `"merged"`) that text must be tokenized in for it."""

    def __init__(self, symbols: Iterable[str] = (), stress: str = LEGACY_STRESS):
        """Specials first, then `symbols` in the given order (duplicates and specials skipped)."""
        self.stress = check_stress(stress)
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
    def build(cls, token_lists: Iterable[Sequence[str]], base: "Symmap | None" = None,
              stress: str | None = None) -> "Symmap":
        """A map covering every token in `token_lists`: `base`'s ids kept, new symbols appended sorted.

        Its stress mode is `base`'s, else `stress`, else the one the tokens show, else the default.
        (Corpus-only, as the reference builds it; `corpus_symmap` adds the language's inventory.)"""
        lists = [list(tokens) for tokens in token_lists]
        if base is not None:
            mode = base.stress
        else:
            mode = stress or stress_of(tok for tokens in lists for tok in tokens) or DEFAULT_STRESS
        out = cls(base.symbols[len(SPECIALS):] if base is not None else (), stress=mode)
        out.extend(tok for tokens in lists for tok in tokens)
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
        return isinstance(other, Symmap) and self._symbols == other._symbols and self.stress == other.stress

    def __repr__(self) -> str:
        return f"Symmap({len(self)} symbols, stress={self.stress!r})"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: `{symbol: id}`, led by `"@stress"` unless the mode is the legacy one."""
        head: dict[str, Any] = {} if self.stress == LEGACY_STRESS else {STRESS_KEY: self.stress}
        return {**head, **self._ids}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str | bytes | Mapping[str, Any], source: str | None = None) -> "Symmap":
        """Parse a {symbol: id} object (with an optional "@stress" mode entry); UserError (naming
        `source`) unless ids are 0..n-1, each once, with the special symbols at their fixed ids."""
        where = source or "symbol map"
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except ValueError as e:
                raise UserError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: must be a JSON object of symbol -> id, got {type(data).__name__}")
        by_id: dict[int, str] = {}
        stress = data.get(STRESS_KEY, LEGACY_STRESS)
        if stress not in STRESS_MODES:
            raise UserError(f"{where}: unknown stress mode {stress!r} (expected {' or '.join(STRESS_MODES)})")
        for sym, i in data.items():
            if sym == STRESS_KEY:
                continue
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
        return cls((by_id[i] for i in range(len(SPECIALS), len(by_id))), stress=stress)

    def save(self, path: str | os.PathLike) -> None:
        """Write the map as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Symmap":
        return cls.from_json(read_text(path, "symbol map file"), source=str(path))


def _mode_words(stress: str) -> str:
    return f"stress={stress!r} ({'stress marks as their own tokens' if stress == SEPARATE else 'stress marks merged onto phones'})"


def check_stress_of(tokens: Sequence[str], stress: str, source: str, against: str) -> None:
    """UserError naming `source` when `tokens` were cut in another stress mode than `stress`, the mode of
    `against` (what the tokens must agree with, e.g. "the symbol map data/symmap.json")."""
    mode = stress_of(tokens)
    if mode is not None and mode != stress:
        raise UserError(f"{source}: phonemes written with {_mode_words(mode)}, but {against} is {_mode_words(stress)}; "
                        f"phonemize again with `python -m vall_e.emb.g2p DIR --stress {stress}`, or start a new "
                        "symbol map")


def corpus_symmap(items: Iterable[tuple[str, Sequence[str]]], languages: Iterable[str] = (),
                  base: Symmap | None = None, base_source: str | None = None) -> Symmap:
    """The symbol map of a corpus. `items`: (source, tokens) per utterance; `languages`: its languages.

    `base`'s ids are kept (a dataset's `symmap.json`). In separate stress mode the languages' full
    inventories follow (so no phoneme of the language is ever unknown, `vall_e.text.inventory`; a
    language without a stored inventory gets a warning), then every corpus token outside them, sorted.
    The corpus's stress mode is `base`'s, else the one its files show, else the default; a file in
    another mode is a UserError naming it and what it disagrees with."""
    items = list(items)
    mode, first = (base.stress, base_source or "the symbol map") if base is not None else (None, None)
    for source, tokens in items:
        if mode is None:
            mode, first = stress_of(tokens), source
        else:
            check_stress_of(tokens, mode, source, f"{'the symbol map ' if base is not None else ''}{first}")
    out = Symmap(base.symbols[len(SPECIALS):] if base is not None else (), stress=mode or DEFAULT_STRESS)
    if out.stress == SEPARATE:
        missing: list[str] = []
        out.extend(inventory_symbols(languages, missing=missing))
        for lang in missing:
            logger.warning("no stored phoneme inventory for language %r: the symbol map holds only the phonemes "
                           "its corpus uses, so synthesis may meet phonemes the model never saw", lang)
    out.extend(tok for _, tokens in items for tok in tokens)
    return out


def inventory_symmap(languages: Iterable[str] = ("en",), extra: Iterable[str] = ()) -> Symmap:
    """A separate-stress map that knows every phoneme of `languages` before any corpus exists: the
    specials, the languages' inventories with the stress tokens and punctuation (`inventory_symbols`),
    then `extra` tokens outside them, sorted. A language without a stored inventory is a one-line
    UserError (use `corpus_symmap` to accept such a language with its corpus's tokens only).

        inventory_symmap(["en"])  # English: every token phonemize(text, "en") can emit
    """
    languages = list(languages)
    missing: list[str] = []
    symbols = inventory_symbols(languages, missing=missing)
    if missing or not languages:
        raise UserError(f"no stored phoneme inventory for {', '.join(map(repr, missing)) or 'an empty language list'} "
                        f"(stored: {', '.join(stored_languages())}; add one with scripts/phoneme_inventory.py)")
    out = Symmap(symbols, stress=SEPARATE)
    out.extend(extra)
    return out


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
