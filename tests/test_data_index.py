"""Dataset format version 2 (the columnar, memory-mapped index): round trip, equality with the folder and
version-1 readers, shards, rank partition and exact resumption on the index arrays."""
from __future__ import annotations

import random
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.test_data import cfg_of, make_corpus
from vall_e.data import hdf5 as h5fmt
from vall_e.data.__main__ import main as data_main
from vall_e.data.collate import make_dataloader, make_sampler
from vall_e.data.dataset import VALLEDataset
from vall_e.data.index import open_splits
from vall_e.emb.codes import read_codes
from vall_e.text.symmap import read_phonemes
from vall_e.utils.errors import UserError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("idx"), per_speaker=7)


def _build(y: Path, out: str, **kw) -> Path:
    return h5fmt.build_hdf5(cfg_of(y, **{"dataset.hdf5_name": out}), progress=False, **kw)


def _items(ds: VALLEDataset, cfg, epochs: int = 2) -> list[tuple]:
    """Every item of `epochs` epochs through the DataLoader (fixed seed), as comparable tuples."""
    loader = make_dataloader(ds, cfg, "train")
    out = []
    for _ in range(epochs):
        for batch in loader:
            for i in range(len(batch["key"])):
                out.append((batch["key"][i], batch["speaker"][i], int(batch["lang"][i]), batch["epoch"],
                            batch["position"], batch["text"][i].tolist(), batch["prompt"][i].tolist(),
                            batch["resps"][i].tolist()))
    return out


def test_index_round_trips_the_corpus_exactly(corpus: Path) -> None:
    path = _build(corpus, "rt.h5")
    cfg = cfg_of(corpus)
    symmap = VALLEDataset(cfg, "train").symmap
    with h5fmt.open_hdf5(path) as f:
        assert int(f.attrs["version"]) == 2 and h5fmt.read_symmap(f) == symmap
        (sf,) = open_splits(path, f, "training", h5fmt.FORMAT)
    assert sf.folder_names == ["grpA/alice", "grpA/bob", "grpB/carol"] and len(sf) == 21
    for j, name in enumerate(sf.folder_names):
        for row in range(int(sf.folder_start[j]), int(sf.folder_start[j + 1])):
            uid = sf.uid(row)
            src = corpus.parent / name / uid
            codes = read_codes(Path(f"{src}.qnt.pt"))[0].numpy()
            assert np.array_equal(sf.codes(row), codes) and sf.col("frames")[row] == codes.shape[0]
            ids = symmap.encode(read_phonemes(Path(f"{src}.phn.txt")))
            assert sf.text(row).tolist() == ids and sf.col("phones")[row] == len(ids)
    # the big arrays are contiguous and unfiltered: what makes memory mapping possible
    with h5py.File(path) as f:
        assert f["training/codes"].chunks is None and f["training/codes"].compression is None


def test_index_equals_folder_and_v1_sample_for_sample(corpus: Path) -> None:
    _build(corpus, "v1.h5", version=1)
    _build(corpus, "v2.h5")
    _build(corpus, "v2s.h5", shards=3)
    over = {"hyperparameters.frames_per_batch": "2400", "dataset.prompt_duration": "2.0", "dataset.sample_type": "path"}
    runs = {}
    for name, extra in (("folder", {}), ("v1", {"dataset.use_hdf5": "true", "dataset.hdf5_name": "v1.h5"}),
                        ("v2", {"dataset.use_hdf5": "true", "dataset.hdf5_name": "v2.h5"}),
                        ("v2 sharded", {"dataset.use_hdf5": "true", "dataset.hdf5_name": "v2s.h5"})):
        cfg = cfg_of(corpus, **over, **extra)
        ds = VALLEDataset(cfg, "train")
        assert ds.format_version == {"folder": 0, "v1": 1}.get(name, 2)
        runs[name] = (_items(ds, cfg), [u.key for u in VALLEDataset(cfg, "val").utterances])
    assert len(runs["folder"][0]) > 20 and runs["folder"][1]
    for name in ("v1", "v2", "v2 sharded"):
        assert runs[name] == runs["folder"], name


def test_sharded_build_spreads_whole_folders(corpus: Path) -> None:
    path = _build(corpus, "sh.h5", shards=2)
    shards = sorted(corpus.parent.glob("sh.shard-*-of-00002.h5"))
    assert len(shards) == 2
    with h5fmt.open_hdf5(path) as f:
        parts = open_splits(path, f, "training", h5fmt.FORMAT)
    names = [n for p in parts for n in p.folder_names]
    assert sorted(names) == ["grpA/alice", "grpA/bob", "grpB/carol"] and len(parts) == 2
    shards[0].unlink()
    with pytest.raises(UserError, match="shard"):
        VALLEDataset(cfg_of(corpus, **{"dataset.use_hdf5": "true", "dataset.hdf5_name": "sh.h5"}), "train")


def test_cli_builds_shards_in_parallel(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    y = f"yaml={corpus}"
    assert data_main([y, "--action", "hdf5", "--shards", "2", "--workers", "2", "dataset.hdf5_name=cli.h5"]) == 0
    assert "2 shards" in capsys.readouterr().out
    cfg = cfg_of(corpus, **{"dataset.use_hdf5": "true", "dataset.hdf5_name": "cli.h5"})
    ds = VALLEDataset(cfg, "train")
    ref = VALLEDataset(cfg_of(corpus), "train")
    assert [u.key for u in ds.utterances] == [u.key for u in ref.utterances]
    assert torch.equal(ds[3]["resps"], ref[3]["resps"])
    assert data_main([y, "dataset.hdf5_name=cli.h5"]) == 0
    assert f"({len(ref) + len(VALLEDataset(cfg_of(corpus), 'val'))} utterances" in capsys.readouterr().out


@pytest.mark.parametrize("sample_type", ["path", "speaker"])
def test_two_ranks_partition_the_epoch(corpus: Path, sample_type: str) -> None:
    _build(corpus, "ranks.h5", shards=2)
    cfg = cfg_of(corpus, **{"dataset.use_hdf5": "true", "dataset.hdf5_name": "ranks.h5", "dataset.sample_type":
                            sample_type, "hyperparameters.batch_size": "2", "hyperparameters.frames_per_batch": "0"})
    ds = VALLEDataset(cfg, "train")
    for epoch in range(3):
        per_rank = []
        for rank in range(2):
            s = make_sampler(ds, cfg, "train", rank=rank, world_size=2)
            s.drop_last = False  # training drops a last uneven batch; here every item must show up
            per_rank.append([i for b in s.rank_batches(epoch) for i in b])
        want = sorted(ds.epoch_items(epoch).tolist())
        n_batches = -(-len(want) // 2)
        if n_batches % 2 == 0:  # no padding batch: exactly once between them
            assert sorted(per_rank[0] + per_rank[1]) == want
            assert not set(per_rank[0]) & set(per_rank[1])
        else:  # one padded batch repeats the start
            assert set(per_rank[0]) | set(per_rank[1]) == set(want)
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= 2


def test_resume_mid_epoch_continues_exactly(corpus: Path) -> None:
    cfg = cfg_of(corpus, **{"dataset.use_hdf5": "true", "dataset.hdf5_name": "v2.h5", "dataset.sample_type": "path",
                            "hyperparameters.frames_per_batch": "2400"})
    _build(corpus, "v2.h5")
    ds = VALLEDataset(cfg, "train")
    ref = [b for b in _keys(make_dataloader(ds, cfg, "train"), 2)]
    assert len(ref) > 6
    for stop in (1, len(ref) // 2 - 1, len(ref) // 2 + 1):
        loader = make_dataloader(ds, cfg, "train")
        got, last = [], None
        for batch in loader:
            got.append((batch["epoch"], batch["key"]))
            last = batch
            if len(got) == stop:
                break
        state = loader.batch_sampler.state_dict(last)
        fresh = make_dataloader(VALLEDataset(cfg, "train"), cfg, "train")
        fresh.batch_sampler.load_state_dict(state)
        got += _keys(fresh, 2, until=len(ref) - len(got))
        assert got == ref, stop


def _keys(loader, epochs: int, until: int | None = None) -> list:
    out = []
    for _ in range(epochs):
        for batch in loader:
            out.append((batch["epoch"], batch["key"]))
            if until is not None and len(out) == until:
                return out
    return out


def test_damaged_index_is_a_one_line_error(corpus: Path, tmp_path: Path) -> None:
    path = _build(corpus, "bad.h5")
    good = path.read_bytes()
    cfg = cfg_of(corpus, **{"dataset.use_hdf5": "true", "dataset.hdf5_name": "bad.h5",
                            "dataset.validation_fraction": "0"})
    rng = random.Random(0)
    for edit in ("codes_values", "offsets", "text_values", "drop_column"):
        path.write_bytes(good)
        with h5py.File(path, "r+") as f:
            g = f["training"]
            if edit == "codes_values":
                g["codes"][5] = 3000 + rng.randint(0, 100)
            elif edit == "offsets":
                g["code_offsets"][4] = 10**9
            elif edit == "text_values":
                g["text"][3] = 30000
            else:
                del g["hash"]
        with pytest.raises(UserError) as e:
            ds = VALLEDataset(cfg, "train")
            for i in range(len(ds)):
                ds[i]
        assert "\n" not in str(e.value) and "bad.h5" in str(e.value), edit
    path.write_bytes(good)
