"""`DecodingConstraints`: what bounds one AR decode, whichever way its tokens are picked.

The AR picks level-0 codes either by sampling (`TokenSampler`, greedy included) or by beam search
(`BeamSearch`). Both go through one `DecodingConstraints`, so a setting means the same under both:

logits processors (`process`, before a token is picked)
    1. repetition penalty over the row's own history,
    2. length penalty on STOP (by the row's length),
    3. STOP floor: STOP is banned while a row is shorter than its floor (premature stops),
    4. step cap: a row at its cap can only STOP;
stopping rule (`repeat_codes`)
    5. a code that a row has already repeated `max_repeat_frames` times in a row ends it: a sampler
       replaces that draw by STOP (`finish`), a beam search moves the code's probability to STOP
       (`fold_repeats`), which is the same thing for the distribution;
context (`forgotten_slot`)
    6. with `max_ar_context` > 0 the AR attends to only the most recent frames: after each forward
       step, the slot of the oldest generated step is marked invalid.

Rows are the decode's rows: texts for sampling, texts x beams for a beam search (`expand`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from vall_e.generation.sampling import PAD_ID, SamplingParams, apply_length_penalty, apply_repetition_penalty


class DecodingConstraints:
    """The AR's logits processors and stopping rule for one batch (see the module docstring).

    max_steps: per row, the most frames (then STOP is forced); min_steps: per row, the frames before
    which STOP is banned (clamped to max_steps); group: frames per forward step (`ar_group`), which the
    context rule counts in.
    """

    def __init__(self, params: SamplingParams, stop_id: int, max_steps: Sequence[int],
                 min_steps: Sequence[int] | None = None, max_repeat_frames: int = 150, group: int = 1,
                 device: torch.device | str | None = None, pad_id: int = PAD_ID) -> None:
        self.params, self.stop_id, self.pad_id = params, stop_id, pad_id
        self.max_repeat_frames, self.group = int(max_repeat_frames), int(group)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.caps = torch.as_tensor(list(max_steps), dtype=torch.long, device=self.device)
        floor = list(min_steps) if min_steps is not None else [0] * len(self.caps)
        self.floor = torch.as_tensor(floor, dtype=torch.long, device=self.device).clamp(max=self.caps)
        self.floor_frames = int(self.floor.max()) if len(self.floor) else 0  # no row bans STOP past this
        self.min_cap = int(self.caps.min()) if len(self.caps) else 0  # no row is capped before this

    @property
    def limit(self) -> int:
        """The longest any row may run."""
        return int(self.caps.max())

    def expand(self, repeats: int) -> "DecodingConstraints":
        """The same constraints for `repeats` consecutive rows per row (a beam search's beams)."""
        return DecodingConstraints(self.params, self.stop_id, self.caps.repeat_interleave(repeats).tolist(),
                                   self.floor.repeat_interleave(repeats).tolist(), self.max_repeat_frames,
                                   self.group, self.device, self.pad_id)

    # ------------------------------------------------------------------ logits processors
    @property
    def needs_history(self) -> bool:
        """Whether `process` reads the rows' history (the repetition penalty is on)."""
        return self.params.repetition_penalty != 1.0

    def process(self, logits: Tensor, history: Tensor | None, lengths: Tensor, frame: int,
                last_frame: int | None = None) -> Tensor:
        """Steps 1-4 on float32 logits [R, V]: `history` [R, t] (pad_id = empty), `lengths` [R] frames
        generated per row, `frame` the frame about to be picked (it skips the checks no row needs); when
        rows are at different frames (Medusa decoding), `frame` is the smallest and `last_frame` the
        largest."""
        last_frame = frame if last_frame is None else last_frame
        p = self.params
        x = apply_repetition_penalty(logits.float(), history, p.repetition_penalty, p.repetition_penalty_decay,
                                     self.pad_id)
        x = apply_length_penalty(x, lengths, self.stop_id, p.length_penalty)
        if frame < self.floor_frames:  # too early to stop: ban STOP for the rows below their floor
            x = x.clone()
            x[:, self.stop_id] = torch.where(lengths < self.floor, -torch.inf, x[:, self.stop_id])
        if last_frame >= self.min_cap:  # a row at its cap can only stop
            capped = (lengths >= self.caps).unsqueeze(-1)
            only_stop = torch.full_like(x, -torch.inf)
            only_stop[:, self.stop_id] = 0.0
            x = torch.where(capped, only_stop, x)
        return x

    # ------------------------------------------------------------------ stopping rule
    def repeat_codes(self, history: Tensor, frame: int) -> Tensor | None:
        """Per row, the code that would end it (its last `max_repeat_frames` frames are all this code),
        else -1; None when no row can be looping yet. `history` [R, >= frame] holds the frames so far."""
        M = self.max_repeat_frames
        if frame < M or M <= 0:
            return None
        recent = history[:, frame - M:frame]
        same = (recent == recent[:, -1:]).all(-1) & (recent[:, -1] != self.pad_id)
        return torch.where(same, recent[:, -1], torch.full_like(recent[:, -1], -1))

    def finish(self, tokens: Tensor, history: Tensor, frame: int) -> tuple[Tensor, Tensor]:
        """The stopping rule on drawn tokens: (tokens with looping draws replaced by STOP, looping [R])."""
        codes = self.repeat_codes(history, frame)
        if codes is None:
            return tokens, torch.zeros_like(tokens, dtype=torch.bool)
        looping = (tokens == codes) & (tokens != self.stop_id)
        return torch.where(looping, torch.full_like(tokens, self.stop_id), tokens), looping

    def fold_repeats(self, logits: Tensor, history: Tensor, frame: int) -> Tensor:
        """The stopping rule for a search: a looping code's probability goes to STOP (what a sampler's
        draw of that code turns into)."""
        codes = self.repeat_codes(history, frame)
        if codes is None:
            return logits
        rows = codes >= 0
        index = codes.clamp(min=0).unsqueeze(-1)
        code_logit = logits.gather(-1, index).squeeze(-1)
        stop = logits[:, self.stop_id]
        merged = torch.logaddexp(stop, code_logit)
        out = logits.clone()
        out[:, self.stop_id] = torch.where(rows, merged, stop)
        out.scatter_(-1, index, torch.where(rows, -torch.inf, code_logit).unsqueeze(-1))
        return out

    # ------------------------------------------------------------------ context
    @property
    def context_steps(self) -> int:
        """Forward steps the AR keeps in view (0 = all): `max_ar_context` frames in groups."""
        c = self.params.max_ar_context
        return -(-c // self.group) if c and c > 0 else 0

    def forgotten_slot(self, step: int, prefix_len: int) -> int | None:
        """The cache slot to mark invalid before forward step `step + 1` (feeding step `step`'s frames),
        or None: with a rolling context, the oldest generated step's slot."""
        keep = self.context_steps
        if not keep:
            return None
        drop = prefix_len + step + 1 - keep
        return drop if drop >= prefix_len else None
