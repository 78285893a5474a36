"""Why the dataset index (format version 2) is HDF5 columns read as numpy: the same index in three formats.

    pip install pyarrow            # only for this comparison; the project does not need it
    python benchmarks/data_formats.py [--utterances 10000000] [--out benchmarks/data_formats.json]

The index columns of `vall_e.data.index` (ids as 24-byte strings, frames and phones int32, the
held-out hash uint64, code and text offsets int64) for N utterances are written as

* `hdf5`: contiguous, uncompressed h5py datasets (what `data.h5` version 2 holds), read with
  `np.fromfile` at each dataset's offset (what `vall_e.data.index` does);
* `arrow_ipc`: an uncompressed Arrow IPC (Feather v2) file, memory-mapped, columns to numpy;
* `parquet`: a Parquet file (pyarrow's default snappy compression), read whole, columns to numpy.

Each read runs in a fresh process (peak RSS is its own) and takes what opening a split needs: every
column as a numpy array. The formats take turns, best of `--repeats`. Writes JSON atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COLUMNS = ("ids", "frames", "phones", "hash", "code_offsets", "text_offsets")


def make_columns(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    frames = rng.integers(75, 750, n, dtype=np.int32)
    phones = (frames // 5).astype(np.int32)
    return {"ids": np.char.add(b"utt-", np.arange(n).astype("S20")).astype("S24"), "frames": frames,
            "phones": phones, "hash": rng.integers(0, 2**63, n, dtype=np.uint64),
            "code_offsets": np.cumsum(frames, dtype=np.int64) - frames,  # each utterance's start
            "text_offsets": np.cumsum(phones, dtype=np.int64) - phones}


def write(fmt: str, path: Path, cols: dict[str, np.ndarray]) -> float:
    t = time.perf_counter()
    if fmt == "hdf5":
        import h5py
        with h5py.File(path, "w") as f:
            for k, v in cols.items():
                f.create_dataset(k, data=v)
    else:
        import pyarrow as pa
        table = pa.table(dict(cols))
        if fmt == "arrow_ipc":
            import pyarrow.feather as feather
            feather.write_feather(table, path, compression="uncompressed")
        else:
            import pyarrow.parquet as pq
            pq.write_table(table, path)
    return time.perf_counter() - t


def vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM; unlike getrusage's maxrss it starts afresh at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read(fmt: str, path: str) -> dict[str, float]:
    """In a fresh process: every column as numpy; seconds, CPU seconds and peak RSS (MB)."""
    t, c = time.perf_counter(), time.process_time()
    rss0 = vm_hwm_mb()
    if fmt == "hdf5":
        import h5py
        out = {}
        with h5py.File(path, "r") as f:
            for k in COLUMNS:
                d = f[k]
                out[k] = np.fromfile(path, dtype=d.dtype, count=d.size, offset=d.id.get_offset())
    elif fmt == "arrow_ipc":
        import pyarrow as pa
        with pa.memory_map(path) as source:
            table = pa.ipc.open_file(source).read_all()
            out = {k: table.column(k).to_numpy() for k in COLUMNS}
    else:
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        out = {k: table.column(k).to_numpy() for k in COLUMNS}
    checksum = int(out["frames"].sum()) + int(out["code_offsets"][-1])
    return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c,
            "peak_rss_mb": vm_hwm_mb(),
            "rss_before_mb": rss0, "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--utterances", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the files are written (deleted afterwards)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "data_formats.json"))
    ap.add_argument("--read", nargs=2, help=argparse.SUPPRESS)  # internal: FORMAT PATH in a fresh process
    args = ap.parse_args()
    if args.read:
        print(json.dumps(read(*args.read)))
        return
    from vall_e.utils.io import atomic_write_text

    formats = ["hdf5"]
    try:
        import pyarrow  # noqa: F401
        formats += ["arrow_ipc", "parquet"]
    except ImportError:
        print("pyarrow is not installed: only hdf5 is measured (pip install pyarrow)", file=sys.stderr)
    cols = make_columns(args.utterances)
    result = {"utterances": args.utterances, "load_average_start": os.getloadavg()[0], "formats": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        paths = {}
        for fmt in formats:
            paths[fmt] = Path(tmp) / f"index.{fmt}"
            result["formats"][fmt] = {"write_s": write(fmt, paths[fmt], cols),
                                      "file_mb": paths[fmt].stat().st_size / 2**20, "reads": []}
        del cols
        for _ in range(args.repeats):
            for fmt in formats:  # the formats take turns
                r = subprocess.run([sys.executable, __file__, "--read", fmt, str(paths[fmt])], check=True,
                                   capture_output=True, text=True)
                result["formats"][fmt]["reads"].append(json.loads(r.stdout))
    checks = {r["checksum"] for f in result["formats"].values() for r in f["reads"]}
    assert len(checks) == 1, "the formats read different data"
    for fmt, f in result["formats"].items():
        best = min(f["reads"], key=lambda r: r["seconds"])
        f["best"] = {k: best[k] for k in ("seconds", "cpu_seconds", "peak_rss_mb", "rss_before_mb")}
    result["load_average_end"] = os.getloadavg()[0]
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"{args.utterances} utterances: read every index column as numpy, fresh process, best of {args.repeats}")
    for fmt, f in result["formats"].items():
        b = f["best"]
        print(f"{fmt:10} {b['seconds']:6.2f} s ({b['cpu_seconds']:.2f} s CPU)  peak RSS {b['peak_rss_mb']:6.0f} MB "
              f"(before reading {b['rss_before_mb']:.0f})  file {f['file_mb']:.0f} MB  write {f['write_s']:.1f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
