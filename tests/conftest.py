"""Shared pytest fixtures and stand-ins. Keep this small: each one here is used by several test files."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vall_e.utils.errors import UserError


@pytest.fixture(scope="session")
def tiny_encodec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny calibrated EnCodec saved with `save_pretrained`; load it with `codec.model=<this dir>`."""
    from vall_e.codecs.tiny_encodec import make_tiny_encodec

    return make_tiny_encodec(tmp_path_factory.mktemp("tiny_encodec") / "model", seed=0)


@pytest.fixture
def seed() -> int:
    return 0


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    """A numpy generator from `seed`; torch's global generator is seeded with it too."""
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` or `soak` run only when asked for (`-m slow`, `-m soak`): the default suite
    stays within the CI budget, and `.ci/run` runs the slow ones in a second step."""
    import pytest

    expr = config.getoption("markexpr") or ""
    for item in items:
        for marker in ("slow", "soak"):
            if item.get_closest_marker(marker) and marker not in expr:
                item.add_marker(pytest.mark.skip(reason=f"{marker} test: run with -m {marker}"))


# The texts whose phonemes the shared tiny model's symbol map covers.
TINY_MODEL_TEXTS = ["Hello there, how are you?", "The quick brown fox jumps over the lazy dog.", "Good morning.",
                    "Another sentence. And one more!"]


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory, tiny_encodec_dir: Path) -> Path:
    """A tiny untrained ar+nar model over TINY_MODEL_TEXTS, exported with the tiny EnCodec's spec.
    Shared by the engine, server, web UI and eval tests, which only read it."""
    model, cfg, symmap = build_tiny_model(TINY_MODEL_TEXTS)
    return export_tiny_model(tmp_path_factory.mktemp("model") / "model.safetensors", model, cfg, symmap,
                             tiny_encodec_dir)


def export_tiny_model(path: Path, model, cfg, symmap, tiny_encodec_dir: Path) -> Path:
    """Write `model` (an untrained tiny VALLE) as an exported model file with the tiny EnCodec's spec,
    the way `vall_e.export` does, so tests load it through `TTS.from_pretrained`."""
    from vall_e.codecs import build_codec
    from vall_e.models.model_file import write_export
    from vall_e.text.languages import LanguageMap

    codec = build_codec({"name": "encodec", "model": str(tiny_encodec_dir)})
    write_export(path, {"ar+nar": model.state_dict()}, {"ar+nar": cfg.to_dict()}, symmap=symmap,
                 langmap=LanguageMap(), codec=codec.spec())
    return path


def build_tiny_model(texts: list[str], d_model: int = 32, n_heads: int = 2, n_layers: int = 2, **config):
    """A tiny untrained ar+nar VALLE (seeded), its config and a symbol map covering `texts`."""
    from vall_e.models.valle import VALLE, VALLEConfig
    from vall_e.text.phonemes import phonemize
    from vall_e.text.symmap import Symmap

    torch.manual_seed(0)
    symmap = Symmap.build([phonemize(t) for t in texts])
    cfg = VALLEConfig(kind="ar+nar", d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                      n_text_tokens=len(symmap) + 8, n_codes=1024, n_levels=8, dropout=0.0, **config)
    return VALLE(cfg), cfg, symmap


def write_reference(path: Path) -> Path:
    """2 s of speech-like audio at 24 kHz: a reference voice for engine tests."""
    from vall_e.codecs.tiny_encodec import speechlike_audio
    from vall_e.utils.audio import save_audio

    save_audio(path, speechlike_audio(2.0, seed=3), 24_000)
    return path


class FakeTTS:
    """Stands in for the engine in fast in-process tests: records what the server asks of it."""

    sample_rate = 24_000
    device = "cpu"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.batches: list[list[str]] = []
        self.encoded: list[str] = []

    def encode_reference(self, path, prompt_seconds):
        self.encoded.append(Path(path).name)
        return torch.zeros(10, 8, dtype=torch.long)

    def synthesize(self, texts, references, settings):
        texts = [texts] if isinstance(texts, str) else list(texts)
        self.batches.append(texts)
        time.sleep(self.delay)
        if "FAIL" in texts:
            raise UserError("the text 'FAIL' cannot be spoken")
        return [0.1 * torch.sin(torch.arange(2400) / 5.0) for _ in texts]

    def stream(self, text, prompt, settings):
        yield 0.1 * torch.sin(torch.arange(2400) / 5.0)


@pytest.fixture
def one_thread():
    """Small matrices: one thread is much faster than two on a busy 2-core machine (and the rounding is
    the same in every run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
