"""`data.h5`: the whole dataset in one file (or N shards), so training needs no folder walk and no metadata files.

`build_hdf5` writes format version 2, the columnar, memory-mapped index of `vall_e.data.index`
(opening costs O(speaker folders), not O(utterances)). Version 1 files still load; their layout:

* one group per utterance, `{split}/{group}/{speaker folder}/{id}` with split in
  training | validation | noise: dataset `audio` [T, L] int16, dataset `text` symbol ids int16
  (with <s> and </s>; absent for noise), attrs `id`, `speaker`, `group`, `language`, `frames`,
  `levels`, `phones` (text length), `duration` (seconds), `phonemes` (the tokens as a JSON list, so
  a different symbol map can re-encode them);
* at the root: string datasets `symmap`, `languages` and `codec` (JSON), and attrs `format`,
  `version` and `complete`.

The file is written under a temporary name and renamed only when complete, so a killed build never
leaves a `data.h5` behind; `open_hdf5` also refuses any file without the `complete` mark.
Filters (duration, phonemes) are not applied when building: the file holds every utterance and the
dataset filters at load time, so changing a range needs no rebuild.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np
from tqdm import tqdm

from vall_e.data import index as idx
from vall_e.data.listing import (DEFAULT_FRAME_RATE, METADATA_NAME, PHN_SUFFIX, QNT_SUFFIX, language_of, resolve_dir,
                                 speaker_key, speaker_parts, utterance_ids)
from vall_e.emb.codes import read_codes
from vall_e.text.languages import LanguageMap
from vall_e.text.symmap import Symmap, corpus_symmap, read_phonemes
from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_path

FORMAT = "vall_e.data"
VERSION = 2  # the newest this code reads; 1 = one group per utterance, 2 = vall_e.data.index
SPLITS = ("training", "validation", "noise")


def group_prefix(split: str, speaker_dir: str | os.PathLike) -> str:
    group, folder = speaker_parts(speaker_dir)
    return f"{split}/{group}/{folder}"


def _rebuild_hint(path: Path) -> str:
    return "rebuild it with `python -m vall_e.data yaml=CONFIG --action hdf5`"


def open_hdf5(path: str | os.PathLike):
    """Open a complete data.h5 read-only; UserError for a missing, foreign or incomplete file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: HDF5 dataset not found; build it with `python -m vall_e.data yaml=... --action hdf5`")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({e}); {_rebuild_hint(path)}") from None
    if f.attrs.get("format") != FORMAT or not bool(f.attrs.get("complete", False)):
        f.close()
        raise UserError(f"{path}: not a complete vall_e dataset (an interrupted build or another tool's file); "
                        f"{_rebuild_hint(path)}")
    if int(f.attrs.get("version", 0)) > VERSION:
        f.close()
        raise UserError(f"{path}: dataset format version {int(f.attrs['version'])} is newer than this vall_e "
                        f"understands ({VERSION})")
    return f


def _root_json(f, name: str) -> Any:
    if name not in f:
        raise UserError(f"{f.filename}: root entry {name!r} is missing; {_rebuild_hint(Path(f.filename))}")
    raw = f[name][()]
    return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)


def read_symmap(f):
    return Symmap.from_json(_root_json(f, "symmap"), source=f"{f.filename}:symmap")


def read_languages(f):
    return LanguageMap.from_json(_root_json(f, "languages"), source=f"{f.filename}:languages")


def read_codec_spec(f) -> dict[str, Any]:
    try:
        spec = json.loads(_root_json(f, "codec"))
    except ValueError as e:
        raise UserError(f"{f.filename}:codec: not valid JSON ({e}); {_rebuild_hint(Path(f.filename))}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{f.filename}:codec: expected a JSON object; {_rebuild_hint(Path(f.filename))}")
    return spec


def read_array(f, key: str, name: str, *, ndim: int, n_values: int) -> np.ndarray:
    """Dataset `name` of utterance `key`, checked: integers, `ndim` dimensions, non-empty, each value in
    [0, n_values). A damaged or edited file is a UserError naming it, never a crash inside training."""
    where = f"{f.filename}:{key}/{name}"
    try:
        arr = f[key][name][()]
    except (KeyError, OSError, ValueError) as e:
        raise UserError(f"{where}: cannot be read ({e}); {_rebuild_hint(Path(f.filename))}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu":
        raise UserError(f"{where}: expected integers, got {getattr(arr, 'dtype', type(arr).__name__)}")
    if arr.ndim != ndim or arr.size == 0:
        raise UserError(f"{where}: expected a non-empty {ndim}-d array, got shape {list(arr.shape)}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= n_values:
        raise UserError(f"{where}: values must lie in [0, {n_values}), found [{lo}, {hi}]")
    return arr


def hdf5_metadata(f, split: str, dirs: Iterable[str | os.PathLike], root: str | os.PathLike | None,
                  ) -> dict[str, dict[str, dict[str, Any]]]:
    """{absolute folder: {id: {frames, levels, phones}}} for configured folders, read from the attrs.

    A configured folder that the file lacks is an error: the file is older than the config.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for d in dirs:
        d = resolve_dir(d, root)
        prefix = group_prefix(split, d)
        if prefix not in f:
            raise UserError(f"{f.filename}: has no {split} folder {d} ({prefix}); {_rebuild_hint(Path(f.filename))}")
        entries = {}
        for uid, g in f[prefix].items():
            a = g.attrs
            try:
                entries[uid] = {k: int(a[k]) for k in ("frames", "levels", "phones")}
            except (KeyError, ValueError, TypeError) as e:
                raise UserError(f"{f.filename}:{prefix}/{uid}: damaged attributes ({e}); "
                                f"{_rebuild_hint(Path(f.filename))}") from None
        out[str(d)] = entries
    return out


def codec_spec_for(cfg: Any, levels: int, frame_rate: float, from_files: dict[str, Any] | None) -> dict[str, Any]:
    """The codec description stored with a dataset: the one the `.qnt.pt` files carry, over the config's."""
    spec = {"name": cfg.codec.name, "frame_rate": frame_rate, "n_levels": levels}
    if cfg.codec.name == "encodec":
        spec.update(model=cfg.codec.model, bandwidth=cfg.codec.bandwidth, sample_rate=24000, n_codes=1024)
    elif cfg.codec.codebooks:
        spec.update(codebooks=cfg.codec.codebooks)
    if from_files:
        spec.update(from_files)
    return spec


def _remove_stale_temps(path: Path) -> None:
    """Temporary files of builds that were killed (a clean failure removes its own)."""
    for p in path.parent.glob(f".{path.name}.*.tmp{path.suffix}"):
        try:
            p.unlink()
        except OSError:
            pass


def build_hdf5(cfg: Any, path: str | os.PathLike | None = None, frame_rate: float = DEFAULT_FRAME_RATE,
               progress: bool = True, *, version: int = VERSION, shards: int = 1, workers: int = 1) -> Path:
    """Write every utterance of the configured training/validation/noise folders to `path`.

    The symbol map is `corpus_symmap`'s for all the phonemes and their languages (extending
    `{cfg_path}/symmap.json` when it exists, so ids stay stable across modes and rebuilds; its stress
    mode is stored with it). Version 2 (default) writes the columnar index, over `shards` files built
    by `workers` processes; version 1 the one-group-per-utterance layout. Returns the written path.
    """
    if version not in (1, VERSION):
        raise UserError(f"dataset format version must be 1 or {VERSION}, got {version}")
    if shards < 1 or workers < 1:
        raise UserError(f"--shards and --workers must be at least 1 (got {shards}, {workers})")
    if version == 1 and shards > 1:
        raise UserError("format version 1 cannot be sharded")
    path = Path(path) if path is not None else Path(cfg.hdf5_path)
    d = cfg.dataset
    jobs: list[tuple[str, Path, str]] = []  # (split, folder, id)
    seen: set[tuple[str, Path]] = set()
    for split in SPLITS:
        for entry in getattr(d, split):
            folder = resolve_dir(entry, cfg.cfg_path)
            if (split, folder) in seen:
                continue
            seen.add((split, folder))
            if split == "noise":
                if not folder.is_dir():
                    raise UserError(f"{folder}: noise folder not found")
                ids = sorted(n[: -len(QNT_SUFFIX)] for n in os.listdir(folder)
                             if n.endswith(QNT_SUFFIX) and not n.startswith("."))
            else:
                ids = utterance_ids(folder)
            jobs += [(split, folder, i) for i in ids]
    if not any(s != "noise" for s, _, _ in jobs):
        raise UserError("no utterances found: dataset.training/validation list no speaker folder with "
                        f"matching {QNT_SUFFIX} and {PHN_SUFFIX} files")

    phonemes: dict[tuple[str, Path, str], list[str]] = {}
    for job in tqdm(jobs, desc="reading phonemes", unit="utt", disable=not progress, leave=False):
        split, folder, uid = job
        if split != "noise":
            phonemes[job] = read_phonemes(folder / f"{uid}{PHN_SUFFIX}")
    base = Symmap.load(cfg.symmap_path) if Path(cfg.symmap_path).is_file() else None
    ordered = sorted(phonemes, key=lambda k: (k[0], str(k[1]), k[2]))
    corpus_languages = sorted({language_of(speaker_parts(folder)[0], d.speaker_languages, d.language)
                               for _, folder, _ in ordered})
    symmap = corpus_symmap([(str(k[1] / f"{k[2]}{PHN_SUFFIX}"), phonemes[k]) for k in ordered],
                           languages=corpus_languages, base=base, base_source=str(cfg.symmap_path))
    languages = dataset_languages(cfg)

    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    if version == VERSION:
        return _build_index(cfg, path, frame_rate, progress, jobs, phonemes, symmap, languages, shards, workers)
    levels_seen: set[int] = set()
    file_spec = None
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = 1
            f.attrs["complete"] = False
            for job in tqdm(jobs, desc=f"writing {path.name}", unit="utt", disable=not progress):
                split, folder, uid = job
                qnt = folder / f"{uid}{QNT_SUFFIX}"
                codes, spec = read_codes(qnt)
                if file_spec is None and spec:
                    file_spec = dict(spec)
                levels_seen.add(int(codes.shape[1]))
                group, folder_name = speaker_parts(folder)
                g = f.create_group(f"{split}/{group}/{folder_name}/{uid}")
                g.create_dataset("audio", data=codes.numpy().astype(np.int16), compression="lzf")
                a = g.attrs
                a["id"] = uid
                a["speaker"] = speaker_key(folder, d.speaker_name_format)
                a["group"] = group
                a["language"] = language_of(group, d.speaker_languages, d.language)
                a["frames"] = int(codes.shape[0])
                a["levels"] = int(codes.shape[1])
                a["duration"] = codes.shape[0] / frame_rate
                if split != "noise":
                    tokens = phonemes[job]
                    ids = symmap.encode(tokens, source=str(folder / f"{uid}{PHN_SUFFIX}"))
                    arr = np.asarray(ids, dtype=np.int64)
                    if arr.size and arr.max() > np.iinfo(np.int16).max:
                        raise UserError(f"symbol map has {int(arr.max()) + 1} symbols; more than int16 text can hold")
                    g.create_dataset("text", data=arr.astype(np.int16))
                    a["phones"] = len(ids)
                    a["phonemes"] = json.dumps(tokens, ensure_ascii=False)
                else:
                    a["phones"] = 0
            if len(levels_seen) > 1:
                raise UserError(f"codes in the dataset have different level counts {sorted(levels_seen)}; "
                                "re-quantize them with one codec setting")
            spec = codec_spec_for(cfg, levels_seen.pop() if levels_seen else 0, frame_rate, file_spec)
            f.create_dataset("symmap", data=_as_json_str(symmap.to_json()))
            f.create_dataset("languages", data=languages.to_json())
            f.create_dataset("codec", data=json.dumps(spec))
            f.attrs["complete"] = True
    return path


def _as_json_str(data: Any) -> str:
    return data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)


def dataset_languages(cfg: Any) -> LanguageMap:
    """The language map a config implies: {"en": 0}, then dataset.language, then speaker_languages' keys."""
    m = LanguageMap()
    m.add(cfg.dataset.language)
    for lang in cfg.dataset.speaker_languages:
        m.add(lang)
    return m


# ------------------------------------------------------------------------------- version 2 (index)

def _build_index(cfg: Any, path: Path, frame_rate: float, progress: bool, jobs: list[tuple[str, Path, str]],
                 phonemes: dict[tuple[str, Path, str], list[str]], symmap: Symmap, languages: LanguageMap,
                 shards: int, workers: int) -> Path:
    """Version 2: folders spread over `shards` files (whole folders, balanced by count), `workers` at a time."""
    by_folder: dict[tuple[str, Path], list[str]] = {}
    for split, folder, uid in jobs:
        by_folder.setdefault((split, folder), []).append(uid)
    names: dict[tuple[str, str], Path] = {}
    for split, folder in by_folder:
        name = "/".join(speaker_parts(folder))
        if (split, name) in names:
            raise UserError(f"{folder} and {names[split, name]}: two {split} speaker folders named {name!r}; "
                            "a dataset file needs distinct group/speaker folder names")
        names[split, name] = folder
    load = [0] * shards
    parts: list[list[tuple[str, str, str, list[str]]]] = [[] for _ in range(shards)]
    for (split, folder), ids in sorted(by_folder.items(), key=lambda kv: (-len(kv[1]), kv[0][0], str(kv[0][1]))):
        i = min(range(shards), key=lambda k: (load[k], k))
        load[i] += len(ids)
        parts[i].append((split, str(folder), "/".join(speaker_parts(folder)), ids))
    sym_json = _as_json_str(symmap.to_json())
    results: list[dict[str, Any]] = []

    def finish(f: h5py.File, info: dict[str, Any]) -> None:
        spec = codec_spec_for(cfg, info["levels"], frame_rate, info["spec"])
        idx.write_root(f, FORMAT, symmap_json=sym_json, languages_json=languages.to_json(), codec_json=json.dumps(spec))
        f.attrs["complete"] = True

    if shards == 1:
        _write_index_file(str(path), parts[0], sym_json, progress, finish=finish)
        return path
    outs = [str(path.parent / idx.shard_name(path, i, shards)) for i in range(shards)]
    for p in path.parent.glob(f".{path.stem}.shard-*"):
        _unlink_quietly(p)
    if workers == 1:
        results = [_write_index_file(o, part, sym_json, progress, shard=(i, shards)) for i, (o, part) in
                   enumerate(zip(outs, parts))]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, shards), mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(_write_index_file, o, part, sym_json, False, None, (i, shards))
                    for i, (o, part) in enumerate(zip(outs, parts))]
            results = [fu.result() for fu in tqdm(futs, desc=f"writing {shards} shards", disable=not progress)]
    levels = {r["levels"] for r in results if r["levels"]}
    if len(levels) > 1:
        raise UserError(f"codes in the dataset have different level counts {sorted(levels)}; "
                        "re-quantize them with one codec setting")
    info = {"levels": levels.pop() if levels else 0, "spec": next((r["spec"] for r in results if r["spec"]), None)}
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["complete"] = False
            finish(f, info)
            f.attrs["shards"] = json.dumps([Path(o).name for o in outs])
    for p in path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}"):  # an earlier build's other count
        if str(p) not in outs:
            _unlink_quietly(p)
    return path


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass


def _write_index_file(out: str, folders: list[tuple[str, str, str, list[str]]], symmap_json: str, progress: bool,
                      finish: Any = None, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """One data file of format version 2 (a shard, or with `finish` the whole dataset), written atomically.

    folders: (split, absolute folder, "group/folder" name, ids). Frames come from the folders'
    metadata cache (measured where stale); codes and phonemes are read once more to be written.
    """
    from vall_e.data.listing import speaker_metadata

    symmap = Symmap.from_json(symmap_json, source="the dataset's symbol map")
    info: dict[str, Any] = {"levels": 0, "spec": None}
    path = Path(out)
    total = sum(len(ids) for *_, ids in folders)
    with atomic_path(path) as tmp, tqdm(total=total, desc=f"writing {path.name}", unit="utt",
                                        disable=not progress) as bar:
        with h5py.File(tmp, "w") as f:
            if shard is not None:
                idx.write_root(f, FORMAT, shard=shard)
            for split in SPLITS:
                mine = sorted((x for x in folders if x[0] == split), key=lambda x: idx.folder_order_key(x[2]))
                if not mine:
                    continue
                frames, phones, texts, ids_all, hashes = [], [], [], [], []
                for _, folder_s, name, ids in mine:
                    folder = Path(folder_s)
                    if split == "noise":
                        meta = {u: {"frames": int(read_codes(folder / f"{u}{QNT_SUFFIX}")[0].shape[0])} for u in ids}
                    else:
                        meta = speaker_metadata(folder)
                    for uid in ids:
                        if uid not in meta:
                            raise UserError(f"{folder / uid}{QNT_SUFFIX}: vanished while building")
                        frames.append(int(meta[uid]["frames"]))
                        if split == "noise":
                            t = np.zeros(0, dtype=np.int64)
                        else:
                            src = str(folder / f"{uid}{PHN_SUFFIX}")
                            t = np.asarray(symmap.encode(read_phonemes(folder / f"{uid}{PHN_SUFFIX}"), source=src),
                                           dtype=np.int64)
                            if t.size and t.max() > np.iinfo(np.int16).max:
                                raise UserError(f"symbol map has {int(t.max()) + 1} symbols; more than int16 "
                                                "text can hold")
                        texts.append(t.astype(np.int16))
                        phones.append(len(t))
                        ids_all.append(uid)
                        hashes.append(idx.key_hash(f"{split}/{name}/{uid}"))
                first = Path(mine[0][1]) / f"{mine[0][3][0]}{QNT_SUFFIX}"
                levels = info["levels"] or int(read_codes(first)[0].shape[1])
                info["levels"] = levels
                ds = idx.create_split(f, split, [x[2] for x in mine], [len(x[3]) for x in mine], ids_all,
                                      np.asarray(frames), np.asarray(phones), np.asarray(hashes, dtype=np.uint64),
                                      levels)
                row = 0
                for _, folder_s, name, ids in mine:
                    for uid in ids:
                        qnt = Path(folder_s) / f"{uid}{QNT_SUFFIX}"
                        codes, spec = read_codes(qnt)
                        if info["spec"] is None and spec:
                            info["spec"] = dict(spec)
                        if int(codes.shape[1]) != levels:
                            raise UserError(f"codes in the dataset have different level counts [{levels}, "
                                            f"{int(codes.shape[1])}] ({qnt}); re-quantize them with one codec setting")
                        a, b = int(ds["code_offsets"][row]), int(ds["code_offsets"][row + 1])
                        if b - a != codes.shape[0]:
                            raise UserError(f"{qnt}: {codes.shape[0]} frames, its folder's {METADATA_NAME} says "
                                            f"{b - a}; the file changed while building, build again")
                        ds["codes"][a:b] = codes.numpy().astype(np.int16)
                        ta, tb = int(ds["text_offsets"][row]), int(ds["text_offsets"][row + 1])
                        if tb > ta:
                            ds["text"][ta:tb] = texts[row]
                        row += 1
                        bar.update(1)
            if finish is not None:
                finish(f, info)
    return info
