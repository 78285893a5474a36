"""Evaluation: objective speech metrics that run offline (`metrics`: MCD-DTW, F0, speaker
similarity, WER/CER) and the `python -m vall_e.eval` command that scores a list of items (`evaluate`)."""
