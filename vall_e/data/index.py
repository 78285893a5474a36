"""`data.h5` format version 2: a columnar index over contiguous code and text arrays, read by memory map.

Version 1 kept one HDF5 group per utterance, so opening a split walked every group (13 s and ~540 MB
per 100k utterances, in every rank). Here a split is a handful of contiguous datasets, so opening
costs O(speaker folders) and every per-utterance figure is a numpy column:

* `{split}/folders/name` (bytes, "group/folder", sorted by name + "/", i.e. in key order) and
  `{split}/folders/start` int64 [F + 1]: the folder's rows;
* `{split}/ids` fixed-length UTF-8 bytes [N], sorted within a folder;
* `{split}/frames`, `{split}/phones` int32 [N]; `{split}/hash` uint64 [N] (the stable hash of the
  utterance key that picks the held-out validation share);
* `{split}/codes` int16 [sum of frames, L] and `{split}/code_offsets` int64 [N + 1];
* `{split}/text` int16 [sum of phones] (ids with <s> and </s>) and `{split}/text_offsets` int64 [N + 1].

Every dataset is contiguous and unfiltered, so readers map the file (`np.memmap` at the dataset's
offset) and a random read is one slice, with no HDF5 call and nothing to reopen after a fork.
The phonemes are not stored per utterance: a different symbol map re-encodes the text through the
file's own map (a lookup table).

Sharding: with `--shards N` the speaker folders are split (whole folders, balanced by utterance
count) over `{name}.shard-00000-of-0000N.h5` files written in parallel; the main file then holds
only the root entries and the attr `shards` (their names, JSON). Each shard is written atomically and
the main file last, so a killed build leaves nothing loadable.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from vall_e.utils.errors import UserError

VERSION = 2
SPLITS = ("training", "validation", "noise")
COLUMNS = ("ids", "frames", "phones", "hash", "codes", "code_offsets", "text", "text_offsets")


def key_hash(key: str) -> int:
    """The stable 64-bit hash of an utterance key (the held-out split ranks by it)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def folder_order_key(name: str) -> str:
    """Sorting folders by this puts their utterances in key order (`{split}/{name}/{id}`)."""
    return name + "/"


def shard_name(path: Path, i: int, n: int) -> str:
    return f"{path.stem}.shard-{i:05d}-of-{n:05d}{path.suffix}"


# ---------------------------------------------------------------------------------------- writing


def create_split(f: h5py.File, split: str, names: Sequence[str], counts: Sequence[int], ids: Sequence[str] | np.ndarray,
                 frames: np.ndarray, phones: np.ndarray, hashes: np.ndarray, levels: int) -> dict[str, Any]:
    """Create a split's datasets (folders given in `folder_order_key` order, their rows in id order) and
    return {codes, text, code_offsets, text_offsets} (numpy offsets; h5py datasets to fill)."""
    g = f.require_group(split)
    frames = np.asarray(frames, dtype=np.int32)
    phones = np.asarray(phones, dtype=np.int32)
    n = len(frames)
    fg = g.create_group("folders")
    fg.create_dataset("name", data=np.array([s.encode("utf-8") for s in names], dtype=bytes) if names
                      else np.zeros(0, dtype="S1"))
    fg.create_dataset("start", data=np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]))
    ids_arr = ids if isinstance(ids, np.ndarray) and ids.dtype.kind == "S" else \
        np.array([s.encode("utf-8") for s in ids], dtype=bytes) if n else np.zeros(0, dtype="S1")
    g.create_dataset("ids", data=ids_arr)
    g.create_dataset("frames", data=frames)
    g.create_dataset("phones", data=phones)
    g.create_dataset("hash", data=np.asarray(hashes, dtype=np.uint64))
    code_off = np.concatenate([[0], np.cumsum(frames, dtype=np.int64)])
    text_off = np.concatenate([[0], np.cumsum(phones, dtype=np.int64)])
    g.create_dataset("code_offsets", data=code_off)
    g.create_dataset("text_offsets", data=text_off)
    # contiguous, unfiltered, allocated now: readable by memory map
    dcpl_codes = _early_alloc()
    codes = h5py.Dataset(h5py.h5d.create(g.id, b"codes", h5py.h5t.NATIVE_INT16,
                                         h5py.h5s.create_simple((int(code_off[-1]), int(levels))), dcpl=dcpl_codes))
    text = h5py.Dataset(h5py.h5d.create(g.id, b"text", h5py.h5t.NATIVE_INT16,
                                        h5py.h5s.create_simple((int(text_off[-1]),)), dcpl=_early_alloc()))
    return {"codes": codes, "text": text, "code_offsets": code_off, "text_offsets": text_off}


def _early_alloc() -> Any:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def write_root(f: h5py.File, fmt: str, *, symmap_json: str | None = None, languages_json: str | None = None,
               codec_json: str | None = None, shards: Sequence[str] = (), shard: tuple[int, int] | None = None) -> None:
    f.attrs["format"] = fmt
    f.attrs["version"] = VERSION
    f.attrs["shards"] = json.dumps(list(shards))
    if shard is not None:
        f.attrs["shard"] = json.dumps(list(shard))
    for name, val in (("symmap", symmap_json), ("languages", languages_json), ("codec", codec_json)):
        if val is not None:
            f.create_dataset(name, data=val)


# ---------------------------------------------------------------------------------------- reading


@dataclass
class _Map:
    offset: int
    dtype: str
    shape: tuple[int, ...]


class SplitFile:
    """One data file's split: folder table in memory, the columns as lazily created memory maps.

    Picklable (the maps are reopened in each process), so DataLoader workers share the page cache.
    """

    def __init__(self, path: Path, split: str, f: h5py.File) -> None:
        self.path, self.split = Path(path), split
        g = f[split]
        where = f"{path}:{split}"
        try:
            self.folder_names = [b.decode("utf-8") for b in g["folders/name"][()]]
            self.folder_start = np.asarray(g["folders/start"][()], dtype=np.int64)
            self._maps: dict[str, _Map] = {}
            for col in COLUMNS:
                ds = g[col]
                off = ds.id.get_offset()
                if ds.size and (off is None or ds.compression is not None or ds.chunks is not None):
                    raise ValueError(f"{col} is not a contiguous, unfiltered dataset")
                self._maps[col] = _Map(int(off or 0), ds.dtype.str, tuple(int(x) for x in ds.shape))
        except (KeyError, OSError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: damaged dataset index ({e}); rebuild it with "
                            "`python -m vall_e.data yaml=CONFIG --action hdf5`") from None
        n = self._maps["frames"].shape[0]
        m = self._maps
        ok = (len(self.folder_start) == len(self.folder_names) + 1 and self.folder_start[0] == 0
              and self.folder_start[-1] == n and bool(np.all(np.diff(self.folder_start) >= 0))
              and all(m[c].shape[:1] == (n,) for c in ("ids", "phones", "hash"))
              and m["code_offsets"].shape == (n + 1,) and m["text_offsets"].shape == (n + 1,)
              and len(m["codes"].shape) == 2)
        if not ok:
            raise UserError(f"{where}: inconsistent dataset index (column lengths differ); rebuild it with "
                            "`python -m vall_e.data yaml=CONFIG --action hdf5`")
        self.levels = m["codes"].shape[1]
        self._arrays: dict[str, np.ndarray] = {}
        self._pid = -1

    def __len__(self) -> int:
        return self._maps["frames"].shape[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": {}, "_pid": -1}

    def col(self, name: str) -> np.ndarray:
        """A read-only memory map of a column (an empty array for an empty one)."""
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        a = self._arrays.get(name)
        if a is None:
            m = self._maps[name]
            if 0 in m.shape:
                a = np.zeros(m.shape, dtype=m.dtype)
            else:
                a = np.memmap(self.path, dtype=np.dtype(m.dtype), mode="r", offset=m.offset, shape=m.shape)
            self._arrays[name] = a
        return a

    def read(self, name: str) -> np.ndarray:
        """A whole column read into memory (no mapping left behind: for columns copied anyway)."""
        m = self._maps[name]
        if 0 in m.shape:
            return np.zeros(m.shape, dtype=m.dtype)
        return np.fromfile(self.path, dtype=np.dtype(m.dtype), count=int(np.prod(m.shape)),
                           offset=m.offset).reshape(m.shape)

    def codes(self, row: int) -> np.ndarray:
        off = self.col("code_offsets")
        a, b = int(off[row]), int(off[row + 1])
        if not 0 <= a <= b <= self._maps["codes"].shape[0]:
            raise UserError(f"{self.path}:{self.split}/code_offsets: damaged at row {row} ({a}, {b})")
        return np.array(self.col("codes")[a:b])

    def text(self, row: int) -> np.ndarray:
        off = self.col("text_offsets")
        a, b = int(off[row]), int(off[row + 1])
        if not 0 <= a <= b <= self._maps["text"].shape[0]:
            raise UserError(f"{self.path}:{self.split}/text_offsets: damaged at row {row} ({a}, {b})")
        return np.array(self.col("text")[a:b])

    def uid(self, row: int) -> str:
        return bytes(self.col("ids")[row]).rstrip(b"\0").decode("utf-8", errors="replace")


def data_files(path: Path, f: h5py.File) -> list[Path]:
    """The files that hold the splits: the shards the main file names, else the main file itself."""
    try:
        shards = json.loads(f.attrs.get("shards", "[]"))
        if not isinstance(shards, list) or not all(isinstance(s, str) and "/" not in s and s for s in shards):
            raise ValueError("not a list of file names")
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: damaged 'shards' attribute ({e}); rebuild it with "
                        "`python -m vall_e.data yaml=CONFIG --action hdf5`") from None
    return [path.parent / s for s in shards] if shards else [path]


def open_splits(path: Path, f: h5py.File, split: str, fmt: str) -> list[SplitFile]:
    """Every data file's `split` (files without it are skipped)."""
    out = []
    for p in data_files(path, f):
        if p == path:
            if split in f:
                out.append(SplitFile(p, split, f))
            continue
        if not p.is_file():
            raise UserError(f"{p}: shard of {path.name} not found; rebuild it with "
                            "`python -m vall_e.data yaml=CONFIG --action hdf5`")
        try:
            sf = h5py.File(p, "r")
        except OSError as e:
            raise UserError(f"{p}: not a readable HDF5 file ({e})") from None
        with sf:
            if sf.attrs.get("format") != fmt or int(sf.attrs.get("version", 0)) != VERSION:
                raise UserError(f"{p}: not a shard of a version-{VERSION} vall_e dataset")
            if split in sf:
                out.append(SplitFile(p, split, sf))
    return out
