"""Find the utterances of speaker folders, with per-utterance metadata cached beside them.

A speaker folder holds `{id}.qnt.pt` (codes [T, L]) and `{id}.phn.txt` (phonemes) per utterance; only
ids that have both are used. Counting frames needs the codes, so the counts are cached in
`{speaker_dir}/metadata.json` (written atomically) and reused while each file's size and mtime are
unchanged. Speaker and group names come from the path: speaker = the folder's name, group = the
folder above it; nothing is evaluated.
"""
from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm import tqdm

from vall_e.emb.codes import load_codes
from vall_e.text.symmap import read_phonemes
from vall_e.utils.errors import UserError
from vall_e.utils.io import atomic_write_text, remove_stale_temps

QNT_SUFFIX = ".qnt.pt"
PHN_SUFFIX = ".phn.txt"
METADATA_NAME = "metadata.json"
METADATA_VERSION = 1
DEFAULT_FRAME_RATE = 75.0  # EnCodec 24 kHz and the offline WORLD codec share this token rate


@dataclass(frozen=True)
class Utterance:
    """One usable utterance: where it lives, who speaks it, and its sizes."""

    id: str
    dir: str          # speaker folder (absolute)
    key: str          # HDF5 key: "{split}/{group}/{speaker folder}/{id}"
    speaker: str      # speaker key, e.g. "{group}_{speaker}"
    group: str
    language: str
    frames: int       # codec frames T
    phones: int       # text length including <s> and </s>
    duration: float   # seconds = frames / frame_rate
    levels: int = 0   # codec levels L
    row: int = field(default=-1, compare=False, repr=False)  # pool row of a dataset's table (-1: none)

    @property
    def qnt_path(self) -> Path:
        return Path(self.dir) / f"{self.id}{QNT_SUFFIX}"

    @property
    def phn_path(self) -> Path:
        return Path(self.dir) / f"{self.id}{PHN_SUFFIX}"


def resolve_dir(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A speaker folder as an absolute path (relative ones hang off `root`, the YAML's folder)."""
    p = Path(path)
    if not p.is_absolute() and root is not None:
        p = Path(root) / p
    return Path(os.path.abspath(p))


def speaker_parts(speaker_dir: str | os.PathLike) -> tuple[str, str]:
    """(group, speaker folder name) of an absolute speaker folder."""
    p = Path(os.path.abspath(speaker_dir))
    return p.parent.name or "_", p.name or "_"


def speaker_key(speaker_dir: str | os.PathLike, name_format: str = "{group}_{speaker}") -> str:
    group, spk = speaker_parts(speaker_dir)
    bad = UserError(f"config key 'dataset.speaker_name_format' {name_format!r} is invalid "
                    "(only plain {group} and {speaker} fields are allowed)")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(name_format)
                  if name is not None]
    except ValueError:
        raise bad from None
    # plain fields only: no attribute or index lookups ({group.__class__}), conversions or specs
    if any(name not in ("group", "speaker") or spec or conv for name, spec, conv in fields):
        raise bad
    return name_format.format(group=group, speaker=spk)


def language_of(group: str, speaker_languages: dict[str, list[str]], default: str) -> str:
    """The language whose group list names `group`, else `default`."""
    for lang, groups in speaker_languages.items():
        if group in groups:
            return lang
    return default


def utterance_ids(speaker_dir: Path) -> list[str]:
    """Sorted ids that have both a `.qnt.pt` and a `.phn.txt` in the folder."""
    try:
        names = set(os.listdir(speaker_dir))
    except FileNotFoundError:
        raise UserError(f"{speaker_dir}: speaker folder not found") from None
    except NotADirectoryError:
        raise UserError(f"{speaker_dir}: not a folder (dataset entries are speaker folders)") from None
    ids = [n[: -len(QNT_SUFFIX)] for n in names if n.endswith(QNT_SUFFIX) and not n.startswith(".")]
    return sorted(i for i in ids if f"{i}{PHN_SUFFIX}" in names)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_metadata(path: Path) -> dict[str, Any]:
    """The cached entries, or {} when the file is missing, foreign (e.g. the reference's) or damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != METADATA_VERSION:
        return {}
    utts = data.get("utterances")
    return utts if isinstance(utts, dict) else {}


def measure_utterance(speaker_dir: Path, uid: str) -> dict[str, Any]:
    """Frames, levels and phoneme count of one utterance (loads its codes and phonemes)."""
    qnt = speaker_dir / f"{uid}{QNT_SUFFIX}"
    phn = speaker_dir / f"{uid}{PHN_SUFFIX}"
    codes = load_codes(qnt)
    phones = read_phonemes(phn)
    return {"frames": int(codes.shape[0]), "levels": int(codes.shape[1]), "phones": len(phones) + 2,
            "qnt": _stamp(qnt), "phn": _stamp(phn)}


def speaker_metadata(speaker_dir: str | os.PathLike, write: bool = True, progress: tqdm | None = None,
                     ) -> dict[str, dict[str, Any]]:
    """{id: {frames, levels, phones, ...}} for every complete utterance, from the cache when fresh.

    Stale or missing entries are measured and the cache is rewritten atomically; a read-only
    folder only loses the caching, not the listing.
    """
    speaker_dir = Path(speaker_dir)
    ids = utterance_ids(speaker_dir)
    meta_path = speaker_dir / METADATA_NAME
    cached = _read_metadata(meta_path)
    out: dict[str, dict[str, Any]] = {}
    changed = set(cached) != set(ids)
    for uid in ids:
        entry = cached.get(uid)
        fresh = (isinstance(entry, dict)
                 and all(type(entry.get(k)) is int and entry[k] >= 0 for k in ("frames", "levels", "phones"))
                 and entry.get("qnt") == _stamp(speaker_dir / f"{uid}{QNT_SUFFIX}")
                 and entry.get("phn") == _stamp(speaker_dir / f"{uid}{PHN_SUFFIX}"))
        if not fresh:
            entry = measure_utterance(speaker_dir, uid)
            changed = True
        out[uid] = entry
        if progress is not None:
            progress.update(1)
    if changed and write:
        # a run killed mid-write leaves its temporary file; a concurrent writer whose temporary file
        # this removes only loses its rename (an OSError below), never the listing
        remove_stale_temps(speaker_dir, METADATA_NAME, exact=True)
        try:
            atomic_write_text(meta_path, json.dumps({"version": METADATA_VERSION, "utterances": out},
                                                    indent=1, sort_keys=True))
        except OSError:
            pass  # read-only data: keep going without the cache
    return out


def _in_range(value: float, rng: Sequence[float]) -> bool:
    return rng[0] <= value <= rng[1]


def list_utterances(
    dirs: Iterable[str | os.PathLike],
    *,
    split: str = "training",
    root: str | os.PathLike | None = None,
    frame_rate: float = DEFAULT_FRAME_RATE,
    speaker_name_format: str = "{group}_{speaker}",
    speaker_languages: dict[str, list[str]] | None = None,
    language: str = "en",
    duration_range: Sequence[float] | None = None,
    phones_range: Sequence[int] | None = None,
    min_utterances: int = 0,
    write_metadata: bool = True,
    metadata: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> list[Utterance]:
    """Every usable utterance of the speaker folders, filtered, sorted by key.

    `duration_range`/`phones_range` (None = no filter) drop utterances outside [min, max];
    then speakers with fewer than `min_utterances` left are dropped. `metadata`, when given,
    maps absolute folder -> {id: entry} and replaces reading the folders (the HDF5 path).
    """
    speaker_languages = speaker_languages or {}
    dirs = [resolve_dir(d, root) for d in dirs]
    seen: set[Path] = set()
    per_dir: list[tuple[Path, dict[str, dict[str, Any]]]] = []
    if metadata is None:
        total = 0
        id_lists = []
        for d in dirs:
            if d in seen:
                continue
            seen.add(d)
            id_lists.append(d)
            total += len(utterance_ids(d))
        with tqdm(total=total, desc=f"listing {split}", unit="utt", leave=False,
                  disable=total < 200) as bar:
            for d in id_lists:
                per_dir.append((d, speaker_metadata(d, write=write_metadata, progress=bar)))
    else:
        for d in dirs:
            if d in seen:
                continue
            seen.add(d)
            per_dir.append((d, metadata.get(str(d), {})))

    out: list[Utterance] = []
    for d, entries in per_dir:
        group, folder = speaker_parts(d)
        spk = speaker_key(d, speaker_name_format)
        lang = language_of(group, speaker_languages, language)
        utts = []
        for uid, e in sorted(entries.items()):
            frames, phones = int(e["frames"]), int(e["phones"])
            duration = frames / frame_rate
            if duration_range is not None and not _in_range(duration, duration_range):
                continue
            if phones_range is not None and not _in_range(phones, phones_range):
                continue
            utts.append(Utterance(id=uid, dir=str(d), key=f"{split}/{group}/{folder}/{uid}", speaker=spk,
                                  group=group, language=lang, frames=frames, phones=phones,
                                  duration=duration, levels=int(e.get("levels", 0))))
        if len(utts) >= max(min_utterances, 1):
            out.extend(utts)
    out.sort(key=lambda u: u.key)
    return out


def dataset_dirs(cfg: Any, split: str) -> list[str]:
    """The configured folders of a split name: training | validation | noise."""
    return list(getattr(cfg.dataset, split))


def list_split(cfg: Any, split: str = "training", validate: bool | None = None,
               frame_rate: float = DEFAULT_FRAME_RATE, write_metadata: bool = True,
               metadata: dict[str, dict[str, dict[str, Any]]] | None = None,
               min_utterances: int | None = None) -> list[Utterance]:
    """`list_utterances` with the config's settings.

    Filters apply to training when `dataset.validate` (or as `validate` says); `min_utterances`
    defaults to the config's for training and 0 for the other splits.
    """
    d = cfg.dataset
    if validate is None:
        validate = bool(d.validate) and split == "training"
    if min_utterances is None:
        min_utterances = d.min_utterances if split == "training" else 0
    return list_utterances(
        dataset_dirs(cfg, split), split=split, root=cfg.cfg_path, frame_rate=frame_rate,
        speaker_name_format=d.speaker_name_format, speaker_languages=d.speaker_languages,
        language=d.language,
        duration_range=d.duration_range if validate else None,
        phones_range=d.phones_range if validate else None,
        min_utterances=min_utterances, write_metadata=write_metadata, metadata=metadata,
    )
