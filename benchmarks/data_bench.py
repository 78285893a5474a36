#!/usr/bin/env python
"""The `data` benchmark: a synthetic dataset index at the paper's scale, opened the way a training rank does.

    python benchmarks/data_bench.py generate DIR --utterances 1000000 [--sparse-codes]
    python benchmarks/data_bench.py measure DIR --what open|read|state [--rank 0 --world-size 2]

`generate` writes a format-version-2 `data.h5` straight from numpy (random codes and phonemes,
1000 utterances per speaker folder, 100 folders per group, 1-10 s each) plus the YAML naming every
folder; `--sparse-codes` allocates the code and text arrays without writing them (the file is
sparse: the 10M case would otherwise need ~66 GB). `measure` runs one measurement and prints one
JSON line; `bench_sections.data` starts a fresh process per measurement, so its peak RSS
(`getrusage` maxrss) is that rank's alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

PER_SPEAKER, PER_GROUP, LEVELS, N_CODES = 1000, 100, 8, 1024


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(out: Path, n: int, sparse: bool, seed: int = 0) -> dict[str, Any]:
    """The synthetic corpus, vectorised: O(folders) Python, everything per utterance in numpy."""
    import h5py
    import numpy as np

    from vall_e.data import hdf5 as h5fmt
    from vall_e.data import index as idx
    from vall_e.text.languages import LanguageMap
    from vall_e.text.symmap import Symmap
    from vall_e.utils.io import atomic_path

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    n_folders = -(-n // PER_SPEAKER)
    counts = np.full(n_folders, PER_SPEAKER, dtype=np.int64)
    counts[-1] = n - PER_SPEAKER * (n_folders - 1)
    names = [f"g{f // PER_GROUP:04d}/s{f:06d}" for f in range(n_folders)]  # fixed width: already in key order
    frames = rng.integers(75, 751, n, dtype=np.int32)
    phones = rng.integers(12, 160, n, dtype=np.int32)
    local = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    digits = (local[:, None] // 10 ** np.arange(5, -1, -1)) % 10 + ord("0")
    ids = np.concatenate([np.full((n, 1), ord("u")), digits], axis=1).astype(np.uint8).view("S7").reshape(n)
    symbols = [f"p{i}" for i in range(60)]
    symmap = Symmap.build([symbols])
    path = out / "data.h5"
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["complete"] = False
            ds = idx.create_split(f, "training", names, counts, ids, frames, phones,
                                  rng.integers(0, 2**63, n, dtype=np.uint64), LEVELS)
            written = 0
            if not sparse:
                total = int(ds["code_offsets"][-1])
                block = 1 << 22  # frames per write (64 MiB)
                for a in range(0, total, block):
                    b = min(total, a + block)
                    ds["codes"][a:b] = rng.integers(0, N_CODES, (b - a, LEVELS), dtype=np.int16)
                    written += (b - a) * LEVELS * 2
                t = rng.integers(4, len(symmap), int(ds["text_offsets"][-1]), dtype=np.int16)
                starts = ds["text_offsets"][:-1]
                t[starts] = 1  # <s>
                t[ds["text_offsets"][1:] - 1] = 2  # </s>
                ds["text"][:] = t
                written += t.nbytes
                del t
            langs = LanguageMap()
            langs.add("en")
            spec = {"name": "synthetic", "frame_rate": 75.0, "n_levels": LEVELS, "n_codes": N_CODES}
            idx.write_root(f, h5fmt.FORMAT, symmap_json=symmap.to_json(), languages_json=langs.to_json(),
                           codec_json=json.dumps(spec))
            f.attrs["complete"] = True
    build_s = time.perf_counter() - t0
    (out / "config.yaml").write_text(
        "dataset:\n  use_hdf5: true\n  training:\n" + "".join(f"  - {nm}\n" for nm in names)
        + "model:\n  n_levels: 8\n", encoding="utf-8")
    return {"utterances": n, "speakers": n_folders, "groups": -(-n_folders // PER_GROUP), "build_s": build_s,
            "codes_written": not sparse, "bytes_written": written, "file_bytes_apparent": path.stat().st_size,
            "file_bytes_on_disk": path.stat().st_blocks * 512, "hours": float(frames.sum()) / 75 / 3600}


def _open(d: Path, rank: int, world: int, sample_type: str, frames_per_batch: int) -> tuple[Any, ...]:
    from vall_e.config import load_config
    from vall_e.data.collate import make_sampler
    from vall_e.data.dataset import VALLEDataset

    cfg = load_config(d / "config.yaml", {"dataset.sample_type": sample_type,
                                          "hyperparameters.frames_per_batch": str(frames_per_batch)})
    t0, c0 = time.perf_counter(), time.process_time()
    ds = VALLEDataset(cfg, "train")
    t1, c1 = time.perf_counter(), time.process_time()
    sampler = make_sampler(ds, cfg, "train", rank=rank, world_size=world)
    n_batches = len(sampler)  # plans the first epoch
    t2, c2 = time.perf_counter(), time.process_time()
    # cpu_s: this process's CPU time, the honest figure when other jobs load the machine (wall >> cpu)
    return cfg, ds, sampler, {"open_index_s": t1 - t0, "sampler_epoch_s": t2 - t1, "total_s": t2 - t0,
                              "open_index_cpu_s": c1 - c0, "sampler_epoch_cpu_s": c2 - c1, "total_cpu_s": c2 - c0,
                              "utterances": len(ds), "rank_batches": n_batches}


def measure(d: Path, what: str, rank: int, world: int, sample_type: str, frames_per_batch: int,
            batches: int) -> dict[str, Any]:
    import vall_e.data.collate  # noqa: F401 - imports (torch, h5py) are not the index's cost

    base = _maxrss_mb()
    cfg, ds, sampler, res = _open(d, rank, world, sample_type, frames_per_batch)
    res.update(rank=rank, world_size=world, sample_type=sample_type, frames_per_batch=frames_per_batch,
               rss_after_imports_mb=base, peak_rss_mb=_maxrss_mb())
    if what == "read":
        from vall_e.data.collate import collate

        fd = os.open(d / "data.h5", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold page cache for this file
        os.close(fd)
        it = iter(sampler)
        t0, c0 = time.perf_counter(), time.process_time()
        items = frames = 0
        for _ in range(batches):
            batch = collate([ds[k] for k in next(it)])
            items += len(batch["resps"])
            frames += int(batch["frames"].sum())
        dt = time.perf_counter() - t0
        res.update(batches=batches, read_s=dt, read_cpu_s=time.process_time() - c0, batches_per_s=batches / dt, items_per_s=items / dt,
                   mean_batch_items=items / batches, frames_per_s=frames / dt, peak_rss_mb=_maxrss_mb())
    elif what == "state":
        it = iter(sampler)
        for _ in range(min(10, len(sampler) - 1)):
            next(it)
        t0 = time.perf_counter()
        state = sampler.state_dict()
        blob = json.dumps(state)
        t1 = time.perf_counter()
        from vall_e.data.collate import make_sampler

        fresh = make_sampler(ds, cfg, "train", rank=rank, world_size=world)
        fresh.load_state_dict(json.loads(blob))
        got = next(iter(fresh))
        t2 = time.perf_counter()
        want = next(it)
        res.update(state=state, state_bytes=len(blob), save_s=t1 - t0, restore_to_first_batch_s=t2 - t1,
                   resumes_exactly=[k.index for k in got] == [k.index for k in want])
    if sample_type != "path":
        res["epoch_items_s"] = _timed(lambda: ds.epoch_items(1))
    return res


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/data_bench.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("dir", type=Path)
    g.add_argument("--utterances", type=int, default=1_000_000)
    g.add_argument("--sparse-codes", action="store_true")
    m = sub.add_parser("measure")
    m.add_argument("dir", type=Path)
    m.add_argument("--what", choices=("open", "read", "state"), default="open")
    m.add_argument("--rank", type=int, default=0)
    m.add_argument("--world-size", type=int, default=1)
    m.add_argument("--sample-type", default="path")
    m.add_argument("--frames-per-batch", type=int, default=0)
    m.add_argument("--batches", type=int, default=50)
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        out = generate(a.dir, a.utterances, a.sparse_codes)
    else:
        out = measure(a.dir, a.what, a.rank, a.world_size, a.sample_type, a.frames_per_batch, a.batches)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
