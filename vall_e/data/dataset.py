"""`VALLEDataset`: training/validation samples (text ids, language, prompt and target codes).

Reads the folder layout (`{group}/{speaker}/{id}.qnt.pt` + `.phn.txt`) or the HDF5 file
(`dataset.use_hdf5`); both give identical items for the same seed. An index names an utterance;
which utterances make up an epoch (`sample_type` path | speaker | group) is decided by
`epoch_items`, which the bucketing sampler calls, so the dataset itself holds no mutable sampling
state and every random choice of an item comes from the seed the sampler hands with its index.

Validation: the `dataset.validation` folders, or, when there are none, a fixed share
(`dataset.validation_fraction`) of each speaker's training utterances held out by a stable hash
of their names, so no set-up is needed and the split never changes between runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vall_e.data import hdf5 as h5fmt
from vall_e.data import index as idx
from vall_e.data.listing import DEFAULT_FRAME_RATE, QNT_SUFFIX, Utterance, list_split, resolve_dir, utterance_ids
from vall_e.data.prompts import max_prompt_length, prompt_length, sample_prompt, trim
from vall_e.data.sampler import ItemKey, item_seed
from vall_e.data.table import UtteranceTable, held_out_mask
from vall_e.emb.codes import load_codes, read_codes
from vall_e.text.symmap import Symmap, check_stress_of, corpus_symmap, read_phonemes
from vall_e.utils.errors import UserError

SPLITS = ("train", "val")


def _hash01(key: str) -> float:
    h = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def held_out(utterances: Sequence[Utterance], fraction: float, keep: int = 1) -> set[str]:
    """Keys of the validation share: round(n * fraction) per speaker, leaving at least `keep`.

    Utterances are ranked by a hash of their key, so adding files moves few of them between
    splits. At least one is held out overall when `fraction` > 0 and any speaker can spare one.
    """
    if fraction <= 0:
        return set()
    by_spk: dict[str, list[Utterance]] = {}
    for u in utterances:
        by_spk.setdefault(u.speaker, []).append(u)
    out: set[str] = set()
    spare: list[tuple[int, str, Utterance]] = []
    for spk, utts in sorted(by_spk.items()):
        ranked = sorted(utts, key=lambda u: (_hash01(u.key), u.key))
        n_val = min(int(len(utts) * fraction + 0.5), max(0, len(utts) - keep))
        out.update(u.key for u in ranked[:n_val])
        if len(utts) > keep:
            spare.append((len(utts), spk, ranked[0]))
    if not out and spare:
        out.add(max(spare, key=lambda t: (t[0], t[1]))[2].key)
    return out


def load_symmap(cfg: Any, utterances: Sequence[Utterance], save: bool = True):
    """The folder-mode symbol map: `{cfg_path}/symmap.json`, extended (and saved) to cover the data.

    Built by `corpus_symmap`: the saved map's ids kept, then (separate stress mode) the full phoneme
    inventory of the utterances' languages, then any other token of the data. A `.phn.txt` file in
    another stress mode than the map's (or than the other files') is a UserError naming it."""
    path = Path(cfg.symmap_path)
    base = Symmap.load(path) if path.is_file() else None
    symmap = corpus_symmap(((str(u.phn_path), read_phonemes(u.phn_path)) for u in utterances),
                           languages=sorted({u.language for u in utterances}), base=base, base_source=str(path))
    if save and (base is None or symmap != base):
        try:
            symmap.save(path)
        except OSError as e:
            raise UserError(f"{path}: cannot write the symbol map ({e.strerror})") from None
    return symmap


def peek_codec_spec(cfg: Any) -> dict[str, Any] | None:
    """The codec spec stored in the first training `.qnt.pt` (None for the reference's bare tensors)."""
    for entry in cfg.dataset.training:
        folder = resolve_dir(entry, cfg.cfg_path)
        try:
            ids = utterance_ids(folder)
            if ids:
                return read_codes(folder / f"{ids[0]}{QNT_SUFFIX}")[1]
        except UserError:
            return None  # the listing reports the problem
    return None


def _row_dtype(n: int) -> Any:
    return np.int32 if n < 2**31 else np.int64


class _Rows(Sequence):
    """A read-only sequence of `Utterance`s made on demand from table rows (no per-row objects kept)."""

    def __init__(self, table: UtteranceTable, rows: np.ndarray | None = None) -> None:
        self.table, self.rows = table, rows

    def __len__(self) -> int:
        return len(self.table) if self.rows is None else len(self.rows)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        return self.table.utterance(i if self.rows is None else int(self.rows[i]))


class _SpeakerRanges(Mapping):
    """speaker -> the indices (into pool rows or targets) of its utterances, from the folders' ranges."""

    def __init__(self, table: UtteranceTable, targets: np.ndarray | None = None) -> None:
        self.table, self.targets = table, targets
        self._ids = {s: i for i, s in enumerate(table.speaker_names)}

    def rows(self, speaker: str) -> np.ndarray:
        sid = self._ids[speaker]
        rows = self.table.speaker_rows(sid)
        if self.targets is None or not len(rows):
            return rows
        as_t = self.targets.dtype.type  # a value of another dtype would convert the whole array per call
        lo = int(np.searchsorted(self.targets, as_t(rows[0])))
        hi = int(np.searchsorted(self.targets, as_t(rows[-1]), side="right"))
        cand = np.arange(lo, hi, dtype=np.int64)
        t = self.table  # targets between a speaker's first and last row may belong to other speakers' folders
        return cand[t.folder_speaker[t.folder_of[self.targets[cand]]] == sid]

    def __getitem__(self, speaker: str) -> list[int]:
        if speaker not in self._ids:
            raise KeyError(speaker)
        return self.rows(speaker).tolist()

    def __iter__(self):
        return iter(s for s in self.table.speaker_names if len(self.rows(s)))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class VALLEDataset(Dataset):
    """Items: {text, lang, prompt, resps, speaker, path, key, frames, index, epoch, position}.

    `text` LongTensor ids with <s> ... </s>; `lang` int; `prompt` LongTensor [Tp, L];
    `resps` LongTensor [T, L] (L cut to model.n_levels). `len()` is the number of utterances;
    `epoch_items(epoch)` is what one epoch visits under `sample_type`. The utterances are held as an
    `UtteranceTable` (`self.pool`'s rows, `self.targets` = the rows this split serves), so a
    version-2 index of millions of utterances opens in seconds; `utterances` / `pool` give
    `Utterance` views.
    """

    def __init__(self, cfg: Any, split: str = "train", symmap: Any = None, languages: Any = None,
                 frame_rate: float | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        d = cfg.dataset
        self.split = split
        self.use_hdf5 = bool(d.use_hdf5)
        self.hdf5_path = Path(cfg.hdf5_path)
        self.seed = int(cfg.seed)
        self.sample_type = d.sample_type if split == "train" else "path"
        self.random_utterance = float(d.random_utterance)
        self.max_prompts = int(d.max_prompts)
        self.prompt_duration = float(d.prompt_duration)
        self.n_levels = int(cfg.model.n_levels)
        self._h5 = None
        self._h5_pid = -1
        self.format_version = 0  # 0 = folders

        meta = {}
        files: dict[str, list[Any]] = {}
        codec_spec: dict[str, Any] = {}
        if self.use_hdf5:
            f = h5fmt.open_hdf5(self.hdf5_path)
            try:
                self.format_version = int(f.attrs.get("version", 1))
                for s in ("training", "validation"):
                    if self.format_version >= 2:
                        files[s] = idx.open_splits(self.hdf5_path, f, s, h5fmt.FORMAT) if getattr(d, s) else []
                    else:
                        meta[s] = h5fmt.hdf5_metadata(f, s, getattr(d, s), cfg.cfg_path)
                file_symmap = h5fmt.read_symmap(f)
                file_languages = h5fmt.read_languages(f)
                codec_spec = h5fmt.read_codec_spec(f)
            finally:
                f.close()
        else:
            codec_spec = peek_codec_spec(cfg) or {}
        self.frame_rate = float(frame_rate or codec_spec.get("frame_rate") or DEFAULT_FRAME_RATE)

        def table(s: str, validate: bool | None = None, min_utterances: int | None = None) -> UtteranceTable:
            if validate is None:
                validate = bool(d.validate) and s == "training"
            if min_utterances is None:
                min_utterances = d.min_utterances if s == "training" else 0
            if self.format_version >= 2:
                return UtteranceTable.from_index(s, files[s], getattr(d, s), cfg, validate=validate,
                                                 min_utterances=min_utterances, frame_rate=self.frame_rate,
                                                 where=str(self.hdf5_path))
            return UtteranceTable.from_utterances(s, list_split(
                cfg, s, validate=validate, frame_rate=self.frame_rate, metadata=meta.get(s) if self.use_hdf5 else None,
                min_utterances=min_utterances), self.frame_rate)

        train = table("training")
        if d.validation:
            pool = table("validation") if split == "val" else train
            targets = np.arange(len(pool), dtype=_row_dtype(len(pool)))
        else:
            out = held_out_mask(train, float(d.validation_fraction), keep=max(1, int(d.min_utterances)))
            if split == "train":
                pool = train.subset(~out) if out.any() else train
                targets = np.arange(len(pool), dtype=_row_dtype(len(pool)))
            else:
                pool, targets = train, np.nonzero(out)[0].astype(_row_dtype(len(train)))
            del out
        if not len(targets) and split == "train":
            raise UserError("no training utterances: dataset.training lists no speaker folder with .qnt.pt + "
                            ".phn.txt pairs inside dataset.duration_range / phones_range")
        self.table = pool
        self.targets = targets
        self.utterances: Sequence[Utterance] = _Rows(pool, targets)
        self.pool: Sequence[Utterance] = _Rows(pool)

        levels = pool.min_levels()
        if levels is not None and levels < self.n_levels:
            raise UserError(f"the data has {levels} code levels but model.n_levels is {self.n_levels}")

        if not self.use_hdf5:
            codec_spec = h5fmt.codec_spec_for(cfg, levels or 0, self.frame_rate, codec_spec or None)
        self.codec_spec: dict[str, Any] = dict(codec_spec)

        # symbols: an explicit map (a checkpoint's) > the HDF5's > {cfg_path}/symmap.json
        self._remap: np.ndarray | None = None
        if self.use_hdf5:
            self.file_symmap = file_symmap
            if symmap is not None and symmap.stress != file_symmap.stress:
                raise UserError(f"{self.hdf5_path}: its phonemes are stress={file_symmap.stress!r} but the symbol map in "
                                f"use (a checkpoint's or model's) is stress={symmap.stress!r}; rebuild the data with "
                                f"`python -m vall_e.emb.g2p DIR --stress {symmap.stress}` and --action hdf5")
            self.symmap = symmap if symmap is not None else file_symmap
            self.languages = languages if languages is not None else file_languages
            self._reencode = self.symmap != file_symmap
            if self._reencode and self.format_version >= 2:  # file id -> id in the map in use (-1: unknown)
                self._remap = np.array([self.symmap._ids.get(t, -1) for t in file_symmap.symbols], dtype=np.int64)
                for sp in (0, 1, 2):  # <pad>, <s>, </s> keep their ids
                    self._remap[sp] = sp
        else:
            if symmap is None:  # one map for every split: built from all the data, unfiltered
                every = {u.key: u for s in ("training", "validation")
                         for u in list_split(cfg, s, validate=False, frame_rate=self.frame_rate, min_utterances=0)}
                symmap = load_symmap(cfg, [every[k] for k in sorted(every)])
            self.symmap = symmap
            self._reencode = False
            self.languages = languages if languages is not None else h5fmt.dataset_languages(cfg)
        for lang in sorted({f.language for f in pool.folders}):
            if languages is None:
                self.languages.add(lang)  # e.g. speaker_languages changed after the HDF5 was built
            else:  # a checkpoint's map: its ids must not move
                self.languages.id(lang, source="the given language map (dataset.speaker_languages)")

        # speakers -> pool rows (prompt candidates) and target indices; groups -> speakers
        self.speaker_pool = _SpeakerRanges(pool)
        self.speaker_items = _SpeakerRanges(pool, targets)
        spk_of_target = pool.speaker_of[targets]
        present = np.unique(spk_of_target)
        self.speakers = [pool.speaker_names[i] for i in present.tolist()]
        self.groups: dict[str, list[str]] = {}
        first_target = np.full(len(pool.speaker_names), -1, dtype=np.int64)
        first_target[spk_of_target[::-1]] = np.arange(len(targets) - 1, -1, -1)
        for sid, spk in zip(present.tolist(), self.speakers):
            row = int(targets[first_target[sid]])
            self.groups.setdefault(pool.folders[int(pool.folder_of[row])].group, []).append(spk)
        self._lang_of_folder = None

        # costs for the bucketing sampler: an upper bound on text + prompt + response length
        trim_max = max_prompt_length(self.prompt_duration, self.frame_rate)
        spk_max = np.zeros(len(pool.speaker_names), dtype=np.int64)
        if len(pool):
            np.maximum.at(spk_max, pool.speaker_of, pool.frames.astype(np.int64))
        prompt_cost = np.minimum(trim_max, spk_max) if trim_max else spk_max
        whole = len(targets) == len(pool)  # targets = every row: no gathered copies
        fr = pool.frames if whole else pool.frames[targets]
        ph = pool.phones if whole else pool.phones[targets]
        self.costs: np.ndarray = fr.astype(np.int64) + ph + prompt_cost[spk_of_target]

    # ----- epochs under sample_type -----
    def _draw(self, name: str, members: Sequence[int] | np.ndarray, k: int) -> int:
        """The k-th draw without replacement (reshuffled every len(members) draws) from `members`."""
        n = len(members)
        cycle, pos = divmod(k, n)
        h = hashlib.blake2b(f"vall_e.draw:{self.seed}:{name}:{cycle}".encode("utf-8"), digest_size=8).digest()
        order = np.random.Generator(np.random.PCG64(int.from_bytes(h, "little"))).permutation(n)
        return int(members[int(order[pos])])

    def epoch_items(self, epoch: int) -> np.ndarray:
        """The indices one epoch visits: every utterance (path), one per speaker, or one per group."""
        if self.sample_type == "path":
            return np.arange(len(self.targets), dtype=np.int64)
        if self.sample_type == "speaker":
            return np.array([self._draw(f"spk:{s}", self.speaker_items.rows(s), epoch) for s in self.speakers],
                            dtype=np.int64)
        out = []
        for g, spks in sorted(self.groups.items()):
            n = len(spks)
            spk = spks[self._draw(f"grp:{g}", range(n), epoch)]
            out.append(self._draw(f"spk:{spk}", self.speaker_items.rows(spk), epoch // n))
        return np.array(out, dtype=np.int64)

    # ----- reading -----
    def __len__(self) -> int:
        return len(self.targets)

    def _file(self):
        if self._h5 is None or self._h5_pid != os.getpid():
            self._h5 = h5fmt.open_hdf5(self.hdf5_path)
            self._h5_pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"], state["_h5_pid"] = None, -1  # h5py handles are per process
        return state

    def _n_codes(self) -> int:
        n_codes = self.codec_spec.get("n_codes", 1024)
        return n_codes if isinstance(n_codes, int) and not isinstance(n_codes, bool) else 1024

    def codes(self, utt: Utterance | int) -> Tensor:
        """LongTensor [T, L] of an utterance or pool row (levels cut to model.n_levels)."""
        if isinstance(utt, (int, np.integer)):
            row = int(utt)
            utt = None
        else:
            row = -1
        if self.format_version >= 2:
            if row < 0:
                raise TypeError("a version-2 dataset reads codes by pool row")
            t = self.table
            sf = t.files[t.folders[int(t.folder_of[row])].source]
            arr = sf.codes(int(t.rows[row]))
            where = f"{sf.path}:{sf.split} row {int(t.rows[row])}"
            if arr.size:
                lo, hi = int(arr.min()), int(arr.max())
                if lo < 0 or hi >= self._n_codes():
                    raise UserError(f"{where}: codes must lie in [0, {self._n_codes()}), found [{lo}, {hi}]")
            if arr.shape[0] != int(t.frames[row]):
                raise UserError(f"{where}: has {arr.shape[0]} frames, the index says {int(t.frames[row])}; "
                                "rebuild it with `python -m vall_e.data yaml=CONFIG --action hdf5`")
            return torch.from_numpy(arr.astype(np.int64))[:, : self.n_levels]
        if utt is None:
            utt = self.table.utterance(row)
        if self.use_hdf5:
            codes = torch.from_numpy(h5fmt.read_array(self._file(), utt.key, "audio", ndim=2, n_values=self._n_codes())
                                     .astype("int64"))
            if codes.shape[1] < self.n_levels:
                raise UserError(f"{self.hdf5_path}:{utt.key}/audio: has {codes.shape[1]} code levels, "
                                f"model.n_levels is {self.n_levels}")
        else:
            codes = load_codes(utt.qnt_path)
        if codes.shape[0] != utt.frames:
            raise UserError(f"{utt.qnt_path if not self.use_hdf5 else self.hdf5_path}: {utt.key} has "
                            f"{codes.shape[0]} frames, the metadata says {utt.frames}; rebuild the metadata")
        return codes[:, : self.n_levels]

    def _text_v2(self, row: int) -> Tensor:
        t = self.table
        sf = t.files[t.folders[int(t.folder_of[row])].source]
        arr = sf.text(int(t.rows[row])).astype(np.int64)
        where = f"{sf.path}:{sf.split} row {int(t.rows[row])}"
        n = len(self.file_symmap)
        if arr.size == 0 or int(arr.min()) < 0 or int(arr.max()) >= n:
            raise UserError(f"{where}: text ids must be a non-empty list in [0, {n})")
        if self._remap is not None:
            arr = self._remap[arr]
            if (arr < 0).any():
                bad = self.file_symmap.symbols[int(sf.text(int(t.rows[row]))[np.nonzero(arr < 0)[0][0]])]
                raise UserError(f"unknown phoneme {bad!r} in {where} (not in the symbol map)")
        return torch.from_numpy(arr)

    def text(self, utt: Utterance | int) -> Tensor:
        """LongTensor of symbol ids with <s> and </s> (one id per word boundary), of an utterance or pool row."""
        if self.format_version >= 2:
            return self._text_v2(int(utt) if isinstance(utt, (int, np.integer)) else utt.row)
        if isinstance(utt, (int, np.integer)):
            utt = self.table.utterance(int(utt))
        if self.use_hdf5:
            g = self._file()[utt.key]
            if not self._reencode:
                return torch.from_numpy(h5fmt.read_array(self._file(), utt.key, "text", ndim=1,
                                                         n_values=len(self.symmap)).astype("int64"))
            try:
                tokens = json.loads(g.attrs["phonemes"])
                if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                    raise ValueError("not a list of strings")
            except (KeyError, ValueError, TypeError) as e:
                raise UserError(f"{self.hdf5_path}:{utt.key}: damaged 'phonemes' attribute ({e}); "
                                "rebuild it with `python -m vall_e.data yaml=CONFIG --action hdf5`") from None
            return torch.tensor(self.symmap.encode(tokens, source=f"{self.hdf5_path}:{utt.key}"), dtype=torch.long)
        tokens = read_phonemes(utt.phn_path)
        check_stress_of(tokens, self.symmap.stress, str(utt.phn_path), "the symbol map in use")
        return torch.tensor(self.symmap.encode(tokens, source=str(utt.phn_path)), dtype=torch.long)

    def prompt(self, row: int, resps: Tensor, rng: random.Random) -> Tensor:
        """Pieces of the speaker's other utterances (see prompts.sample_prompt; candidates from the
        speaker's row ranges); the target's own window when the speaker has no other one or with
        probability 1 - random_utterance."""
        t = self.table
        rows = t.speaker_rows(int(t.folder_speaker[t.folder_of[row]]))
        cands = rows[rows != row].tolist()
        length = prompt_length(rng, self.prompt_duration, self.frame_rate)
        if cands and rng.random() < self.random_utterance:
            return sample_prompt(cands, self.codes, rng, trim_length=length,
                                 max_prompts=self.max_prompts, random_utterance=self.random_utterance)
        return trim(resps, length, rng) if length else resps

    def __getitem__(self, key: int | ItemKey | tuple) -> dict[str, Any]:
        if isinstance(key, tuple):
            key = ItemKey(*key)
            index, seed, epoch, position = key.index, key.seed, key.epoch, key.position
        else:
            index, epoch, position = int(key), 0, 0
            seed = item_seed(self.seed, 0, index)
        if not 0 <= index < len(self.targets):
            raise IndexError(index)
        t = self.table
        row = int(self.targets[index])
        folder = t.folders[int(t.folder_of[row])]
        rng = random.Random(seed)
        resps = self.codes(row)
        uid = t.uid(row)
        key_s = f"{t.split}/{folder.group}/{folder.name}/{uid}"
        return {
            "index": index,
            "text": self.text(row),
            "lang": self.languages.id(folder.language),
            "prompt": self.prompt(row, resps, rng),
            "resps": resps,
            "speaker": folder.speaker,
            "path": f"{self.hdf5_path}:{key_s}" if self.use_hdf5 else str(Path(folder.dir) / f"{uid}{QNT_SUFFIX}"),
            "key": key_s,
            "frames": int(resps.shape[0]),
            "epoch": epoch,
            "position": position,
        }

    def summary(self) -> str:
        t = self.table
        secs = float(t.frames[self.targets].sum()) / self.frame_rate
        src = f"hdf5 v{self.format_version} {self.hdf5_path}" if self.use_hdf5 else "folders"
        return (f"{self.split}: {len(self.targets)} utterances, {len(self.speakers)} speakers, "
                f"{len(self.groups)} groups, {secs / 3600:.2f} h, sample_type={self.sample_type}, source={src}")
