"""Data-prep commands of the reference (`python -m vall_e.emb.g2p`, `python -m vall_e.emb.qnt`) and
the per-utterance file formats they write, thin over `vall_e.text` and `vall_e.codecs`; before them,
`python -m vall_e.emb.transcribe` makes transcribed utterances from long recordings (Whisper)."""
