"""model.inference.features.ClipEncoder on a tiny random open_clip config (no downloads)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from model.errors import ModelError
from model.inference.features import ClipEncoder, frame_resizer, model_embed_dim, resolve_weights
from world import CLIP_TINY_CONFIG

TINY = str(CLIP_TINY_CONFIG)


@pytest.fixture(scope="module")
def encoder():
    return ClipEncoder.load(TINY, None, device="cpu", allow_random=True)


def test_dims_and_model_id(encoder):
    assert encoder.model_id == "clip_tiny:random"
    assert encoder.embed_dim == 32 == model_embed_dim(TINY)
    assert encoder.text_width == 32
    assert encoder.image_size == 32


def test_images_are_normalised_and_deterministic(encoder):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (61, 97, 3), dtype=np.uint8) for _ in range(3)]
    batch = torch.stack([encoder.preprocess_frame(f) for f in frames])
    assert batch.shape == (3, 3, 32, 32)
    feats = encoder.encode_images(batch)
    assert feats.shape == (3, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    again = ClipEncoder.load(TINY, None, device="cpu", allow_random=True).encode_images(batch)
    np.testing.assert_array_equal(feats, again)  # seeded random weights: every process builds the same model
    # The decode-worker path (resize in the worker, normalise in the actor) gives the same features.
    resize = frame_resizer(encoder.preprocess_cfg)
    np.testing.assert_allclose(encoder.encode_frames_uint8(np.stack([resize(f) for f in frames])), feats, atol=1e-6)


def test_text_tokens_are_ln_final_states_sot_to_eot(encoder):
    texts = ["a person walks in a doorway drinking some coffee.", "hi"]
    tokens = encoder.encode_text_tokens(texts)
    raw = encoder.tokenizer(texts)
    for feats, row in zip(tokens, raw):
        n = int((row == encoder.eot_token_id).nonzero()[0]) + 1
        assert feats.shape == (n, 32)
        assert row[0] == encoder.tokenizer.sot_token_id
    assert tokens[0].shape[0] == 12  # SOT + 10 words/punctuation + EOT, as the public features of this query
    # Pooled = EOT token's state @ text_projection: proves the per-token states are pre-projection, post-ln_final.
    pooled = encoder.encode_text(texts)
    for feats, p in zip(tokens, pooled):
        projected = torch.from_numpy(feats[-1]) @ encoder.model.text_projection.detach()
        np.testing.assert_allclose((projected / projected.norm()).numpy(), p, atol=1e-5)


def test_long_text_is_truncated_to_context(encoder):
    tokens = encoder.encode_text_tokens(["word " * 200])
    assert tokens[0].shape == (encoder.context_length, 32)


def test_missing_weights_offline_fail_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-vmr-cache")
    with pytest.raises(ModelError, match=r"ViT-B-32:openai.*--clip-pretrained"):
        ClipEncoder.load("ViT-B-32", "openai", device="cpu")


@pytest.mark.parametrize("model,pretrained,match", [
    ("ViT-B-32", None, "no CLIP weights"),
    ("ViT-B-32", "no-such-tag", "neither a checkpoint file nor a pretrained tag"),
    ("No-Such-Model", "openai", "unknown CLIP model"),
    ("/nonexistent/config.json", None, "config not found"),
])
def test_bad_choices_are_one_line_errors(model, pretrained, match):
    with pytest.raises(ModelError, match=match) as err:
        resolve_weights(model, pretrained, allow_random=False)
    assert "\n" not in str(err.value)


def test_local_checkpoint_file(tmp_path, encoder):
    path = tmp_path / "tiny.pt"
    torch.save(encoder.model.state_dict(), path)
    loaded = ClipEncoder.load(TINY, str(path), device="cpu")
    assert loaded.model_id == "clip_tiny:tiny.pt"
    x = torch.zeros(1, 3, 32, 32)
    np.testing.assert_allclose(loaded.encode_images(x), encoder.encode_images(x), atol=1e-6)
    assert os.path.isfile(path)
