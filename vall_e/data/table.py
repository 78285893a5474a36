"""`UtteranceTable`: a split's utterances as numpy columns, speaker folders as contiguous row ranges.

The dataset works on this table whatever the source (folders, HDF5 version 1 or the version-2 index),
so the three give identical samples, and a 10M-utterance index costs a few arrays instead of 10M
Python objects: filters, the held-out share, per-speaker ranges and sampler costs are vectorised.
`Utterance` objects are made only on demand (`utterance(i)`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vall_e.data import index as idx
from vall_e.data.listing import Utterance, language_of, resolve_dir, speaker_key, speaker_parts
from vall_e.utils.errors import UserError


@dataclass(frozen=True)
class Folder:
    """One speaker folder of a table: names from its path; `source` = its `SplitFile` (-1: none)."""

    dir: str
    group: str
    name: str      # the folder's own name
    speaker: str   # speaker key (dataset.speaker_name_format)
    language: str
    source: int = -1


class UtteranceTable:
    """Rows in key order; folder f owns rows [starts[f], starts[f+1])."""

    def __init__(self, split: str, folders: list[Folder], starts: np.ndarray, frames: np.ndarray,
                 phones: np.ndarray, levels: np.ndarray | None, rows: np.ndarray, files: Sequence[Any] = (),
                 utts: list[Utterance] | None = None, frame_rate: float = 75.0) -> None:
        self.split, self.folders, self.files, self.utts = split, folders, list(files), utts
        self.starts = np.asarray(starts, dtype=np.int64)
        self.frames = np.asarray(frames, dtype=np.int32)
        self.phones = np.asarray(phones, dtype=np.int32)
        self.levels = None if levels is None else np.asarray(levels, dtype=np.int32)  # per row, listings only
        self.rows = np.asarray(rows)  # row in its SplitFile (-1 without one)
        self.frame_rate = frame_rate
        self.folder_of = np.repeat(np.arange(len(folders), dtype=np.int32), np.diff(self.starts))
        names = sorted({f.speaker for f in folders})
        self.speaker_names = names
        sid = {s: i for i, s in enumerate(names)}
        self.folder_speaker = np.array([sid[f.speaker] for f in folders], dtype=np.int32)
        self._speaker_folders: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.frames)

    def min_levels(self) -> int | None:
        """The fewest code levels of any utterance (an index stores one count per file)."""
        if not len(self):
            return None
        if self.levels is not None:
            return int(self.levels.min())
        return min(self.files[f.source].levels for f in self.folders)

    @property
    def speaker_of(self) -> np.ndarray:
        return self.folder_speaker[self.folder_of]

    # ----- building -----
    @classmethod
    def from_utterances(cls, split: str, utts: list[Utterance], frame_rate: float) -> "UtteranceTable":
        """A table over a (small) listing in key order; a folder's utterances must be adjacent."""
        folders: list[Folder] = []
        starts = [0]
        seen: set[str] = set()
        for i, u in enumerate(utts):
            if folders and folders[-1].dir == u.dir:
                continue
            if u.dir in seen:
                raise UserError(f"{u.dir}: two speaker folders share the name {u.group}/{Path_name(u.dir)}; "
                                "give them distinct group/speaker folder names")
            seen.add(u.dir)
            if folders:
                starts.append(i)
            folders.append(Folder(u.dir, u.group, Path_name(u.dir), u.speaker, u.language))
        starts.append(len(utts))
        if not utts:
            starts = [0]
        return cls(split, folders, np.array(starts), np.array([u.frames for u in utts], dtype=np.int64),
                   np.array([u.phones for u in utts], dtype=np.int64), np.array([u.levels for u in utts]),
                   np.full(len(utts), -1), utts=list(utts), frame_rate=frame_rate)

    @classmethod
    def from_index(cls, split: str, files: list[Any], dirs: Sequence[Any], cfg: Any, *, validate: bool,
                   min_utterances: int, frame_rate: float, where: str) -> "UtteranceTable":
        """The configured folders of a version-2 index, filtered like `list_split` (vectorised)."""
        d = cfg.dataset
        by_name: dict[str, tuple[int, int]] = {}
        for k, sf in enumerate(files):
            for j, name in enumerate(sf.folder_names):
                by_name[name] = (k, j)
        chosen: dict[str, tuple[Any, tuple[int, int]]] = {}
        for entry in dirs:
            p = resolve_dir(entry, cfg.cfg_path)
            group, folder = speaker_parts(p)
            name = f"{group}/{folder}"
            if name not in by_name:
                raise UserError(f"{where}: has no {split} folder {p} ({split}/{name}); rebuild it with "
                                "`python -m vall_e.data yaml=CONFIG --action hdf5`")
            chosen.setdefault(name, (p, by_name[name]))
        folders: list[Folder] = []
        parts_rows, counts = [], []
        dr = d.duration_range if validate else None
        pr = d.phones_range if validate else None
        cols: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for name in sorted(chosen, key=idx.folder_order_key):
            p, (k, j) = chosen[name]
            sf = files[k]
            if k not in cols:  # whole columns read once (not mapped: they are copied into the table anyway)
                cols[k] = (sf.read("frames"), sf.read("phones"))
            a, b = int(sf.folder_start[j]), int(sf.folder_start[j + 1])
            rows = np.arange(a, b, dtype=np.int64)
            if dr is not None or pr is not None:
                fr, ph = cols[k][0][a:b], cols[k][1][a:b]
                keep = np.ones(b - a, dtype=bool)
                if dr is not None:
                    dur = fr / frame_rate
                    keep &= (dur >= dr[0]) & (dur <= dr[1])
                if pr is not None:
                    keep &= (ph >= pr[0]) & (ph <= pr[1])
                rows = rows[keep]
            if len(rows) < max(min_utterances, 1):
                continue
            group, folder = speaker_parts(p)
            folders.append(Folder(str(p), group, folder, speaker_key(p, d.speaker_name_format),
                                  language_of(group, d.speaker_languages, d.language), source=k))
            parts_rows.append(rows)
            counts.append(len(rows))
        starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
        n = int(starts[-1])
        frames = np.empty(n, dtype=np.int32)
        phones = np.empty(n, dtype=np.int32)
        big = max((len(sf) for sf in files), default=0) >= 2**31
        rows_all = np.empty(n, dtype=np.int64 if big else np.int32)
        at = 0
        for f, rows in zip(folders, parts_rows):
            fr, ph = cols[f.source]
            frames[at:at + len(rows)] = fr[rows]
            phones[at:at + len(rows)] = ph[rows]
            rows_all[at:at + len(rows)] = rows
            at += len(rows)
        del cols, parts_rows
        return cls(split, folders, starts, frames, phones, None, rows_all, files=files, frame_rate=frame_rate)

    def subset(self, keep: np.ndarray) -> "UtteranceTable":
        """The rows where the boolean mask `keep` is set (empty folders dropped), order kept."""
        keep = np.asarray(keep, dtype=bool)
        counts = np.add.reduceat(keep.astype(np.int64), self.starts[:-1]) if len(self) else np.zeros(0, np.int64)
        counts = np.where(np.diff(self.starts) > 0, counts, 0)
        live = np.nonzero(counts)[0]
        starts = np.concatenate([[0], np.cumsum(counts[live])])
        utts = [u for u, k in zip(self.utts, keep.tolist()) if k] if self.utts is not None else None
        return UtteranceTable(self.split, [self.folders[i] for i in live], starts, self.frames[keep],
                              self.phones[keep], None if self.levels is None else self.levels[keep], self.rows[keep],
                              self.files, utts,
                              self.frame_rate)

    # ----- rows -----
    def uid(self, i: int) -> str:
        if self.utts is not None:
            return self.utts[i].id
        return self.files[self.folders[int(self.folder_of[i])].source].uid(int(self.rows[i]))

    def key(self, i: int) -> str:
        f = self.folders[int(self.folder_of[i])]
        return f"{self.split}/{f.group}/{f.name}/{self.uid(i)}"

    def utterance(self, i: int) -> Utterance:
        if self.utts is not None:
            return self.utts[i]
        f = self.folders[int(self.folder_of[i])]
        uid = self.uid(i)
        frames = int(self.frames[i])
        return Utterance(id=uid, dir=f.dir, key=f"{self.split}/{f.group}/{f.name}/{uid}", speaker=f.speaker,
                         group=f.group, language=f.language, frames=frames, phones=int(self.phones[i]),
                         duration=frames / self.frame_rate, levels=self.files[f.source].levels, row=i)

    def hashes(self) -> np.ndarray:
        """uint64 key hashes (the held-out ranking): stored in an index, else computed from the keys."""
        if self.utts is not None:
            return np.array([int.from_bytes(hashlib.blake2b(u.key.encode("utf-8"), digest_size=8).digest(), "little")
                             for u in self.utts], dtype=np.uint64)
        out = np.empty(len(self), dtype=np.uint64)
        by_file: dict[int, list[int]] = {}
        for fi, f in enumerate(self.folders):
            by_file.setdefault(f.source, []).append(fi)
        for k, fis in by_file.items():
            col = self.files[k].read("hash")
            for fi in fis:
                a, b = int(self.starts[fi]), int(self.starts[fi + 1])
                out[a:b] = col[self.rows[a:b]]
            del col
        return out

    def speaker_rows(self, speaker: int) -> np.ndarray:
        """Rows of a speaker (all its folders), ascending."""
        if self._speaker_folders is None:
            order = np.argsort(self.folder_speaker, kind="stable")
            cuts = np.searchsorted(self.folder_speaker[order], np.arange(len(self.speaker_names) + 1))
            self._speaker_folders = [order[cuts[k]:cuts[k + 1]] for k in range(len(self.speaker_names))]
        fs = self._speaker_folders[speaker]
        if len(fs) == 1:
            return np.arange(self.starts[fs[0]], self.starts[fs[0] + 1], dtype=np.int64)
        return np.concatenate([np.arange(self.starts[f], self.starts[f + 1], dtype=np.int64) for f in fs]) \
            if len(fs) else np.zeros(0, dtype=np.int64)


def Path_name(d: str) -> str:  # noqa: N802 - the folder's own name, as speaker_parts gives it
    return speaker_parts(d)[1]


def held_out_mask(table: UtteranceTable, fraction: float, keep: int = 1) -> np.ndarray:
    """`dataset.held_out` on a table: round(n * fraction) per speaker by key hash, leaving at least `keep`."""
    n = len(table)
    out = np.zeros(n, dtype=bool)
    if fraction <= 0 or n == 0:
        return out
    h = table.hashes().astype(np.float64)  # the float ranking `_hash01` uses (ties broken by key order)
    counts = np.bincount(table.speaker_of, minlength=len(table.speaker_names))
    n_val = np.minimum(np.floor(counts * fraction + 0.5).astype(np.int64), np.maximum(0, counts - keep))
    firsts = {}
    for sid in range(len(table.speaker_names)):  # O(speakers) loops, each a sort of one speaker's hashes
        if counts[sid] == 0:
            continue
        rows = table.speaker_rows(sid)
        ranked = rows[np.argsort(h[rows], kind="stable")]
        out[ranked[: n_val[sid]]] = True
        firsts[sid] = ranked[0]
    if not out.any():
        spare = [(int(counts[s]), name, s) for s, name in enumerate(table.speaker_names) if counts[s] > keep]
        if spare:
            out[firsts[max(spare)[2]]] = True
    return out
