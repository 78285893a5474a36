"""The stress mode travels with the data and the model: datasets, `python -m vall_e.emb.g2p` and synthesis
use the mode their symbol map records, maps made before the modes stay merged, and files in another
mode are one-line errors instead of silently wrong ids."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.test_data import cfg_of, make_corpus
from vall_e.data import hdf5 as h5fmt
from vall_e.data.dataset import VALLEDataset
from vall_e.text.inventory import inventory_symbols
from vall_e.text.phonemes import phonemize
from vall_e.text.symmap import Symmap, corpus_symmap, format_phonemes, read_phonemes
from vall_e.utils.errors import UserError, run_main

torch.set_num_threads(1)


def _to_separate(folder: Path) -> None:
    """Rewrite the `.phn.txt` files under `folder` as separate-mode files (`ˈa` -> `ˈ a`)."""
    for path in sorted(folder.rglob("*.phn.txt")):
        tokens = [part for t in read_phonemes(path) for part in (["ˈ", t[1:]] if t.startswith("ˈ") else [t])]
        path.write_text(format_phonemes(tokens) + "\n", encoding="utf-8")


def _every_token(root: Path) -> list[list[str]]:
    return [read_phonemes(p) for p in sorted(root.rglob("*.phn.txt"))]


# ------------------------------------------------------------------------------------------- datasets


def test_dataset_made_before_the_modes_keeps_its_merged_map(tmp_path: Path) -> None:
    y = make_corpus(tmp_path)  # `ˈa` tokens: phonemes written with merged stress, no mode recorded anywhere
    ds = VALLEDataset(cfg_of(y), "train")
    assert ds.symmap.stress == "merged"
    assert set(ds.symmap.symbols) == set(Symmap.build(_every_token(tmp_path)).symbols)  # the corpus only
    assert "@stress" not in json.loads((tmp_path / "symmap.json").read_text(encoding="utf-8"))
    h5fmt.build_hdf5(cfg_of(y), progress=False)
    h5 = VALLEDataset(cfg_of(y, **{"dataset.use_hdf5": "true"}), "train")
    assert h5.symmap == ds.symmap and torch.equal(h5[0]["text"], ds[0]["text"])


def test_separate_mode_dataset_gets_its_languages_inventories(tmp_path: Path) -> None:
    y = make_corpus(tmp_path)  # grpA English, grpB German (dataset.speaker_languages)
    _to_separate(tmp_path)
    ds = VALLEDataset(cfg_of(y), "train")
    assert ds.symmap.stress == "separate"
    assert set(inventory_symbols(["en", "de"])) <= set(ds.symmap.symbols)
    assert "θ" in ds.symmap and "ç" in ds.symmap and "," in ds.symmap  # none of them is in the corpus
    saved = json.loads((tmp_path / "symmap.json").read_text(encoding="utf-8"))
    assert saved["@stress"] == "separate" and Symmap.load(tmp_path / "symmap.json") == ds.symmap
    item = ds[0]
    assert ds.symmap.decode(item["text"].tolist()) == read_phonemes(ds.utterances[0].phn_path)
    h5fmt.build_hdf5(cfg_of(y), progress=False)
    with h5fmt.open_hdf5(cfg_of(y).hdf5_path) as f:
        assert h5fmt.read_symmap(f) == ds.symmap


def test_files_that_disagree_with_the_datasets_map_are_a_one_line_error(tmp_path: Path, capsys) -> None:
    y = make_corpus(tmp_path)
    VALLEDataset(cfg_of(y), "train")  # writes the merged symmap.json, as a dataset from before the modes
    _to_separate(tmp_path / "grpB")  # new files from today's g2p default beside the old ones
    with pytest.raises(UserError, match=r"grpB/carol/utt\d\.phn\.txt: phonemes written with stress='separate'.*"
                                        r"symmap\.json is stress='merged'") as e:
        VALLEDataset(cfg_of(y), "train")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="stress='separate'"):
        h5fmt.build_hdf5(cfg_of(y), progress=False)
    from vall_e.data.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        run_main(main, [f"yaml={y}", "--action", "symmap"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "--stress merged" in err


def test_a_checkpoints_map_in_another_mode_is_refused(tmp_path: Path) -> None:
    y = make_corpus(tmp_path)
    _to_separate(tmp_path)
    merged = Symmap.build([[t.replace("ˈ", "") or "ˈ" for t in toks] for toks in _every_token(tmp_path)],
                          stress="merged")
    ds = VALLEDataset(cfg_of(y), "train", symmap=merged)  # e.g. resuming a run trained on merged phonemes
    with pytest.raises(UserError, match=r"utt\d\.phn\.txt: phonemes written with stress='separate'.*the symbol map in use"):
        ds[0]
    h5fmt.build_hdf5(cfg_of(y), progress=False)
    with pytest.raises(UserError, match=r"data\.h5: its phonemes are stress='separate'.*stress='merged'"):
        VALLEDataset(cfg_of(y, **{"dataset.use_hdf5": "true"}), "train", symmap=merged)


# ------------------------------------------------------------------------------------------- g2p


def _g2p(argv, capsys):
    from vall_e.emb.g2p import main

    with pytest.raises(SystemExit) as e:
        run_main(main, [*argv, "--quiet"])
    return e.value.code, capsys.readouterr()


def test_g2p_writes_separate_stress_by_default_and_merged_on_request(tmp_path: Path, capsys) -> None:
    for name in ("new", "old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.txt").write_text("Hello world, how are you?", encoding="utf-8")
    code, out = _g2p([str(tmp_path / "new")], capsys)
    assert code == 0, out.err
    tokens = read_phonemes(tmp_path / "new" / "a.phn.txt")
    assert tokens == phonemize("Hello world, how are you?") and "ˈ" in tokens
    code, out = _g2p([str(tmp_path / "old"), "--stress", "merged"], capsys)
    assert code == 0, out.err
    assert read_phonemes(tmp_path / "old" / "a.phn.txt") == phonemize("Hello world, how are you?", stress="merged")


def test_g2p_will_not_mix_modes_in_a_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.txt").write_text("Hello world.", encoding="utf-8")
    (tmp_path / "a.phn.txt").write_text("h ə lˈ o ʊ | w ɜː l d .\n", encoding="utf-8")  # an old, merged output
    (tmp_path / "b.txt").write_text("Good morning.", encoding="utf-8")
    code, out = _g2p([str(tmp_path)], capsys)
    assert code == 2 and not (tmp_path / "b.phn.txt").exists()
    assert len(out.err.strip().splitlines()) == 1 and "a.phn.txt" in out.err and "--stress merged" in out.err
    code, out = _g2p([str(tmp_path), "--stress", "merged"], capsys)
    assert code == 0, out.err
    assert read_phonemes(tmp_path / "b.phn.txt") == phonemize("Good morning.", stress="merged")
    code, out = _g2p([str(tmp_path), "--stress", "both"], capsys)
    assert code == 2 and "both" in out.err


# ------------------------------------------------------------------------------------------- synthesis


def _model(tmp_path: Path, symmap: Symmap, tiny_encodec_dir: Path) -> Path:
    from tests.conftest import export_tiny_model
    from vall_e.models.valle import VALLE, VALLEConfig

    torch.manual_seed(0)
    cfg = VALLEConfig(kind="ar+nar", d_model=16, n_heads=2, n_layers=1, n_text_tokens=len(symmap) + 8,
                      n_codes=1024, n_levels=8, dropout=0.0)
    return export_tiny_model(tmp_path / "model.safetensors", VALLE(cfg), cfg, symmap, tiny_encodec_dir)


def test_model_file_from_before_the_modes_synthesizes_with_merged_tokens(tmp_path, tiny_encodec_dir, caplog):
    from tests.conftest import TINY_MODEL_TEXTS, write_reference
    from vall_e.generation.settings import GenerationSettings
    from vall_e.generation.tts import TTS
    from vall_e.models.model_file import read_export

    symmap = Symmap.build([phonemize(t, stress="merged") for t in TINY_MODEL_TEXTS])
    path = _model(tmp_path, symmap, tiny_encodec_dir)
    assert "@stress" not in read_export(path)[1]["symmap"]  # the metadata an old export has
    tts = TTS.from_pretrained(path, device="cpu")
    assert tts.symmap.stress == "merged"
    text = "Hello there, how are you?"
    assert tts.symmap.decode(tts.encode_text(text).tolist()) == phonemize(text, stress="merged")
    with caplog.at_level(logging.WARNING, logger="vall_e.generation.tts"):  # the old fallback still works
        ids = tts.encode_text("The hotel.")  # `tˈ` and `l` are unknown, `t` and `lˈ` known
    assert "not in the model's symbol map" in caplog.text and ids[0] == 1
    wav = tts.synthesize(text, str(write_reference(tmp_path / "voice.wav")), GenerationSettings(max_ar_steps=6))[0]
    assert wav.ndim == 1 and wav.shape[0] > 0 and torch.isfinite(wav).all()


def test_model_with_an_inventory_map_tokenizes_separately_and_knows_every_phoneme(tmp_path, tiny_encodec_dir, caplog):
    from vall_e.generation.tts import TTS

    symmap = corpus_symmap([("a.phn.txt", phonemize("Hello there"))], ["en"])  # a corpus of two words
    tts = TTS.from_pretrained(_model(tmp_path, symmap, tiny_encodec_dir), device="cpu")
    assert tts.symmap == symmap and tts.symmap.stress == "separate"
    text = "Thirty thin thieves thought, didn't they? «Yes» (really); measure the azure vision!"
    with caplog.at_level(logging.WARNING, logger="vall_e.generation.tts"):
        ids = tts.encode_text(text)
    assert tts.symmap.decode(ids.tolist()) == phonemize(text)  # every token known, no fallback needed
    assert "not in the model's symbol map" not in caplog.text
