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
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vall_e.data import hdf5 as h5fmt
from vall_e.data.listing import DEFAULT_FRAME_RATE, QNT_SUFFIX, Utterance, list_split, resolve_dir, utterance_ids
from vall_e.data.prompts import max_prompt_length, prompt_length, sample_prompt, trim
from vall_e.data.sampler import ItemKey, item_seed
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


class VALLEDataset(Dataset):
    """Items: {text, lang, prompt, resps, speaker, path, key, frames, index, epoch, position}.

    `text` LongTensor ids with <s> ... </s>; `lang` int; `prompt` LongTensor [Tp, L];
    `resps` LongTensor [T, L] (L cut to model.n_levels). `len()` is the number of utterances;
    `epoch_items(epoch)` is what one epoch visits under `sample_type`.
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

        meta = {}
        codec_spec: dict[str, Any] = {}
        if self.use_hdf5:
            f = h5fmt.open_hdf5(self.hdf5_path)
            try:
                for s in ("training", "validation"):
                    meta[s] = h5fmt.hdf5_metadata(f, s, getattr(d, s), cfg.cfg_path)
                file_symmap = h5fmt.read_symmap(f)
                file_languages = h5fmt.read_languages(f)
                codec_spec = h5fmt.read_codec_spec(f)
            finally:
                f.close()
        else:
            codec_spec = peek_codec_spec(cfg) or {}
        self.frame_rate = float(frame_rate or codec_spec.get("frame_rate") or DEFAULT_FRAME_RATE)

        def listing(s: str, validate: bool | None = None, min_utterances: int | None = None) -> list[Utterance]:
            return list_split(cfg, s, validate=validate, frame_rate=self.frame_rate,
                              metadata=meta.get(s) if self.use_hdf5 else None, min_utterances=min_utterances)

        train = listing("training")
        if d.validation:
            val = listing("validation")
            targets, pool = (train, train) if split == "train" else (val, val)
        else:
            out = held_out(train, float(d.validation_fraction), keep=max(1, int(d.min_utterances)))
            if split == "train":
                targets = pool = [u for u in train if u.key not in out]
            else:
                targets, pool = [u for u in train if u.key in out], train
        if not targets and split == "train":
            raise UserError("no training utterances: dataset.training lists no speaker folder with .qnt.pt + "
                            ".phn.txt pairs inside dataset.duration_range / phones_range")
        self.utterances: list[Utterance] = list(targets)
        self.pool: list[Utterance] = list(pool)

        levels = min((u.levels for u in (*self.pool, *self.utterances)), default=None)
        if levels is not None and levels < self.n_levels:
            raise UserError(f"the data has {levels} code levels but model.n_levels is {self.n_levels}")

        if not self.use_hdf5:
            codec_spec = h5fmt.codec_spec_for(cfg, levels or 0, self.frame_rate, codec_spec or None)
        self.codec_spec: dict[str, Any] = dict(codec_spec)

        # symbols: an explicit map (a checkpoint's) > the HDF5's > {cfg_path}/symmap.json
        if self.use_hdf5:
            self.file_symmap = file_symmap
            if symmap is not None and symmap.stress != file_symmap.stress:
                raise UserError(f"{self.hdf5_path}: its phonemes are stress={file_symmap.stress!r} but the symbol map in "
                                f"use (a checkpoint's or model's) is stress={symmap.stress!r}; rebuild the data with "
                                f"`python -m vall_e.emb.g2p DIR --stress {symmap.stress}` and --action hdf5")
            self.symmap = symmap if symmap is not None else file_symmap
            self.languages = languages if languages is not None else file_languages
            self._reencode = self.symmap != file_symmap
        else:
            if symmap is None:  # one map for every split: built from all the data, unfiltered
                every = {u.key: u for s in ("training", "validation")
                         for u in listing(s, validate=False, min_utterances=0)}
                symmap = load_symmap(cfg, [every[k] for k in sorted(every)])
            self.symmap = symmap
            self._reencode = False
            self.languages = languages if languages is not None else h5fmt.dataset_languages(cfg)
        for lang in sorted({u.language for u in self.pool}):
            if languages is None:
                self.languages.add(lang)  # e.g. speaker_languages changed after the HDF5 was built
            else:  # a checkpoint's map: its ids must not move
                self.languages.id(lang, source="the given language map (dataset.speaker_languages)")

        # speakers -> pool indices (prompt candidates); groups -> speakers
        self.pool_index = {u.key: i for i, u in enumerate(self.pool)}
        self.speaker_pool: dict[str, list[int]] = {}
        for i, u in enumerate(self.pool):
            self.speaker_pool.setdefault(u.speaker, []).append(i)
        self.speaker_items: dict[str, list[int]] = {}
        for i, u in enumerate(self.utterances):
            self.speaker_items.setdefault(u.speaker, []).append(i)
        self.speakers = sorted(self.speaker_items)
        self.groups: dict[str, list[str]] = {}
        for spk in self.speakers:
            self.groups.setdefault(self.utterances[self.speaker_items[spk][0]].group, []).append(spk)

        # costs for the bucketing sampler: an upper bound on text + prompt + response length
        trim_max = max_prompt_length(self.prompt_duration, self.frame_rate)
        spk_max = {s: max(self.pool[i].frames for i in idx) for s, idx in self.speaker_pool.items()}
        self.costs = [u.frames + u.phones + (min(trim_max, spk_max[u.speaker]) if trim_max else spk_max[u.speaker])
                      for u in self.utterances]

    # ----- epochs under sample_type -----
    def _draw(self, name: str, members: Sequence[int], k: int) -> int:
        """The k-th draw without replacement (reshuffled every len(members) draws) from `members`."""
        n = len(members)
        cycle, pos = divmod(k, n)
        order = list(members)
        random.Random(f"vall_e.draw:{self.seed}:{name}:{cycle}").shuffle(order)
        return order[pos]

    def epoch_items(self, epoch: int) -> list[int]:
        """The indices one epoch visits: every utterance (path), one per speaker, or one per group."""
        if self.sample_type == "path":
            return list(range(len(self.utterances)))
        if self.sample_type == "speaker":
            return [self._draw(f"spk:{s}", self.speaker_items[s], epoch) for s in self.speakers]
        out = []
        for g, spks in sorted(self.groups.items()):
            n = len(spks)
            spk = spks[self._draw(f"grp:{g}", range(n), epoch)]
            out.append(self._draw(f"spk:{spk}", self.speaker_items[spk], epoch // n))
        return out

    # ----- reading -----
    def __len__(self) -> int:
        return len(self.utterances)

    def _file(self):
        if self._h5 is None or self._h5_pid != os.getpid():
            self._h5 = h5fmt.open_hdf5(self.hdf5_path)
            self._h5_pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_h5"], state["_h5_pid"] = None, -1  # h5py handles are per process
        return state

    def codes(self, utt: Utterance) -> Tensor:
        """LongTensor [T, L] of an utterance (levels cut to model.n_levels)."""
        if self.use_hdf5:
            n_codes = self.codec_spec.get("n_codes", 1024)
            n_codes = n_codes if isinstance(n_codes, int) and not isinstance(n_codes, bool) else 1024
            codes = torch.from_numpy(h5fmt.read_array(self._file(), utt.key, "audio", ndim=2, n_values=n_codes)
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

    def text(self, utt: Utterance) -> Tensor:
        """LongTensor of symbol ids with <s> and </s> (one id per word boundary)."""
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

    def prompt(self, utt: Utterance, resps: Tensor, rng: random.Random) -> Tensor:
        """Pieces of the speaker's other utterances (see prompts.sample_prompt); the target's own
        window when the speaker has no other one or with probability 1 - random_utterance."""
        own = self.pool_index.get(utt.key)
        cands = [i for i in self.speaker_pool.get(utt.speaker, []) if i != own]
        length = prompt_length(rng, self.prompt_duration, self.frame_rate)
        if cands and rng.random() < self.random_utterance:
            return sample_prompt(cands, lambda i: self.codes(self.pool[i]), rng, trim_length=length,
                                 max_prompts=self.max_prompts, random_utterance=self.random_utterance)
        return trim(resps, length, rng) if length else resps

    def __getitem__(self, key: int | ItemKey | tuple) -> dict[str, Any]:
        if isinstance(key, tuple):
            key = ItemKey(*key)
            index, seed, epoch, position = key.index, key.seed, key.epoch, key.position
        else:
            index, epoch, position = int(key), 0, 0
            seed = item_seed(self.seed, 0, index)
        if not 0 <= index < len(self.utterances):
            raise IndexError(index)
        utt = self.utterances[index]
        rng = random.Random(seed)
        resps = self.codes(utt)
        return {
            "index": index,
            "text": self.text(utt),
            "lang": self.languages.id(utt.language),
            "prompt": self.prompt(utt, resps, rng),
            "resps": resps,
            "speaker": utt.speaker,
            "path": f"{self.hdf5_path}:{utt.key}" if self.use_hdf5 else str(utt.qnt_path),
            "key": utt.key,
            "frames": int(resps.shape[0]),
            "epoch": epoch,
            "position": position,
        }

    def summary(self) -> str:
        secs = sum(u.duration for u in self.utterances)
        return (f"{self.split}: {len(self.utterances)} utterances, {len(self.speakers)} speakers, "
                f"{len(self.groups)} groups, {secs / 3600:.2f} h, sample_type={self.sample_type}, "
                f"source={'hdf5 ' + str(self.hdf5_path) if self.use_hdf5 else 'folders'}")
