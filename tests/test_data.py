"""Datasets: listing and filters, metadata cache, HDF5 build/read, prompts, items, CLI."""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vall_e.config import load_config
from vall_e.data import hdf5 as h5fmt
from vall_e.data import listing
from vall_e.data.collate import batch_frames, collate, make_dataloader
from vall_e.data.dataset import VALLEDataset, held_out
from vall_e.data.prompts import max_prompt_length, sample_prompt, trim, trim_or_repeat
from vall_e.emb.codes import save_codes
from vall_e.text.symmap import read_phonemes
from vall_e.utils.errors import UserError

torch.set_num_threads(1)

PHONES = "a b d e f g h i k l m n o p s t u ə ʃ ˈa".split()
SPEC = {"name": "test", "frame_rate": 75.0, "n_levels": 8, "n_codes": 1024}
GROUPS = {"grpA": ["alice", "bob"], "grpB": ["carol"]}


def write_utt(d: Path, uid: str, frames: int, tag: int, rng: random.Random, n_phones: int | None = None) -> None:
    """Codes whose level 0 is `tag` everywhere (to recognise the utterance inside prompts)."""
    codes = torch.randint(0, 1024, (frames, 8), generator=torch.Generator().manual_seed(tag))
    codes[:, 0] = tag
    save_codes(d / f"{uid}.qnt.pt", codes, SPEC)
    n = n_phones or rng.randint(6, 40)
    toks = [rng.choice(PHONES) for _ in range(n)]
    (d / f"{uid}.phn.txt").write_text(" ".join(t if i % 5 else "|" for i, t in enumerate(toks)) if n > 5
                                      else " ".join(toks), encoding="utf-8")


def make_corpus(root: Path, per_speaker: int = 6, seed: int = 0, extra_yaml: str = "") -> Path:
    """grpA/{alice,bob}, grpB/carol; durations spread 1 s .. 10 s (75 .. 750 frames). Returns the YAML."""
    rng = random.Random(seed)
    tag = 1
    dirs = []
    for g, spks in GROUPS.items():
        for s in spks:
            d = root / g / s
            d.mkdir(parents=True)
            dirs.append(f"{g}/{s}")
            for u in range(per_speaker):
                frames = 75 + (675 * u) // max(1, per_speaker - 1)  # 1 s .. 10 s
                write_utt(d, f"utt{u}", frames, tag, rng)
                tag += 1
    y = root / "config.yaml"
    y.write_text("dataset:\n"
                 f"  training: [{', '.join(dirs)}]\n"
                 "  speaker_languages: {de: [grpB]}\n"
                 "  validation_fraction: 0.2\n"
                 "  duration_range: [0.5, 20.0]\n"
                 "model:\n  n_levels: 8\n" + extra_yaml)
    return y


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path)


def cfg_of(yaml_path: Path, **overrides: str):
    return load_config(yaml_path, {k: str(v) for k, v in overrides.items()})


# ----------------------------------------------------------------------------------------------
# listing, filters, metadata
# ----------------------------------------------------------------------------------------------

def test_listing_finds_pairs_and_names_speakers(corpus: Path) -> None:
    d = corpus.parent / "grpA" / "alice"
    (d / "orphan.qnt.pt").write_bytes((d / "utt0.qnt.pt").read_bytes())  # no .phn.txt
    (d / "lonely.phn.txt").write_text("a b")                                # no .qnt.pt
    utts = listing.list_split(cfg_of(corpus), "training", validate=False)
    assert len(utts) == 18
    assert {u.speaker for u in utts} == {"grpA_alice", "grpA_bob", "grpB_carol"}
    assert {u.language for u in utts if u.group == "grpB"} == {"de"}
    assert {u.language for u in utts if u.group == "grpA"} == {"en"}
    assert not any(u.id in ("orphan", "lonely") for u in utts)
    u = next(x for x in utts if x.speaker == "grpA_alice" and x.id == "utt0")
    assert u.frames == 75 and u.duration == pytest.approx(1.0) and u.levels == 8
    assert u.phones == len(read_phonemes(u.phn_path)) + 2
    assert u.key == "training/grpA/alice/utt0"


def test_filters_and_min_utterances(corpus: Path) -> None:
    all_ = listing.list_split(cfg_of(corpus), "training", validate=False)
    cfg = cfg_of(corpus, **{"dataset.duration_range": "[2.0, 6.0]"})
    kept = listing.list_split(cfg, "training")
    assert kept and all(2.0 <= u.duration <= 6.0 for u in kept)
    assert len(kept) == sum(2.0 <= u.duration <= 6.0 for u in all_)
    # validate=false turns the filters off
    assert len(listing.list_split(cfg_of(corpus, **{"dataset.duration_range": "[2.0, 6.0]", "dataset.validate": "false"}),
                                  "training")) == 18
    # phones filter
    lo = sorted(u.phones for u in all_)[len(all_) // 2]
    kept = listing.list_split(cfg_of(corpus, **{"dataset.phones_range": f"[0, {lo}]"}), "training")
    assert kept and all(u.phones <= lo for u in kept) and len(kept) < 18
    # min_utterances drops whole speakers
    kept = listing.list_split(cfg_of(corpus, **{"dataset.duration_range": "[9.0, 20.0]",
                                                "dataset.min_utterances": "2"}), "training")
    assert kept == []  # each speaker has one utterance of >= 9 s
    kept = listing.list_split(cfg_of(corpus, **{"dataset.duration_range": "[9.0, 20.0]",
                                                "dataset.min_utterances": "1"}), "training")
    assert len(kept) == 3


def test_metadata_is_cached_and_refreshed(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_of(corpus)
    listing.list_split(cfg, "training")
    meta = corpus.parent / "grpA" / "alice" / "metadata.json"
    data = json.loads(meta.read_text())
    assert data["utterances"]["utt0"]["frames"] == 75
    calls: list[str] = []
    real = listing.measure_utterance
    monkeypatch.setattr(listing, "measure_utterance", lambda d, uid: calls.append(uid) or real(d, uid))
    again = listing.list_split(cfg, "training")
    assert calls == [] and len(again) == 18
    # a changed file is measured again, the others are not
    d = corpus.parent / "grpA" / "alice"
    save_codes(d / "utt1.qnt.pt", torch.zeros(300, 8, dtype=torch.long), SPEC)
    again = listing.list_split(cfg, "training")
    assert calls == ["utt1"]
    assert next(u for u in again if u.key == "training/grpA/alice/utt1").frames == 300
    assert json.loads(meta.read_text())["utterances"]["utt1"]["frames"] == 300
    # a rewrite clears the temporary file a run killed mid-write left behind (and nothing else)
    stale, other = d / ".metadata.json.ab12cd34.tmp.json", d / ".utt1.qnt.pt.ab12cd34.tmp.pt"
    stale.write_text("{")
    other.write_bytes(b"x")
    save_codes(d / "utt1.qnt.pt", torch.zeros(150, 8, dtype=torch.long), SPEC)
    listing.list_split(cfg, "training")
    assert not stale.exists() and other.exists()


def test_corrupt_codes_file_names_the_file(corpus: Path) -> None:
    bad = corpus.parent / "grpA" / "bob" / "utt2.qnt.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(UserError, match="utt2.qnt.pt"):
        listing.list_split(cfg_of(corpus), "training")
    with pytest.raises(UserError, match="utt2.qnt.pt"):
        VALLEDataset(cfg_of(corpus), "train")


def test_missing_speaker_folder_is_a_user_error(corpus: Path) -> None:
    cfg = cfg_of(corpus, **{"dataset.training": "[grpA/nobody]"})
    with pytest.raises(UserError, match="nobody"):
        VALLEDataset(cfg, "train")


# ----------------------------------------------------------------------------------------------
# HDF5
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [1, 2])
def test_hdf5_matches_folder_and_holds_symmap(corpus: Path, version: int) -> None:
    cfg = cfg_of(corpus)
    folder = VALLEDataset(cfg, "train")
    path = h5fmt.build_hdf5(cfg, progress=False, version=version)
    assert path == cfg.hdf5_path and path.is_file()
    with h5fmt.open_hdf5(path) as f:
        assert int(f.attrs["version"]) == version
        assert h5fmt.read_symmap(f) == folder.symmap
        assert h5fmt.read_languages(f).to_dict() == {"en": 0, "de": 1}
        assert h5fmt.read_codec_spec(f)["n_levels"] == 8
        if version == 1:
            g = f["training/grpA/alice/utt0"]
            assert g["audio"].dtype.name == "int16" and g["audio"].shape == (75, 8)
            assert g["text"].dtype.name == "int16"
            assert g.attrs["speaker"] == "grpA_alice" and g.attrs["group"] == "grpA" and g.attrs["language"] == "en"
            assert g.attrs["duration"] == pytest.approx(1.0)
            assert json.loads(g.attrs["phonemes"]) == read_phonemes(corpus.parent / "grpA/alice/utt0.phn.txt")
        else:
            assert f["training/codes"].dtype.name == "int16" and f["training/codes"].shape[1] == 8
            assert [n.decode() for n in f["training/folders/name"][()]] == ["grpA/alice", "grpA/bob", "grpB/carol"]
    h5 = VALLEDataset(cfg_of(corpus, **{"dataset.use_hdf5": "true"}), "train")
    assert h5.format_version == version
    assert [u.key for u in h5.utterances] == [u.key for u in folder.utterances]
    assert h5.costs.tolist() == folder.costs.tolist()
    assert h5.codec_spec == folder.codec_spec and folder.codec_spec["name"] == "test"
    assert folder.codec_spec["frame_rate"] == 75.0 and folder.codec_spec["n_levels"] == 8
    for i in range(len(folder)):
        a, b = folder[i], h5[i]
        for k in ("text", "prompt", "resps"):
            assert torch.equal(a[k], b[k]), (i, k)
        assert (a["lang"], a["speaker"], a["key"]) == (b["lang"], b["speaker"], b["key"])
    # a different symbol map re-encodes from the stored phonemes
    from vall_e.text.symmap import Symmap

    other = Symmap.build([["zz"]], stress=folder.symmap.stress)  # the same stress mode as the data
    other = Symmap.build([read_phonemes(u.phn_path) for u in folder.utterances], base=other)
    h5b = VALLEDataset(cfg_of(corpus, **{"dataset.use_hdf5": "true"}), "train", symmap=other)
    assert other.decode(h5b[0]["text"].tolist()) == folder.symmap.decode(folder[0]["text"].tolist())
    assert not torch.equal(h5b[0]["text"], folder[0]["text"])


def test_symmap_covers_all_data_and_matches_hdf5(corpus: Path) -> None:
    solo = corpus.parent / "grpB" / "solo"
    solo.mkdir()
    write_utt(solo, "one", 200, 77, random.Random(3))
    (solo / "one.phn.txt").write_text("ʒ a | b", encoding="utf-8")  # a symbol only this speaker has
    training = "[grpA/alice, grpA/bob, grpB/carol, grpB/solo]"
    cfg = cfg_of(corpus, **{"dataset.training": training})
    folder = VALLEDataset(cfg, "train")
    assert "grpB_solo" not in folder.speakers  # dropped by min_utterances ...
    assert "ʒ" in folder.symmap  # ... but its symbols are in the one map
    assert (corpus.parent / "symmap.json").is_file()
    h5fmt.build_hdf5(cfg, progress=False)
    with h5fmt.open_hdf5(cfg.hdf5_path) as f:
        assert h5fmt.read_symmap(f) == folder.symmap
    from vall_e.text.symmap import Symmap

    assert Symmap.load(corpus.parent / "symmap.json") == folder.symmap


def test_killed_hdf5_build_leaves_nothing_loadable(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_of(corpus)
    real = h5fmt.read_codes
    n = {"calls": 0}

    def dying(path, **kw):
        n["calls"] += 1
        if n["calls"] == 7:
            raise KeyboardInterrupt  # a kill mid-build
        return real(path, **kw)

    monkeypatch.setattr(h5fmt, "read_codes", dying)
    with pytest.raises(KeyboardInterrupt):
        h5fmt.build_hdf5(cfg, progress=False)
    assert not cfg.hdf5_path.exists()
    assert list(corpus.parent.glob(".data.h5*")) == []
    with pytest.raises(UserError, match="not found"):
        VALLEDataset(cfg_of(corpus, **{"dataset.use_hdf5": "true"}), "train")
    # a previous complete file survives a failed rebuild untouched
    monkeypatch.setattr(h5fmt, "read_codes", real)
    h5fmt.build_hdf5(cfg, progress=False)
    before = cfg.hdf5_path.read_bytes()
    n["calls"] = 0
    monkeypatch.setattr(h5fmt, "read_codes", dying)
    with pytest.raises(KeyboardInterrupt):
        h5fmt.build_hdf5(cfg, progress=False)
    assert cfg.hdf5_path.read_bytes() == before


def test_incomplete_or_foreign_hdf5_is_refused(corpus: Path) -> None:
    import h5py

    cfg = cfg_of(corpus, **{"dataset.use_hdf5": "true"})
    with h5py.File(cfg.hdf5_path, "w") as f:  # what a SIGKILLed in-place writer would leave
        f.attrs["format"] = h5fmt.FORMAT
        f.attrs["complete"] = False
        f.create_group("training/grpA/alice/utt0")
    with pytest.raises(UserError, match="not a complete vall_e dataset"):
        VALLEDataset(cfg, "train")
    cfg.hdf5_path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # truncated header
    with pytest.raises(UserError, match="data.h5"):
        VALLEDataset(cfg, "train")


def test_hdf5_lacking_a_configured_folder_says_rebuild(corpus: Path) -> None:
    cfg = cfg_of(corpus)
    h5fmt.build_hdf5(cfg, progress=False)
    extra = corpus.parent / "grpB" / "dave"
    extra.mkdir()
    write_utt(extra, "u0", 100, 99, random.Random(1))
    write_utt(extra, "u1", 100, 98, random.Random(2))
    training = "[grpA/alice, grpB/dave]"
    with pytest.raises(UserError, match="rebuild"):
        VALLEDataset(cfg_of(corpus, **{"dataset.use_hdf5": "true", "dataset.training": training}), "train")


# ----------------------------------------------------------------------------------------------
# items, splits, prompts
# ----------------------------------------------------------------------------------------------

def test_items_shapes_and_dtypes(corpus: Path) -> None:
    ds = VALLEDataset(cfg_of(corpus), "train")
    for i in range(len(ds)):
        it = ds[i]
        u = ds.utterances[i]
        assert it["text"].dtype == torch.long and it["text"].dim() == 1
        assert it["text"][0] == 1 and it["text"][-1] == 2 and len(it["text"]) == u.phones
        assert (it["text"] != 0).all()
        boundary = (it["text"] == 3).nonzero().flatten()
        assert not ((boundary[1:] - boundary[:-1]) == 1).any()  # one token per word boundary
        assert it["resps"].dtype == torch.long and it["resps"].shape == (u.frames, 8)
        assert it["prompt"].dtype == torch.long and it["prompt"].dim() == 2 and it["prompt"].shape[1] == 8
        assert it["lang"] == (1 if u.group == "grpB" else 0)
        assert it["frames"] == u.frames and it["speaker"] == u.speaker
        assert it["text"].shape[0] + it["prompt"].shape[0] + it["resps"].shape[0] <= int(ds.costs[i])
    assert torch.equal(ds[3]["prompt"], ds[3]["prompt"])  # an index alone is deterministic
    # n_levels cuts the levels
    ds4 = VALLEDataset(cfg_of(corpus, **{"model.n_levels": "4"}), "train")
    assert ds4[0]["resps"].shape[1] == 4 and ds4[0]["prompt"].shape[1] == 4
    with pytest.raises(UserError, match="n_levels"):
        VALLEDataset(cfg_of(corpus, **{"model.n_levels": "12"}), "train")


def test_prompts_come_from_other_utterances_with_right_length(corpus: Path) -> None:
    ds = VALLEDataset(cfg_of(corpus, **{"dataset.prompt_duration": "3.0"}), "train")
    lo, hi = 150, max_prompt_length(3.0, 75.0)
    assert hi == 300
    seen_lengths = set()
    for i in range(len(ds)):
        own_tag = int(ds[i]["resps"][0, 0])
        for epoch in range(3):
            from vall_e.data.sampler import ItemKey, item_seed

            it = ds[ItemKey(i, item_seed(0, epoch, i), epoch, 0)]
            tags = set(it["prompt"][:, 0].tolist())
            assert own_tag not in tags
            spk_tags = {int(ds.codes(ds.pool[j])[0, 0]) for j in ds.speaker_pool[ds.utterances[i].speaker]}
            assert tags <= spk_tags
            assert lo <= it["prompt"].shape[0] <= hi  # each speaker has >= 300 frames elsewhere
            seen_lengths.add(it["prompt"].shape[0])
    assert len(seen_lengths) > 3  # the length is jittered


def test_single_utterance_speaker_prompts_with_itself(tmp_path: Path) -> None:
    d = tmp_path / "g" / "solo"
    d.mkdir(parents=True)
    write_utt(d, "only", 400, 5, random.Random(0))
    y = tmp_path / "c.yaml"
    y.write_text("dataset:\n  training: [g/solo]\n  min_utterances: 1\n  validation_fraction: 0\n")
    ds = VALLEDataset(load_config(y), "train")
    it = ds[0]
    assert 150 <= it["prompt"].shape[0] <= 300 and set(it["prompt"][:, 0].tolist()) == {5}


def test_sample_prompt_exact_lengths_and_windows() -> None:
    pieces = {i: (torch.arange(n) + 1000 * i).unsqueeze(1).repeat(1, 2) for i, n in
              [(1, 40), (2, 500), (3, 90), (4, 10)]}
    rng = random.Random(0)
    for _ in range(200):
        tl = rng.randint(1, 400)
        out = sample_prompt(list(pieces), pieces.__getitem__, rng, trim_length=tl, max_prompts=3)
        assert 0 < out.shape[0] <= tl and out.shape[1] == 2
        vals = out[:, 0].tolist()
        runs: list[list[int]] = []
        for v in vals:
            assert v // 1000 in pieces and v % 1000 < pieces[v // 1000].shape[0]
            if runs and runs[-1][-1] // 1000 == v // 1000:
                runs[-1].append(v)
            else:
                runs.append([v])
        cands = [r[0] // 1000 for r in runs]
        assert len(cands) == len(set(cands)) <= 3  # distinct candidates, at most max_prompts
        for r in runs:  # each piece is one contiguous window
            assert r == list(range(r[0], r[0] + len(r)))
        assert out.shape[0] == tl or len(runs) == 3
    # enough material -> exactly trim_length
    big = {0: torch.zeros(1000, 1), 1: torch.ones(1000, 1)}
    for tl in (1, 17, 225, 999, 1000):
        assert sample_prompt([0, 1], big.__getitem__, rng, trim_length=tl).shape[0] == tl
    # short candidates -> joined up to max_prompts pieces
    small = {i: torch.full((50, 1), i) for i in range(5)}
    out = sample_prompt(list(small), small.__getitem__, rng, trim_length=120, max_prompts=3)
    assert out.shape[0] == 120 and len(set(out[:, 0].tolist())) == 3
    out = sample_prompt(list(small), small.__getitem__, rng, trim_length=500, max_prompts=2)
    assert out.shape[0] == 100
    # random_utterance=0 stops after the first piece
    out = sample_prompt(list(small), small.__getitem__, rng, trim_length=120, max_prompts=3, random_utterance=0.0)
    assert out.shape[0] == 50
    # trim_length 0 = one whole candidate
    assert sample_prompt([2], pieces.__getitem__, rng, trim_length=0).shape[0] == 500


def test_trim_and_trim_or_repeat() -> None:
    x = torch.arange(10).unsqueeze(1).repeat(1, 3)
    assert torch.equal(trim_or_repeat(x, 4), x[:4])
    assert torch.equal(trim_or_repeat(x, 10), x)
    r = trim_or_repeat(x, 25)
    assert r.shape == (25, 3) and r[:, 0].tolist() == list(range(10)) * 2 + list(range(5))
    one = trim_or_repeat(x[:1], 7)
    assert one.shape == (7, 3) and (one == x[0]).all()
    # docs/reference-differences.md #3: the reference returned only n - L frames for L < n <= 2L
    assert trim_or_repeat(x, 15).shape[0] == 15
    rng = random.Random(0)
    starts = set()
    for _ in range(50):
        w = trim(x, 4, rng)
        assert w.shape == (4, 3) and w[:, 0].tolist() == list(range(int(w[0, 0]), int(w[0, 0]) + 4))
        starts.add(int(w[0, 0]))
    assert len(starts) > 3
    assert torch.equal(trim(x, 4), x[:4]) and torch.equal(trim(x, 50), x)
    with pytest.raises(ValueError):
        trim_or_repeat(x[:0], 5)
    with pytest.raises(ValueError):
        trim_or_repeat(x, 0)


def test_held_out_validation_split(corpus: Path) -> None:
    cfg = cfg_of(corpus)
    train = VALLEDataset(cfg, "train")
    val = VALLEDataset(cfg, "val", symmap=train.symmap)
    tk, vk = {u.key for u in train.utterances}, {u.key for u in val.utterances}
    assert vk and not (tk & vk) and len(tk | vk) == 18
    assert len(vk) == 3  # round(6 * 0.2) = 1 per speaker
    assert {u.key for u in VALLEDataset(cfg, "val").utterances} == vk  # stable
    assert val.sample_type == "path" and val.epoch_items(0).tolist() == list(range(len(val)))
    # validation prompts come from the speaker's training utterances, never the target
    for i in range(len(val)):
        it = val[i]
        assert int(it["resps"][0, 0]) not in set(it["prompt"][:, 0].tolist())
    # explicit validation folders replace the held-out split
    cfg2 = cfg_of(corpus, **{"dataset.validation": "[grpB/carol]"})
    assert {u.speaker for u in VALLEDataset(cfg2, "val").utterances} == {"grpB_carol"}
    assert len(VALLEDataset(cfg2, "train")) == 18
    # fraction 0 holds nothing out
    assert len(VALLEDataset(cfg_of(corpus, **{"dataset.validation_fraction": "0"}), "val")) == 0


def test_held_out_keeps_enough_and_at_least_one() -> None:
    from vall_e.data.listing import Utterance

    def utt(spk: str, i: int) -> Utterance:
        return Utterance(id=f"u{i}", dir="/x", key=f"training/g/{spk}/u{i}", speaker=spk, group="g",
                         language="en", frames=100, phones=10, duration=1.0, levels=8)

    utts = [utt("a", i) for i in range(3)] + [utt("b", i) for i in range(2)]
    out = held_out(utts, 0.05, keep=2)
    assert len(out) == 1 and next(iter(out)).startswith("training/g/a/")
    assert held_out(utts, 0.0) == set()
    big = [utt("c", i) for i in range(100)]
    assert len(held_out(big, 0.1, keep=2)) == 10


def test_sample_types(corpus: Path) -> None:
    ds = VALLEDataset(cfg_of(corpus, **{"dataset.sample_type": "speaker", "dataset.validation_fraction": "0"}), "train")
    per_spk: dict[str, list[int]] = {}
    for epoch in range(6):
        items = ds.epoch_items(epoch)
        assert sorted(ds.utterances[i].speaker for i in items) == ds.speakers
        for i in items:
            per_spk.setdefault(ds.utterances[i].speaker, []).append(i)
    for spk, drawn in per_spk.items():
        assert sorted(drawn) == sorted(ds.speaker_items[spk])  # without replacement over 6 epochs
    assert ds.epoch_items(7).tolist() == ds.epoch_items(7).tolist()
    g = VALLEDataset(cfg_of(corpus, **{"dataset.sample_type": "group", "dataset.validation_fraction": "0"}), "train")
    for epoch in range(4):
        items = g.epoch_items(epoch)
        assert sorted(g.utterances[i].group for i in items) == ["grpA", "grpB"]
    a_spk = [g.utterances[i].speaker for e in range(4) for i in g.epoch_items(e) if g.utterances[i].group == "grpA"]
    assert sorted(a_spk) == ["grpA_alice"] * 2 + ["grpA_bob"] * 2
    p = VALLEDataset(cfg_of(corpus, **{"dataset.sample_type": "path"}), "train")
    assert p.epoch_items(0).tolist() == list(range(len(p)))


# ----------------------------------------------------------------------------------------------
# loader, collate, CLI
# ----------------------------------------------------------------------------------------------

def test_dataloader_batches_and_budget(corpus: Path) -> None:
    cfg = cfg_of(corpus, **{"hyperparameters.frames_per_batch": "2400", "dataset.sample_type": "path"})
    ds = VALLEDataset(cfg, "train")
    loader = make_dataloader(ds, cfg, "train")
    seen = []
    for batch in loader:
        assert set(batch) >= {"text", "lang", "prompt", "resps", "speaker", "path", "epoch", "position"}
        assert batch["lang"].dtype == torch.long and batch["lang"].shape == (len(batch["resps"]),)
        assert all(r.dim() == 2 and r.shape[1] == 8 for r in batch["resps"])
        assert batch_frames(batch) <= 2400
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(ds)))


def test_workers_give_identical_batches(corpus: Path) -> None:
    cfg0 = cfg_of(corpus, **{"hyperparameters.batch_size": "4", "dataset.sample_type": "path"})
    cfg2 = cfg_of(corpus, **{"hyperparameters.batch_size": "4", "dataset.sample_type": "path", "dataset.workers": "2"})
    ds = VALLEDataset(cfg0, "train")
    a = list(make_dataloader(ds, cfg0, "train"))
    b = list(make_dataloader(VALLEDataset(cfg2, "train"), cfg2, "train"))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert all(torch.equal(p, q) for p, q in zip(x["prompt"], y["prompt"]))


def test_collate_lists() -> None:
    items = [{"text": torch.tensor([1, 5, 2]), "lang": 1, "prompt": torch.zeros(4, 8, dtype=torch.long),
              "resps": torch.zeros(6, 8, dtype=torch.long), "speaker": "s", "path": "p", "index": 0,
              "epoch": 2, "position": 5}] * 2
    b = collate(items)
    assert b["lang"].tolist() == [1, 1] and len(b["text"]) == 2 and b["epoch"] == 2 and b["position"] == 5
    assert batch_frames(b) == 2 * 13


def test_cli_actions(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.data.__main__ import main

    y = f"yaml={corpus}"
    assert main([y]) == 0
    out = capsys.readouterr().out
    assert "--action hdf5" in out and "next:" in out
    assert main([y, "--action", "metadata"]) == 0
    assert "18 utterances" in capsys.readouterr().out
    assert main([y, "--action", "symmap"]) == 0
    assert (corpus.parent / "symmap.json").is_file()
    assert main([y, "--action=hdf5"]) == 0
    assert (corpus.parent / "data.h5").is_file()
    capsys.readouterr()
    assert main([y, "--action", "sample", "dataset.use_hdf5=true", "dataset.sample_type=path",
                 "hyperparameters.batch_size=2", "evaluation.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("batch of") == 4 and "resps [" in out


def test_cli_bad_input_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vall_e.data.__main__ import main
    from vall_e.utils.errors import run_main

    y = tmp_path / "c.yaml"
    y.write_text("dataset:\n  training: [nowhere/nobody]\n")
    with pytest.raises(SystemExit) as e:
        run_main(main, [f"yaml={y}", "--action", "sample"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nobody" in err and err.startswith("error: ") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# property test: arbitrary files either load or raise UserError
# ----------------------------------------------------------------------------------------------

_tokens = st.text(alphabet=st.sampled_from(list("ab|əˈ \t\n")), max_size=30)
_phn_lines = st.lists(st.sampled_from(["a", "b", "ə", "ˈa", "|", "  "]), min_size=1, max_size=20).map(" ".join)
_MUTATIONS = ["none", "none", "none", "ref", "empty_t", "empty_l", "1d", "4d", "scalar", "float", "big",
              "negative", "garbage"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(phn=st.one_of(_phn_lines, _tokens, st.binary(max_size=20)), frames=st.integers(1, 90),
       levels=st.integers(2, 10), mutation=st.sampled_from(_MUTATIONS), dtype=st.sampled_from(
           [torch.int16, torch.int64, torch.uint8]), as_dict=st.booleans())
def test_reader_loads_or_raises_user_error(phn, frames, levels, mutation, dtype, as_dict) -> None:
    """Arbitrary phoneme text and code tensors: the dataset loads them or raises a one-line UserError."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        d = root / "g" / "s"
        d.mkdir(parents=True)
        write_utt(d, "good", 120, 3, random.Random(0))
        t = torch.randint(0, 256, (frames, levels)).to(dtype)
        t = {"none": t, "ref": t.t().unsqueeze(0), "empty_t": t[:0], "empty_l": t[:, :0], "1d": t[:, 0],
             "4d": t[None, None], "scalar": t[0, 0], "float": t.float(), "big": t.long() + 2000,
             "negative": t.long() - 300, "garbage": None}[mutation]
        qnt = d / "odd.qnt.pt"
        if t is None:
            qnt.write_bytes(phn if isinstance(phn, bytes) else phn.encode())
        else:
            torch.save({"codes": t, "codec": {"name": "test", "n_codes": 1024}} if as_dict else t, qnt)
        (d / "odd.phn.txt").write_bytes(phn if isinstance(phn, bytes) else phn.encode("utf-8"))
        y = root / "c.yaml"
        y.write_text("dataset:\n  training: [g/s]\n  validation_fraction: 0\n  validate: false\n"
                     "model:\n  n_levels: 2\n")
        try:
            ds = VALLEDataset(load_config(y), "train")
            for i in range(len(ds)):
                it = ds[i]
                assert it["resps"].dtype == torch.long and it["resps"].dim() == 2 and it["resps"].shape[0] > 0
                assert it["text"][0] == 1 and it["text"][-1] == 2
            LOADED.append(mutation)
        except UserError as e:
            assert str(e) and "\n" not in str(e)
            assert mutation not in ("none", "ref") or "phn.txt" in str(e)


LOADED: list[str] = []
