"""`GenerationSettings`: everything that shapes one synthesis besides the text and the voice.

The AR and NAR stages each have their `SamplingParams`; the rest bounds the decoding (step cap,
NAR levels, the repeat guard, the STOP floor) and shapes the output (prompt length, language,
sentence splitting and the pauses between sentences).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vall_e.generation.sampling import SamplingParams


@dataclass
class GenerationSettings:
    """Everything that shapes one synthesis besides the text and the voice."""

    ar: SamplingParams = field(default_factory=SamplingParams.ar_defaults)
    nar: SamplingParams = field(default_factory=SamplingParams.nar_defaults)
    max_ar_steps: int = 0  # user cap on AR frames; 0 = follow the text length only
    max_nar_levels: int = 7  # NAR passes (levels 1..max_nar_levels)
    input_prompt_length: float = 3.0  # seconds of reference used as the prompt; 0 = all of it
    max_repeat_frames: int = 150  # a level-0 code repeated this many frames in a row ends the sequence
    min_frames_per_phoneme: float = 1.0  # STOP is banned before this many frames per phoneme (premature stops)
    language: str = "en"
    split_sentences: bool = True
    pause: float = 0.25  # seconds of silence between joined sentences
    # what the reference says: models whose text front end reads it (converted VALL-E X / Amphion
    # checkpoints) put it before the text and take the whole reference as the prompt; others ignore it
    reference_text: str = ""
