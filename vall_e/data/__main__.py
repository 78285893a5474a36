"""`python -m vall_e.data yaml=CONFIG [--action summary|metadata|hdf5|symmap|sample]`.

* summary (default): what data the config names, what is prepared, and what to run next;
* metadata: write each speaker folder's `metadata.json` (frames, phonemes) and report the filters;
* hdf5: build `{cfg_path}/{dataset.hdf5_name}` (atomically), format version 2 (a columnar index read by
  memory map); `--shards N --workers K` spreads it over N shard files written by K processes;
  `--format-version 1` writes the older one-group-per-utterance layout;
* symmap: write `{cfg_path}/symmap.json` from all the data's phonemes and the phoneme inventory of its
  languages (the folder mode's map);
* sample: build the loaders and print the shapes of two batches of each split.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from vall_e.config import parse_config
from vall_e.data import hdf5 as h5fmt
from vall_e.data.collate import batch_frames, make_dataloader
from vall_e.data.dataset import VALLEDataset, load_symmap
from vall_e.data.hdf5 import build_hdf5
from vall_e.data.listing import METADATA_NAME, list_split, resolve_dir
from vall_e.utils.errors import UserError, run_main

ACTIONS = ("summary", "metadata", "hdf5", "symmap", "sample")


def _summary(cfg: Any, yaml_hint: str) -> None:
    d = cfg.dataset
    print(f"config folder: {cfg.cfg_path}")
    if not d.training:
        print("dataset.training is empty: list speaker folders ({group}/{speaker}/ holding {id}.qnt.pt and "
              "{id}.phn.txt) in the YAML, e.g. training: [data/mygroup/alice]")
        return
    todo: list[str] = []
    for split in ("training", "validation"):
        dirs = [resolve_dir(x, cfg.cfg_path) for x in getattr(d, split)]
        if not dirs:
            if split == "validation":
                print(f"validation: none listed; {d.validation_fraction:.0%} of each speaker's training "
                      "utterances are held out automatically")
            continue
        missing = [x for x in dirs if not x.is_dir()]
        with_meta = sum((x / METADATA_NAME).is_file() for x in dirs)
        print(f"{split}: {len(dirs)} speaker folders, {len(missing)} missing, {with_meta} with {METADATA_NAME}")
        for x in missing[:5]:
            print(f"  missing: {x}")
        if with_meta < len(dirs) - len(missing):
            todo.append(f"python -m vall_e.data {yaml_hint} --action metadata   # count frames once, cache them")
    print(f"symbol map: {cfg.symmap_path} ({'present' if Path(cfg.symmap_path).is_file() else 'not written yet'})")
    h5 = Path(cfg.hdf5_path)
    if h5.is_file():
        try:
            f = h5fmt.open_hdf5(h5)
        except UserError as e:
            print(f"hdf5: {e}")
            todo.append(f"python -m vall_e.data {yaml_hint} --action hdf5")
        else:
            with f:
                if int(f.attrs.get("version", 1)) >= 2:
                    from vall_e.data.index import open_splits

                    n = sum(len(sf) for split in ("training", "validation")
                            for sf in open_splits(h5, f, split, h5fmt.FORMAT))
                else:
                    n = sum(len(spk) for split in ("training", "validation") if split in f
                            for grp in f[split].values() for spk in grp.values())
            print(f"hdf5: {h5} ({n} utterances, {h5.stat().st_size / 2**20:.1f} MiB)"
                  f"{'' if d.use_hdf5 else '; not used (dataset.use_hdf5=false)'}")
    else:
        print(f"hdf5: {h5} not built{' but dataset.use_hdf5 is true' if d.use_hdf5 else ''}")
        todo.append(f"python -m vall_e.data {yaml_hint} --action hdf5   # then dataset.use_hdf5=true")
    todo.append(f"python -m vall_e.data {yaml_hint} --action sample   # check the batches")
    print("next:")
    for t in todo:
        print(f"  {t}")


def _metadata(cfg: Any) -> None:
    for split in ("training", "validation"):
        if not getattr(cfg.dataset, split):
            continue
        every = list_split(cfg, split, validate=False, min_utterances=0)
        kept = list_split(cfg, split) if split == "training" else every
        hours = sum(u.duration for u in every) / 3600
        print(f"{split}: {len(every)} utterances ({hours:.2f} h) in {len({u.speaker for u in every})} speakers; "
              f"{len(kept)} pass the filters and min_utterances")


def _symmap(cfg: Any) -> None:
    every = {u.key: u for s in ("training", "validation")
             for u in list_split(cfg, s, validate=False, min_utterances=0)}
    if not every:
        raise UserError("no utterances found in dataset.training / dataset.validation")
    symmap = load_symmap(cfg, [every[k] for k in sorted(every)])
    symmap.save(cfg.symmap_path)
    print(f"wrote {cfg.symmap_path}: {len(symmap)} symbols (stress={symmap.stress}) from {len(every)} utterances")


def _describe(batch: dict[str, Any]) -> str:
    rows = [f"  batch of {len(batch['resps'])} (padded size {batch_frames(batch)}), lang {batch['lang'].tolist()}"]
    for t, p, r, s in zip(batch["text"], batch["prompt"], batch["resps"], batch["speaker"]):
        rows.append(f"    {s}: text {list(t.shape)} prompt {list(p.shape)} resps {list(r.shape)}")
    return "\n".join(rows)


def _sample(cfg: Any) -> None:
    train = VALLEDataset(cfg, "train")
    val = VALLEDataset(cfg, "val", symmap=train.symmap, languages=train.languages)
    print(f"symbols: {len(train.symmap)}, languages: {train.languages.to_dict()}")
    for ds in (train, val):
        print(ds.summary())
        if len(ds) == 0:
            print("  (empty)")
            continue
        loader = make_dataloader(ds, cfg, ds.split)
        print(f"  {len(loader)} batches per epoch")
        for i, batch in enumerate(loader):
            print(_describe(batch))
            if i == 1:
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vall_e.data",
                                     description="Prepare and inspect datasets (pass yaml=CONFIG and key=value overrides).")
    parser.add_argument("--action", choices=ACTIONS, default="summary",
                        help="summary (default) | metadata | hdf5 | symmap | sample")
    parser.add_argument("--shards", type=int, default=1, help="hdf5: number of shard files (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="hdf5: processes writing shards (default 1)")
    parser.add_argument("--format-version", type=int, default=h5fmt.VERSION, choices=(1, h5fmt.VERSION),
                        help=f"hdf5: dataset format version (default {h5fmt.VERSION})")
    parser.add_argument("--yaml", default=None, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_config(argv, parser)
    yaml_hint = next((a for a in argv if a.startswith("yaml=")), "yaml=CONFIG")
    if args.action == "summary":
        _summary(cfg, yaml_hint)
    elif args.action == "metadata":
        _metadata(cfg)
    elif args.action == "hdf5":
        path = build_hdf5(cfg, shards=args.shards, workers=args.workers, version=args.format_version)
        size = sum(p.stat().st_size for p in [path, *path.parent.glob(f"{path.stem}.shard-*-of-*{path.suffix}")])
        print(f"wrote {path}" + (f" and {args.shards} shards" if args.shards > 1 else "") + f" ({size / 2**20:.1f} MiB)")
    elif args.action == "symmap":
        _symmap(cfg)
    elif args.action == "sample":
        _sample(cfg)
    return 0


if __name__ == "__main__":
    run_main(main)
