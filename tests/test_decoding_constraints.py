"""Beam search and sampling share one `DecodingConstraints`: every constraint changes a beam search's
result exactly as it changes greedy sampling's (issue K, build point 1).

A scripted AR model stands in for the network: its logits are a fixed function of the frames it can
see, with margins so wide that a beam search finds the greedy sequence. So with a constraint off,
beam == greedy; with it on, both must move to the same, known sequence.
"""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from vall_e.generation.constraints import DecodingConstraints
from vall_e.generation.sampling import SamplingParams
from vall_e.generation.tts import TTS
from vall_e.models.valle import ARState

N_CODES = 8
STOP = N_CODES
PREFIX = 3


class ScriptedAR:
    """`ar_prefill`/`ar_step` like `VALLE`, with logits = script(visible generated frames, frames so far)."""

    def __init__(self, script):
        self.script = script
        self.config = SimpleNamespace(ar_group=1, n_codes=N_CODES, n_levels=1, max_positions=10_000)

    def _logits(self, state: ARState) -> torch.Tensor:
        rows = []
        for b in range(state.valid.shape[0]):
            fed = state.cache[b, PREFIX:state.length]
            seen = state.valid[b, PREFIX:state.length]
            rows.append(self.script(fed[seen].tolist(), len(fed)))
        return torch.tensor(rows, dtype=torch.float32)

    def ar_prefill(self, text, lang, prompt, max_length):
        B = len(text)
        cache = torch.full((B, PREFIX + max_length), -1, dtype=torch.long)
        valid = torch.zeros(B, PREFIX + max_length, dtype=torch.bool)
        valid[:, :PREFIX] = True
        state = ARState(cache=cache, valid=valid, length=PREFIX, causal=torch.ones(B, dtype=torch.bool),
                        prefix=PREFIX)
        return self._logits(state), state

    def ar_step(self, tokens, state):
        state.cache[:, state.length] = tokens
        state.valid[:, state.length] = True
        state.length += 1
        return self._logits(state), state


def prefers_one(seen, n, stop_at=4):
    """Code 1 (then 2, then 3) by wide margins; STOP far down until `stop_at` frames, then on top and
    rising."""
    logits = [0.0] * (N_CODES + 1)
    logits[1], logits[2], logits[3] = 100.0, 80.0, 60.0
    logits[STOP] = -100.0 if n < stop_at else 110.0 + 100.0 * (n - stop_at)
    return logits


def counts_what_it_sees(seen, n, stop_at=4):
    """Code (number of visible generated frames + 1): a shorter context gives other codes."""
    logits = [0.0] * (N_CODES + 1)
    logits[min(len(seen), 3) + 1] = 100.0
    logits[STOP] = -100.0 if n < stop_at else 110.0 + 100.0 * (n - stop_at)
    return logits


def engine(script) -> TTS:
    tts = TTS.__new__(TTS)  # only what generate_ar uses
    tts.ar_model, tts.stop_id, tts.device = ScriptedAR(script), STOP, torch.device("cpu")
    return tts


def decode(script, params, n=1, max_steps=(20,), min_steps=None, max_repeat_frames=150):
    tts = engine(script)
    text = [torch.ones(5, dtype=torch.long)] * n
    prompts = [torch.zeros(4, 1, dtype=torch.long)] * n
    out = tts.generate_ar(text, torch.zeros(n, dtype=torch.long), prompts, params, list(max_steps),
                          max_repeat_frames, list(min_steps) if min_steps is not None else None)
    return [o.tolist() for o in out]


GREEDY = SamplingParams(temperature=0.0, ras_window=0)
BEAM = replace(GREEDY, temperature=1.0, beam_width=3)

# constraint -> (script, settings that turn it on, greedy result without, with)
CASES = {
    "repetition_penalty": (prefers_one, {"ar": {"repetition_penalty": 2.0}}, [1, 1, 1, 1], [1, 2, 3, 1]),
    "length_penalty": (prefers_one, {"ar": {"length_penalty": 0.5}}, [1, 1, 1, 1], [1] * 6),
    "stop_floor": (prefers_one, {"min_steps": [6]}, [1, 1, 1, 1], [1] * 6),
    "max_repeat_frames": (prefers_one, {"max_repeat_frames": 2}, [1, 1, 1, 1], [1, 1]),
    "max_ar_context": (counts_what_it_sees, {"ar": {"max_ar_context": 3}}, [1, 2, 3, 4], [1, 2, 3, 3]),
    "max_steps": (prefers_one, {"max_steps": [2]}, [1, 1, 1, 1], [1, 1]),
}


def _run(script, params, on: dict):
    kw = {k: v for k, v in on.items() if k != "ar"}
    return decode(script, replace(params, **on.get("ar", {})), **kw)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_each_constraint_changes_beam_search_as_it_changes_sampling(name):
    script, on, without, with_ = CASES[name]
    assert _run(script, GREEDY, {}) == without
    assert _run(script, GREEDY, on) == with_  # the constraint acts under sampling ...
    assert _run(script, BEAM, {}) == without  # ... the scripted model makes beam == greedy ...
    assert _run(script, BEAM, on) == with_  # ... and it acts the same way under beam search


def test_per_row_floors_and_caps_follow_their_own_text_in_a_beam_batch():
    got = decode(prefers_one, BEAM, n=3, max_steps=[20, 20, 2], min_steps=[0, 6, 0])
    assert got == [[1, 1, 1, 1], [1] * 6, [1, 1]]
    assert got == decode(prefers_one, GREEDY, n=3, max_steps=[20, 20, 2], min_steps=[0, 6, 0])


def test_the_repeat_rule_moves_a_looping_codes_probability_to_stop():
    rules = DecodingConstraints(GREEDY, STOP, [20, 20], max_repeat_frames=2)
    history = torch.tensor([[5, 1, 1], [1, 2, 1]])
    logits = torch.tensor(prefers_one([], 0)).repeat(2, 1)
    folded = rules.fold_repeats(logits, history, 3)
    assert folded[0, 1] == -torch.inf and folded[0, STOP] == pytest.approx(100.0)  # row 0 loops on code 1
    assert torch.equal(folded[1], logits[1])  # row 1 does not
    tokens, looping = rules.finish(torch.tensor([1, 1]), history, 3)
    assert tokens.tolist() == [STOP, 1] and looping.tolist() == [True, False]
