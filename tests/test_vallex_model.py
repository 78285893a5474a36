"""The VALL-E X port against the original code, logit for logit.

Fixtures: tests/fixtures/vallex/{tiny,full}.json (tensors as text, tests/tensor_fixtures.py), made by scripts/make_vallex_fixtures.py from
Plachtaa/VALL-E-X@3faaf8c's own model with random weights (`random_state_dict(config, seed)`, norms,
biases and alphas perturbed). The same weights are regenerated here from the seed, converted by the
checkpoint loader, and run through this engine's decoding contract: KV-cached prefill + one-token
steps (one sample at a time and all three left-padded in one batch), the no-cache path, batched NAR
passes, and greedy decoding through `TTS.generate_ar` / `generate_nar`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vall_e.models.vallex import VallexConfig
from vall_e.models.vallex_checkpoint import build_from_state_dict, random_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


from tests.tensor_fixtures import read_tensor_json

FIXTURES = Path(__file__).parent / "fixtures" / "vallex"
TOL = 1e-4


def load_fixture(size: str):
    tensors, meta = read_tensor_json(FIXTURES / f"{size}.json")
    config = VallexConfig.from_dict(json.loads(meta["config"]))
    cases = json.loads(meta["cases"])
    cols = json.loads(meta["cols"])
    model = build_from_state_dict(random_state_dict(config, int(meta["seed"])), f"seed {meta['seed']}",
                                  n_heads=config.n_heads, nar_prompt_all_levels=config.nar_prompt_all_levels)
    assert model.config == config
    return model, tensors, cases, cols


def check_rows(rows: torch.Tensor, tensors: dict, prefix: str, cols: list[int]) -> float:
    """Our logits rows [R, V] against the stored slices: columns, argmax, logsumexp. Returns the max diff."""
    ref_cols = tensors[f"{prefix}.cols"]
    assert rows.shape[0] == ref_cols.shape[0], f"{prefix}: {rows.shape[0]} rows, expected {ref_cols.shape[0]}"
    diff = max(float((rows[:, cols] - ref_cols).abs().max()),
               float((torch.logsumexp(rows, -1) - tensors[f"{prefix}.lse"]).abs().max()))
    assert diff < TOL, f"{prefix}: max abs logit diff {diff:.2e}"
    assert torch.equal(rows.argmax(-1), tensors[f"{prefix}.argmax"]), f"{prefix}: argmax differs"
    return diff


def run_ar_cached(model, texts, prompts, forced):
    """Teacher-forced AR logits through ar_prefill + ar_step, all samples in one (left-padded) batch."""
    n = max(len(f) for f in forced)
    logits, state = model.ar_prefill(texts, None, prompts, max_length=n)
    rows = [logits]
    for t in range(n):
        tokens = torch.stack([f[t] if t < len(f) else torch.tensor(0) for f in forced])
        logits, state = model.ar_step(tokens, state)
        rows.append(logits)
    out = torch.stack(rows, 1)  # [B, n + 1, V]
    return [out[i, : len(f) + 1] for i, f in enumerate(forced)]


def compare_size(size: str, batched_only: bool = False, levels: tuple[int, ...] = tuple(range(1, 8))) -> dict[str, float]:
    model, tensors, cases, cols = load_fixture(size)
    ids = range(len(cases))
    texts = [tensors[f"{n}.text"] for n in ids]
    prompts = [tensors[f"{n}.prompt"] for n in ids]
    forced = [tensors[f"{n}.forced"] for n in ids]
    worst = {"ar": 0.0, "nar": 0.0}
    with torch.inference_mode():
        runs = [run_ar_cached(model, texts, prompts, forced)]  # batched
        if not batched_only:
            runs.append([run_ar_cached(model, [texts[n]], [prompts[n]], [forced[n]])[0] for n in ids])
            runs.append(model.ar_full(texts, None, prompts, forced))
        for rows_per_case in runs:
            for n in ids:
                worst["ar"] = max(worst["ar"], check_rows(rows_per_case[n], tensors, f"{n}.ar", cols + [1024]))
        codes = [tensors[f"{n}.forced_codes"] for n in ids]
        for level in levels:
            logits = model.nar_pass(texts, None, prompts, [c[:, :level] for c in codes], level)
            for n in ids:
                worst["nar"] = max(worst["nar"], check_rows(logits[n], tensors, f"{n}.nar{level}", cols))
    return worst


def greedy_codes(model, tensors, n_cases):
    """Greedy AR + NAR through the TTS engine's own loops (batched), with their step limit (16
    frames per text token, +1 without BOS as their loop counts it) and no early-stop heuristics."""
    from vall_e.generation.tts import TTS
    from vall_e.generation.sampling import SamplingParams

    from vall_e.text.symmap import Symmap

    tts = TTS({"ar+nar": model}, {"symmap": Symmap().to_json()}, codec=None)
    texts = [tensors[f"{n}.text"] for n in range(n_cases)]
    prompts = [tensors[f"{n}.prompt"] for n in range(n_cases)]
    greedy = SamplingParams(temperature=0.0, ras_window=0)
    langs = torch.zeros(n_cases, dtype=torch.long)
    extra = 0 if model.config.prepend_bos else 1
    level0 = tts.generate_ar(texts, langs, prompts, greedy, [16 * len(t) + extra for t in texts],
                             max_repeat_frames=10**6)
    return tts.generate_nar(texts, langs, prompts, level0, greedy, max_levels=7)


def test_tiny_logits_match_original():
    worst = compare_size("tiny")
    print(f"tiny: max abs logit diff AR {worst['ar']:.2e}, NAR {worst['nar']:.2e}")
    assert worst["ar"] < TOL and worst["nar"] < TOL


def test_tiny_greedy_codes_match_original():
    model, tensors, cases, _ = load_fixture("tiny")
    ours = greedy_codes(model, tensors, len(cases))
    for n, codes in enumerate(ours):
        ref = tensors[f"{n}.greedy_codes"]
        assert codes.shape == ref.shape, f"case {n}: {tuple(codes.shape)} vs {tuple(ref.shape)}"
        assert torch.equal(codes.cpu(), ref), f"case {n}: codes differ"


def test_tiny_forced_nar_codes_match_original():
    """Their NAR's argmax choices are what our NAR picks from the same inputs."""
    model, tensors, cases, _ = load_fixture("tiny")
    with torch.inference_mode():
        for n in range(len(cases)):
            codes = tensors[f"{n}.forced_codes"]
            for level in range(1, 8):
                logits = model.nar_pass([tensors[f"{n}.text"]], None, [tensors[f"{n}.prompt"]],
                                        [codes[:, :level]], level)[0]
                assert torch.equal(logits.argmax(-1), codes[:, level])


@pytest.mark.parametrize("shape", ["amphion_a", "amphion_b"])
def test_amphion_shaped_logits_and_greedy_codes_match_original(shape):
    """Amphion's VALLE (512 text tokens, no language embedding): a = no BOS, prompt frames sum all
    levels (prefix_mode 1), tied heads; b = BOS, prompt frames sum the levels below k (prefix_mode 0),
    untied heads."""
    worst = compare_size(shape)
    print(f"{shape}: max abs logit diff AR {worst['ar']:.2e}, NAR {worst['nar']:.2e}")
    model, tensors, cases, _ = load_fixture(shape)
    for n, codes in enumerate(greedy_codes(model, tensors, len(cases))):
        assert torch.equal(codes.cpu(), tensors[f"{n}.greedy_codes"]), f"case {n}: codes differ"


def test_full_size_logits_match_original():
    """The real size (1024/16/12, 370M parameters): the batched KV-cached AR and the first and last
    NAR levels (the slow test below covers every path, level and greedy decoding)."""
    torch.set_num_threads(2)  # big matrices: both cores
    worst = compare_size("full", batched_only=True, levels=(1, 7))
    print(f"full: max abs logit diff AR {worst['ar']:.2e}, NAR {worst['nar']:.2e}")
    assert worst["ar"] < TOL and worst["nar"] < TOL


@pytest.mark.slow
def test_full_size_logits_and_greedy_match_original():
    worst = compare_size("full")
    print(f"full: max abs logit diff AR {worst['ar']:.2e}, NAR {worst['nar']:.2e}")
    assert worst["ar"] < TOL and worst["nar"] < TOL
    model, tensors, cases, _ = load_fixture("full")
    for n, codes in enumerate(greedy_codes(model, tensors, len(cases))):
        assert torch.equal(codes.cpu(), tensors[f"{n}.greedy_codes"]), f"case {n}: codes differ"


def test_a_wrong_mapping_is_caught():
    """The fixture comparison can fail: swapping two stage vectors (a plausible mapping bug) is caught."""
    model, tensors, cases, cols = load_fixture("tiny")
    with torch.no_grad():
        model.nar_stages.data = model.nar_stages.data[[1, 0, 2, 3, 4, 5, 6]]
        logits = model.nar_pass([tensors["0.text"]], None, [tensors["0.prompt"]],
                                [tensors["0.forced_codes"][:, :1]], 1)[0]
    with pytest.raises(AssertionError):
        check_rows(logits, tensors, "0.nar1", cols)
