"""Generate the reference fixtures of tests/test_vallex_model.py from the ORIGINAL model code.

Upstream: Plachtaa/VALL-E-X at commit 3faaf8c (2023-11-03), files models/vallex.py,
modules/transformer.py, modules/activation.py, modules/embedding.py, models/macros.py (MIT; model
files under lifeiteng's Apache-2.0 headers). Their code is only run here, from a checkout you give;
nothing of it is copied into this project.

    git clone https://github.com/Plachtaa/VALL-E-X /tmp/vallex-src && git -C /tmp/vallex-src checkout 3faaf8c
    python scripts/make_vallex_fixtures.py --upstream /tmp/vallex-src            # tiny + full size
    python scripts/make_vallex_fixtures.py --upstream /tmp/vallex-src --sizes tiny

For each size it builds their `VALLE(d, heads, layers, norm_first=True, add_prenet=False,
prefix_mode=1, share_embedding=True, nar_scale_factor=1.0, prepend_bos=True, num_quantizers=8)`,
loads `vall_e.models.vallex_checkpoint.random_state_dict(config, seed)` into it (strict: so the
key map covers their state dict exactly), and runs their `inference` on three cases:

* teacher-forced: their sampler is replaced by one that returns a given response, then EOS; the
  AR logits of every step and the NAR logits of every level (forward hooks on their heads) are
  recorded, with the codes their NAR chose;
* greedy: their sampler is replaced by argmax; the codes are recorded.

Only slices of the logits are stored (columns COLS of every row, plus each row's argmax and
logsumexp), so the fixture stays small; the weights are regenerated from the seed by the test.
Vocos: gemelo-ai/vocos at commit c859e3b (MIT), `--parts vocos --vocos-upstream DIR`.
Amphion: open-mmlab/Amphion at commit d3de90f (MIT), models/tts/valle/valle.py and the modules it
imports, `--parts amphion --amphion-upstream DIR` (two tiny option sets, see AMPHION).

Output: tests/fixtures/vallex/{size}.json (tensors as text, tests/tensor_fixtures.py; a JSON manifest of
the cases in its metadata).

`--parts text` runs their text front end (utils/g2p: cje_cleaners + bpe_69.json through
`PhonemeBpeTokenizer.tokenize`, which needs tokenizers, eng_to_ipa, inflect, unidecode, and jieba,
cn2an, pypinyin because their cleaners import the Chinese module) on every line of
tests/fixtures/vallex/english_sentences.txt, tagged "[EN]...[EN]" as their generate_audio does, and
writes tests/fixtures/vallex/english_ids.json: the ids and languages per sentence; likewise
chinese_sentences.txt (already tagged, some mixed with English) -> chinese_ids.json.

`--parts text-ja` (also part of `text`) does the same for japanese_sentences.txt, tagged "[JA]...[JA]"
-> japanese_ids.json, with pyopenjtalk-plus (`pip install "vall-e[vallex-ja]"`) called with this
project's OpenJTalk options (vall_e.text.vallex_ja.OPENJTALK_OPTIONS: the original pyopenjtalk had no
post-processing to turn off); the file records pyopenjtalk-plus's version, whose dictionary shapes the
result. Their cleaners import the Chinese module, which only needs jieba and cn2an to exist for this.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tensor_fixtures import write_tensor_json  # noqa: E402
from vall_e.models.vallex import VallexConfig  # noqa: E402
from vall_e.models.vallex_checkpoint import random_state_dict  # noqa: E402

UPSTREAM_COMMIT = "3faaf8c"
VOCOS_COMMIT = "c859e3b"
AMPHION_COMMIT = "d3de90f"
ARGS_UPSTREAM = "."
SIZES = {"tiny": dict(d_model=64, n_heads=4, n_layers=2), "full": dict(d_model=1024, n_heads=16, n_layers=12)}
SEEDS = {"tiny": 1234, "full": 4321}
COLS = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1000, 1023]  # + 1024 (STOP) for AR
LANGS = ["en", "zh", "ja"]


def make_cases(seed: int, forced_len: int) -> list[dict]:
    """Three cases: (prompt transcript ids + language, text ids + per-token languages, prompt codes,
    a forced response). Ids are 0..69 like the real table (specials included)."""
    g = torch.Generator().manual_seed(seed + 1)
    specs = [(0, "en", 7, ["en"], 5), (4, "zh", 9, ["en", "ja"], 8), (3, "ja", 5, ["zh"], 3)]
    cases = []
    for enroll, plang, n_text, tlangs, tp in specs:
        text = torch.randint(5, 70, (enroll + n_text,), generator=g)
        per_token = [tlangs[int(i)] for i in torch.randint(0, len(tlangs), (n_text,), generator=g)]
        cases.append({
            "text": text, "enroll": enroll, "prompt_lang": plang, "text_langs": per_token,
            "prompt": torch.randint(0, 1024, (tp, 8), generator=g),
            "forced": torch.randint(0, 1024, (forced_len,), generator=g),
        })
    return cases


def folded_ids(case: dict) -> torch.Tensor:
    """The ids this project feeds its port: language * 2048 + token."""
    langs = [case["prompt_lang"]] * case["enroll"] + case["text_langs"]
    return torch.tensor([LANGS.index(lang) * 2048 + int(t) for lang, t in zip(langs, case["text"])])


def run_theirs(model, vallex_module, case: dict, mode: str) -> dict:
    """Their inference with the sampler replaced; returns codes and (teacher-forced) logits."""
    ar_logits, nar_logits = [], []
    step = {"i": 0}

    def forced(logits, top_k=None, top_p=None, temperature=None):
        ar_logits.append(logits.detach().clone()[0])
        i = step["i"]
        step["i"] += 1
        tok = int(case["forced"][i]) if i < len(case["forced"]) else 1024
        return torch.tensor([[tok]]), torch.zeros(1)

    def greedy(logits, top_k=None, top_p=None, temperature=None):
        return logits.argmax(-1, keepdim=True), torch.zeros(1)

    hooks = [layer.register_forward_hook(lambda m, inp, out: nar_logits.append(out.detach().clone()[0]))
             for layer in model.nar_predict_layers]
    saved = vallex_module.topk_sampling
    vallex_module.topk_sampling = forced if mode == "forced" else greedy
    try:
        with torch.no_grad():
            codes = model.inference(case["text"][None], torch.tensor([len(case["text"])]), case["prompt"][None],
                                    enroll_x_lens=case["enroll"], top_k=-100, temperature=1.0,
                                    prompt_language=case["prompt_lang"], text_language=case["text_langs"])
    finally:
        vallex_module.topk_sampling = saved
        for h in hooks:
            h.remove()
    return {"codes": codes[0], "ar": ar_logits, "nar": nar_logits}


def summarize(rows: torch.Tensor, cols: list[int]) -> dict[str, torch.Tensor]:
    return {"cols": rows[:, cols].float(), "argmax": rows.argmax(-1), "lse": torch.logsumexp(rows.float(), -1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help=f"checkout of Plachtaa/VALL-E-X at {UPSTREAM_COMMIT}")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--parts", nargs="+", default=["model", "text", "vocos", "amphion"],
                    choices=["model", "text", "text-ja", "vocos", "amphion"])
    ap.add_argument("--amphion-upstream", default=None, help=f"checkout of open-mmlab/Amphion at {AMPHION_COMMIT}")
    ap.add_argument("--vocos-upstream", default=None, help=f"checkout of gemelo-ai/vocos at {VOCOS_COMMIT} (for vocos)")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "vallex"))
    args = ap.parse_args()
    upstream = Path(args.upstream).resolve()
    global ARGS_UPSTREAM
    ARGS_UPSTREAM = str(upstream)
    sys.path.insert(0, str(upstream))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "text" in args.parts:
        make_text_fixture(upstream, out_dir)
    if "text" in args.parts or "text-ja" in args.parts:
        make_japanese_fixture(upstream, out_dir)
    if "model" in args.parts:
        make_model_fixtures(args.sizes, out_dir)
    if "vocos" in args.parts:
        make_vocos_fixture(Path(args.vocos_upstream).resolve(), out_dir)
    if "amphion" in args.parts:
        make_amphion_fixtures(Path(args.amphion_upstream).resolve(), out_dir)


# Amphion-shaped models: both option sets a published Amphion checkpoint may have been trained with
AMPHION = {
    "amphion_a": dict(bos=False, prefix_mode=1, share=True, seed=2024),
    "amphion_b": dict(bos=True, prefix_mode=0, share=False, seed=2025),
}


def make_amphion_fixtures(upstream: Path, out_dir: Path) -> None:
    """Amphion's own VALLE (models/tts/valle/valle.py) at a tiny size, 512 text tokens, no language
    embedding; torchmetrics, lhotse and Amphion's utils.util are stubbed (training-only imports).
    Their `inference` recomputes the whole sequence every step (no cache) and stops after 16 frames
    per text token + 1; the same teacher-forced / greedy cases as for VALL-E X."""
    import types

    def stub(name: str, **attrs) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    for name in list(sys.modules):  # VALL-E X's checkout has its own `models`, `modules` and `utils`
        if name.split(".")[0] in ("models", "modules", "utils", "data", "macros"):
            del sys.modules[name]
    sys.path = [p for p in sys.path if Path(p).resolve() != Path(ARGS_UPSTREAM).resolve()]
    sys.path.insert(0, str(upstream))
    stub("torchmetrics")
    stub("torchmetrics.classification", MulticlassAccuracy=lambda *a, **k: None)
    stub("utils").__path__ = [str(upstream / "utils")]
    stub("utils.util", make_pad_mask=None)
    for n in ("lhotse", "lhotse.dataset", "lhotse.dataset.collation", "lhotse.dataset.input_strategies", "lhotse.utils"):
        stub(n, CutSet=None, collate_features=None, ExecutorType=None, PrecomputedFeatures=object,
             _get_executor=None, fastcopy=None)
    import models.tts.valle.valle as amphion_module  # their code

    torch.set_grad_enabled(False)
    for name, opt in AMPHION.items():
        config = VallexConfig(d_model=64, n_heads=4, n_layers=2, n_text_tokens=512, n_langs=0,
                              prepend_bos=opt["bos"], nar_prompt_all_levels=opt["prefix_mode"] != 0,
                              tied_heads=opt["share"])
        cfg = types.SimpleNamespace(decoder_dim=64, nhead=4, nar_scale_factor=1, num_quantizers=8,
                                    num_decoder_layers=2, text_token_num=512, audio_token_num=1024,
                                    prepend_bos=opt["bos"], add_prenet=False, norm_first=True,
                                    prefix_mode=opt["prefix_mode"], share_embedding=opt["share"])
        model = amphion_module.VALLE(cfg)
        model.load_state_dict(random_state_dict(config, opt["seed"]), strict=True)
        model.eval()
        cases = make_cases(opt["seed"], 12)
        tensors, manifest = {}, []
        for n, case in enumerate(cases):
            text = case["text"] % 512
            runs = {}
            for mode in ("forced", "greedy"):
                ar_logits, nar_logits, step = [], [], {"i": 0}

                def sampler(logits, top_k=None, top_p=None, temperature=None, mode=mode):
                    if mode == "greedy":
                        return logits.argmax(-1, keepdim=True)
                    ar_logits.append(logits.detach().clone()[0])
                    i = step["i"]
                    step["i"] += 1
                    return torch.tensor([[int(case["forced"][i]) if i < len(case["forced"]) else 1024]])

                hooks = [layer.register_forward_hook(lambda m, inp, out: nar_logits.append(out.detach().clone()[0]))
                         for layer in model.nar_predict_layers]
                saved = amphion_module.topk_sampling
                amphion_module.topk_sampling = sampler
                try:
                    codes = model.inference(text[None], torch.tensor([len(text)]), case["prompt"][None],
                                            enroll_x_lens=torch.tensor([case["enroll"]]), top_k=-100, temperature=1.0)
                finally:
                    amphion_module.topk_sampling = saved
                    for h in hooks:
                        h.remove()
                runs[mode] = {"codes": codes[0], "ar": ar_logits, "nar": nar_logits}
            assert runs["forced"]["codes"].shape[0] == len(case["forced"]), "their AR stopped early"
            tensors[f"{n}.text"] = text
            tensors[f"{n}.prompt"] = case["prompt"]
            tensors[f"{n}.forced"] = case["forced"]
            tensors[f"{n}.forced_codes"] = runs["forced"]["codes"].long()
            tensors[f"{n}.greedy_codes"] = runs["greedy"]["codes"].long()
            for key, value in summarize(torch.stack(runs["forced"]["ar"]), COLS + [1024]).items():
                tensors[f"{n}.ar.{key}"] = value
            for level, rows in enumerate(runs["forced"]["nar"][:7], start=1):
                for key, value in summarize(rows, COLS).items():
                    tensors[f"{n}.nar{level}.{key}"] = value
            manifest.append({"greedy_frames": int(runs["greedy"]["codes"].shape[0])})
            print(f"{name} case {n}: greedy {runs['greedy']['codes'].shape[0]} frames")
        meta = {"upstream": f"open-mmlab/Amphion@{AMPHION_COMMIT}", "seed": str(opt["seed"]),
                "config": json.dumps(config.to_dict()), "cols": json.dumps(COLS), "cases": json.dumps(manifest)}
        write_tensor_json(out_dir / f"{name}.json", tensors, meta)
        print(f"wrote {out_dir / f'{name}.json'}")
    make_amphion_text_fixture(upstream, out_dir)


def make_amphion_text_fixture(upstream: Path, out_dir: Path) -> None:
    """Their phone extraction (text/g2p_module.G2PModule with espeak, as processors/phone_extractor
    calls it) and their id collation (text/text_token_collation.TextTokenCollator from a symbols.dict)
    on the English sentences; g2p_en (only their lexicon path uses it) is stubbed. espeak is the
    espeakng-loader wheel's, configured as this project configures phonemizer. A symbols.dict of the
    phones seen, in first-seen order with ids 0.., is written too (their ids come from sorting it)."""
    import types

    from vall_e.text.espeak import configure_phonemizer

    configure_phonemizer()
    sys.modules.setdefault("g2p_en", types.ModuleType("g2p_en")).G2p = None
    from text.g2p_module import G2PModule  # their code
    from text.text_token_collation import TextTokenCollator

    g2p = G2PModule(backend="espeak", language="en-us")
    sentences = (out_dir / "english_sentences.txt").read_text(encoding="utf-8").splitlines()
    phone_lists = [g2p.g2p_conversion(s.replace("”", '"').replace("“", '"')) for s in sentences]
    symbols: dict[str, int] = {}
    for phones in phone_lists:
        for p in phones:
            symbols.setdefault(p, len(symbols))
    collator = TextTokenCollator(sorted(symbols), add_bos=True, add_eos=True)
    rows = [{"text": s, "ids": collator(phones)[0]} for s, phones in zip(sentences, phone_lists)]
    import importlib.metadata as md

    lines = ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    text = (f'{{"upstream": "open-mmlab/Amphion@{AMPHION_COMMIT}", "espeakng-loader": '
            f'"{md.version("espeakng-loader")}", "symbols": {json.dumps(symbols, ensure_ascii=False)}, '
            f'"sentences": [\n{lines}\n]}}\n')
    (out_dir / "amphion_ids.json").write_text(text, encoding="utf-8")
    print(f"wrote {out_dir / 'amphion_ids.json'} ({len(rows)} sentences, {len(symbols)} symbols)")


def make_vocos_fixture(upstream: Path, out_dir: Path) -> None:
    """Their Vocos (EnCodec variant, charactr/vocos-encodec-24khz's config) with random weights:
    torchaudio and encodec (and scipy when missing) are stubbed (only their imports need them: the feature extractor's EnCodec
    and the mel helpers of another head are never called), the weights come from
    `random_vocos_state_dict(seed)`, and their `codes_to_features` + `decode(bandwidth_id=2)` turn
    8 levels of random codes into the waveform stored in tests/fixtures/vallex/vocos.json."""
    import types

    from vall_e.codecs.vocos import random_vocos_state_dict

    stubs = ["torchaudio", "torchaudio.functional", "torchaudio.functional.functional", "encodec"]
    try:
        import scipy  # noqa: F401  (their spectral_ops imports it for the MDCT heads, unused here)
    except ImportError:
        stubs.append("scipy")
    for name in stubs:
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchaudio.functional.functional"]._hz_to_mel = None
    sys.modules["torchaudio.functional.functional"]._mel_to_hz = None
    sys.modules["encodec"].EncodecModel = None
    sys.path.insert(0, str(upstream))
    from vocos.feature_extractors import EncodecFeatures  # their code
    from vocos.heads import ISTFTHead
    from vocos.models import VocosBackbone
    from vocos.pretrained import Vocos

    features = EncodecFeatures.__new__(EncodecFeatures)  # no EnCodec download: only what decoding reads
    torch.nn.Module.__init__(features)
    features.encodec = types.SimpleNamespace(quantizer=types.SimpleNamespace(bins=1024))
    features.codebook_weights = torch.nn.Parameter(torch.zeros(16 * 1024, 128), requires_grad=False)
    model = Vocos(features, VocosBackbone(input_channels=128, dim=384, intermediate_dim=1152, num_layers=8,
                                          adanorm_num_embeddings=4),
                  ISTFTHead(dim=384, n_fft=1280, hop_length=320, padding="same"))
    seed = 77
    sd = random_vocos_state_dict(seed)
    model.load_state_dict(sd, strict=True)
    model.eval()
    codes = torch.randint(0, 1024, (2, 30, 8), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        feats = model.codes_to_features(codes.permute(2, 0, 1))  # their layout: [levels, batch, frames]
        wav = model.decode(feats, bandwidth_id=torch.tensor([2]))
    write_tensor_json(out_dir / "vocos.json", {"codes": codes, "wav": wav},
                      {"upstream": f"gemelo-ai/vocos@{VOCOS_COMMIT}", "seed": str(seed), "bandwidth_id": "2"})
    print(f"wrote {out_dir / 'vocos.json'}: wav {tuple(wav.shape)}, max |x| {float(wav.abs().max()):.3f}")


def make_text_fixture(upstream: Path, out_dir: Path) -> None:
    import os

    from utils.g2p import PhonemeBpeTokenizer  # their code

    tokenizer = PhonemeBpeTokenizer(tokenizer_path=str(upstream / "utils" / "g2p" / "bpe_69.json"))
    sentences = (out_dir / "english_sentences.txt").read_text(encoding="utf-8").splitlines()
    cwd = os.getcwd()
    os.chdir(upstream)  # their modules read relative paths
    try:
        rows = []
        for sentence in sentences:
            ids, langs = tokenizer.tokenize(text=f"_[EN]{sentence}[EN]".strip())
            rows.append({"text": sentence, "ids": ids, "langs": "".join(lang[0] for lang in langs)})
    finally:
        os.chdir(cwd)
    lines = ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    text = f'{{"upstream": "Plachtaa/VALL-E-X@{UPSTREAM_COMMIT}", "sentences": [\n{lines}\n]}}\n'
    (out_dir / "english_ids.json").write_text(text, encoding="utf-8")
    print(f"wrote {out_dir / 'english_ids.json'} ({len(rows)} sentences)")
    # Chinese (and mixed) lines are tagged already; jieba's and pypinyin's versions shape the result
    import importlib.metadata as md

    os.chdir(upstream)
    try:
        rows = []
        for line in (out_dir / "chinese_sentences.txt").read_text(encoding="utf-8").splitlines():
            ids, langs = tokenizer.tokenize(text=f"_{line}".strip())
            rows.append({"text": line, "ids": ids, "langs": "".join(lang[0] for lang in langs)})
    finally:
        os.chdir(cwd)
    versions = {p: md.version(p) for p in ("jieba", "pypinyin", "cn2an")}
    lines = ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    text = (f'{{"upstream": "Plachtaa/VALL-E-X@{UPSTREAM_COMMIT}", "versions": {json.dumps(versions)}, '
            f'"sentences": [\n{lines}\n]}}\n')
    (out_dir / "chinese_ids.json").write_text(text, encoding="utf-8")
    print(f"wrote {out_dir / 'chinese_ids.json'} ({len(rows)} sentences)")


def japanese_reference_ids(upstream: Path, sentences: list[str]) -> list[dict]:
    """Their cje_cleaners + bpe_69 table on "[JA]sentence[JA]", pyopenjtalk called with our options.
    Shared with tests/test_vallex_text.py, which runs it live when given a checkout (VALLEX_UPSTREAM)."""
    import functools
    import importlib.util
    import os
    import types

    import pyopenjtalk

    from vall_e.text.vallex_ja import OPENJTALK_OPTIONS

    stubs = [name for name in ("jieba", "cn2an") if importlib.util.find_spec(name) is None]
    for name in stubs:  # imported by their Chinese module at load, unused for Japanese
        sys.modules[name] = types.ModuleType(name)
    if str(upstream) not in sys.path:
        sys.path.insert(0, str(upstream))
    try:
        from utils.g2p import PhonemeBpeTokenizer  # their code
    finally:
        for name in stubs:  # so nothing else mistakes a stub for the package
            del sys.modules[name]

    tokenizer = PhonemeBpeTokenizer(tokenizer_path=str(upstream / "utils" / "g2p" / "bpe_69.json"))
    original = pyopenjtalk.extract_fullcontext
    pyopenjtalk.extract_fullcontext = functools.partial(original, **OPENJTALK_OPTIONS)
    cwd = os.getcwd()
    os.chdir(upstream)
    try:
        rows = []
        for sentence in sentences:
            ids, langs = tokenizer.tokenize(text=f"_[JA]{sentence}[JA]".strip())
            rows.append({"text": sentence, "ids": ids, "langs": "".join(lang[0] for lang in langs)})
    finally:
        os.chdir(cwd)
        pyopenjtalk.extract_fullcontext = original
    return rows


def make_japanese_fixture(upstream: Path, out_dir: Path) -> None:
    import importlib.metadata as md

    from vall_e.text.vallex_ja import OPENJTALK_OPTIONS

    sentences = (out_dir / "japanese_sentences.txt").read_text(encoding="utf-8").splitlines()
    rows = japanese_reference_ids(upstream, sentences)
    versions = {"pyopenjtalk-plus": md.version("pyopenjtalk-plus")}
    lines = ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows)
    text = (f'{{"upstream": "Plachtaa/VALL-E-X@{UPSTREAM_COMMIT}", "versions": {json.dumps(versions)}, '
            f'"openjtalk_options": {json.dumps(OPENJTALK_OPTIONS)}, "sentences": [\n{lines}\n]}}\n')
    (out_dir / "japanese_ids.json").write_text(text, encoding="utf-8")
    print(f"wrote {out_dir / 'japanese_ids.json'} ({len(rows)} sentences)")


def make_model_fixtures(sizes: list[str], out_dir: Path) -> None:
    import models.vallex as vallex_module  # their code

    torch.set_grad_enabled(False)
    for size in sizes:
        dims = SIZES[size]
        config = VallexConfig(**dims)
        model = vallex_module.VALLE(dims["d_model"], dims["n_heads"], dims["n_layers"], norm_first=True,
                                    add_prenet=False, prefix_mode=1, share_embedding=True, nar_scale_factor=1.0,
                                    prepend_bos=True, num_quantizers=8)
        sd = random_state_dict(config, SEEDS[size])
        missing, unexpected = model.load_state_dict(sd, strict=True)
        assert not missing and not unexpected
        model.eval()
        forced_len = 12 if size == "tiny" else 6
        cases = make_cases(SEEDS[size], forced_len)
        tensors: dict[str, torch.Tensor] = {}
        manifest = []
        for n, case in enumerate(cases):
            forced = run_theirs(model, vallex_module, case, "forced")
            greedy = run_theirs(model, vallex_module, case, "greedy")
            assert forced["codes"].shape[0] == len(case["forced"]), "their AR stopped early"
            tensors[f"{n}.text"] = folded_ids(case)
            tensors[f"{n}.prompt"] = case["prompt"]
            tensors[f"{n}.forced"] = case["forced"]
            tensors[f"{n}.forced_codes"] = forced["codes"].long()
            tensors[f"{n}.greedy_codes"] = greedy["codes"].long()
            ar = torch.stack(forced["ar"])  # [forced_len + 1, 1025]
            for key, value in summarize(ar, COLS + [1024]).items():
                tensors[f"{n}.ar.{key}"] = value
            for level, rows in enumerate(forced["nar"], start=1):
                for key, value in summarize(rows, COLS).items():
                    tensors[f"{n}.nar{level}.{key}"] = value
            manifest.append({"enroll": case["enroll"], "prompt_lang": case["prompt_lang"],
                             "text_langs": case["text_langs"], "greedy_frames": int(greedy["codes"].shape[0])})
            print(f"{size} case {n}: text {len(case['text'])}, prompt {len(case['prompt'])}, "
                  f"greedy {greedy['codes'].shape[0]} frames")
        meta = {"upstream": f"Plachtaa/VALL-E-X@{UPSTREAM_COMMIT}", "seed": str(SEEDS[size]),
                "config": json.dumps(config.to_dict()), "cols": json.dumps(COLS), "cases": json.dumps(manifest)}
        write_tensor_json(out_dir / f"{size}.json", tensors, meta)
        print(f"wrote {out_dir / f'{size}.json'}")


if __name__ == "__main__":
    main()
