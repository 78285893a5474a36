"""Generation: text + a reference voice -> speech with a trained model.

`tts` holds the engine (`TTS`: KV-cached batched AR decoding, batched NAR passes, streaming),
`sampling` turns logits into tokens (filters, penalties, mirostat, beam search, counter-based
randomness) and `settings` the `GenerationSettings` that shape one synthesis.
"""
from vall_e.generation.sampling import SamplingParams
from vall_e.generation.settings import GenerationSettings
from vall_e.generation.tts import TTS

__all__ = ["GenerationSettings", "SamplingParams", "TTS"]
