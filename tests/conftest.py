"""Shared fixtures: a tiny random Whisper, the shared speech data, the embedded tiny.en."""

from __future__ import annotations

import os
from pathlib import Path

# On a small shared CPU, OpenMP threads that spin while waiting make small ops 10-30x slower;
# this must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ASRPRUNE_SHARED_DATA", REPO.parent / "shared" / "data"))


def make_tiny_whisper(seed: int = 0, **overrides):
    """A random WhisperForConditionalGeneration of hidden size 16, 2+2 layers, 4 heads, vocab 200.

    Same shape family as transformers' ``WhisperModelTester``; input features are (B, 80, 60).
    """
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    kwargs = dict(
        vocab_size=200,
        num_mel_bins=80,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=30,
        max_target_positions=40,
        pad_token_id=0,
        bos_token_id=98,
        eos_token_id=98,
        decoder_start_token_id=85,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(**kwargs))
    model.eval()
    return model


@pytest.fixture
def tiny_whisper():
    return make_tiny_whisper()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared speech data not found at {SHARED_DATA} (set ASRPRUNE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_en():
    """The embedded whisper tiny.en (converted once into the cache), fp32 on CPU."""
    from asrprune.models import load_model

    return load_model("tiny.en")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2+2-layer Whisper with tiny.en's vocabulary, processor and generation config.

    Hidden size 16, 30 s inputs (1500 encoder positions), so real features, real token ids
    (teacher forcing in the sensitivity analysis) and load_model all work as for tiny.en.
    """
    from transformers import GenerationConfig, WhisperProcessor

    from asrprune.models import resolve_model_dir

    src = resolve_model_dir("tiny.en")
    d = tmp_path_factory.mktemp("tiny_model")
    model = make_tiny_whisper(
        vocab_size=51864, max_source_positions=1500, max_target_positions=64,
        pad_token_id=50256, bos_token_id=50257, eos_token_id=50256, decoder_start_token_id=50257,
    )
    model.generation_config = GenerationConfig.from_pretrained(src)
    model.save_pretrained(d)
    WhisperProcessor.from_pretrained(src).save_pretrained(d)
    return d
