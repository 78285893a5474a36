"""Acoustic prompts: pieces of a speaker's other utterances, cut to a jittered target length.

The reference's `trim` returned a wrong-length piece when the prompt was shorter than asked
(docs/reference-differences.md #3); here every cut is either exactly the asked length or the whole (shorter) input, and
`trim_or_repeat` gives exactly the asked length by tiling a short input. Inference uses
`trim_or_repeat` for `--input-prompt-length`.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
from torch import Tensor


def trim(codes: Tensor, frames: int, rng: random.Random | None = None) -> Tensor:
    """At most `frames` frames of `codes` [T, ...]: a random window with `rng`, else the start.

    An input no longer than `frames` is returned whole.
    """
    if frames <= 0:
        raise ValueError(f"trim length must be positive, got {frames}")
    t = codes.shape[0]
    if t <= frames:
        return codes
    start = rng.randint(0, t - frames) if rng is not None else 0
    return codes[start:start + frames]


def trim_or_repeat(codes: Tensor, frames: int) -> Tensor:
    """Exactly `frames` frames: the start of a long input, or a short input tiled and cut."""
    if frames <= 0:
        raise ValueError(f"prompt length must be positive, got {frames}")
    t = codes.shape[0]
    if t == 0:
        raise ValueError("cannot repeat an empty prompt")
    if t >= frames:
        return codes[:frames]
    reps = -(-frames // t)
    return codes.repeat(reps, *([1] * (codes.dim() - 1)))[:frames]


def prompt_length(rng: random.Random, prompt_duration: float, frame_rate: float, jitter: float = 1.0) -> int:
    """Target prompt frames: prompt_duration seconds ± up to `jitter` seconds; 0 = no trimming."""
    if prompt_duration <= 0:
        return 0
    base = int(prompt_duration * frame_rate)
    j = int(round(jitter * frame_rate))
    return max(1, base + rng.randint(-j, j))


def max_prompt_length(prompt_duration: float, frame_rate: float, jitter: float = 1.0) -> int:
    """The longest `prompt_length` can return (0 = untrimmed)."""
    if prompt_duration <= 0:
        return 0
    return max(1, int(prompt_duration * frame_rate) + int(round(jitter * frame_rate)))


def sample_prompt(
    candidates: Sequence[int],
    load: Callable[[int], Tensor],
    rng: random.Random,
    *,
    trim_length: int,
    max_prompts: int = 3,
    random_utterance: float = 1.0,
) -> Tensor:
    """Join pieces of distinct candidates (drawn at random) until `trim_length` frames are reached.

    Each candidate longer than `trim_length` contributes a random window of it. Drawing stops after
    `max_prompts` pieces, when the candidates run out, or early with probability
    1 - `random_utterance` after each piece. The result has at most `trim_length` frames, exactly
    that when the drawn material suffices. `trim_length` 0 means one whole candidate.
    """
    if not candidates:
        raise ValueError("no prompt candidates")
    order = list(candidates)
    rng.shuffle(order)
    if trim_length <= 0:
        return load(order[0])
    pieces: list[Tensor] = []
    total = 0
    for idx in order[: max(1, max_prompts)]:
        piece = trim(load(idx), trim_length, rng)
        pieces.append(piece)
        total += piece.shape[0]
        if total >= trim_length or rng.random() > random_utterance:
            break
    return torch.cat(pieces, dim=0)[:trim_length]
