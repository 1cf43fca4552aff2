"""LLM blocks: equivalence with transformers' LlamaDecoderLayer, loading only chosen layers from a transformers
directory or a Meta consolidated.pth, and one-line errors for missing weights."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.config import ModelConfig
from model.errors import ModelError
from model.net.llm_blocks import HF_TO_META, LlamaBlock, LLMBlocks, load_llm_layers
from model.net.llmepet import build_model


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms so a mix-up of the two norms would show
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_hf_layers_load_and_match_llama_decoder_layer(tiny_llama_dir):
    path, hf = tiny_llama_dir
    spec, weights = load_llm_layers(str(path), 1, 3)
    assert (spec["llm_dim"], spec["llm_heads"], spec["llm_kv_heads"], spec["llm_ffn_dim"]) == (64, 4, 2, 96)
    assert {k.split(".")[0] for k in weights} == {"0", "1"}  # only the two chosen layers were read
    torch.testing.assert_close(weights["0.attention.wq.weight"], hf.model.layers[1].self_attn.q_proj.weight)

    block = LlamaBlock(64, 4, 2, 96, 1e-6)
    block.load_state_dict({k[2:]: v for k, v in weights.items() if k.startswith("1.")})
    hf_layer = hf.model.layers[2].eval()
    hf_layer.self_attn.is_causal = False  # the authors use the blocks bidirectionally ...
    x = torch.randn(3, 7, 64)
    no_rotary = (torch.ones(3, 7, 16), torch.zeros(3, 7, 16))  # ... and without rotary embedding
    with torch.no_grad():
        expected = hf_layer(x, attention_mask=None, position_embeddings=no_rotary)
        expected = expected[0] if isinstance(expected, tuple) else expected
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-4)


def test_meta_consolidated_matches_hf(tiny_llama_dir, tmp_path):
    path, hf = tiny_llama_dir
    meta = {}
    for i, layer in enumerate(hf.model.layers):
        for hf_name, meta_name in HF_TO_META.items():
            meta[f"layers.{i}.{meta_name}"] = layer.state_dict()[hf_name].clone()
    meta["tok_embeddings.weight"] = torch.zeros(50, 64)
    torch.save(meta, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-6}))
    spec, weights = load_llm_layers(str(tmp_path / "consolidated.00.pth"), 2, 4)
    _, hf_weights = load_llm_layers(str(path), 2, 4)
    assert spec["llm_heads"] == 4 and spec["llm_kv_heads"] == 2 and set(weights) == set(hf_weights)
    for k in weights:
        torch.testing.assert_close(weights[k], hf_weights[k])  # within-head q/k order does not matter here


def test_build_model_reads_llm_shapes(tiny_llama_dir):
    path, hf = tiny_llama_dir
    cfg = ModelConfig(llm=str(path), llm_layers="1:3", llm_dim=4096, hidden_dim=32, nheads=4, dim_feedforward=48,
                      num_dummies=3, total_prompts=4, num_queries=5, txt_dim=16, vid_dim=10)
    model = build_model(cfg)
    assert model.cfg.llm_dim == 64 and model.cfg.llm_kv_heads == 2 and len(model.llm.blocks) == 2
    assert not any(p.requires_grad for p in model.llm.blocks.parameters())
    torch.testing.assert_close(model.llm.blocks[1].feed_forward.w3.weight, hf.model.layers[2].mlp.up_proj.weight)
    txt, vid = torch.randn(1, 3, 16), torch.randn(1, 6, 10)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(txt, torch.ones(1, 3), vid, torch.ones(1, 6))["pred_spans"]).all()
    with pytest.raises(ModelError, match="beyond"):
        load_llm_layers(str(path), 2, 9)


def test_missing_weights_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for source in ("nobody-here/no-such-llama", str(tmp_path / "missing" / "consolidated.00.pth")):
        with pytest.raises(ModelError) as err:
            load_llm_layers(source, 14, 17)
        assert "\n" not in str(err.value)


def test_time_mode_masks_padding_batch_mode_mixes_batch():
    torch.manual_seed(0)
    blocks = LLMBlocks(8, 32, 1, 2, 2, 48, 1e-6, attention="time").eval()
    x = torch.randn(5, 2, 8)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        y = blocks(x, padding)
        y_short = blocks(x[:3, 1:], padding[1:, :3])
        torch.testing.assert_close(y[:3, 1], y_short[:, 0], atol=1e-5, rtol=1e-4)
        blocks.attention = "batch"
        y_batch = blocks(x, None)
        assert (y_batch[:, 0] - blocks(x[:, :1], None)[:, 0]).abs().max() > 1e-4
        # at batch size 1 each time step attends only to itself: a fixed per-token map
        y_one = blocks(x[:, :1], None)
        torch.testing.assert_close(y_one[2], blocks(x[2:3, :1], None)[0], atol=1e-5, rtol=1e-4)


def test_sharded_safetensors(tiny_llama_dir, tmp_path):
    _, hf = tiny_llama_dir
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _, weights = load_llm_layers(str(tmp_path), 3, 4)
    torch.testing.assert_close(weights["0.feed_forward.w2.weight"], hf.model.layers[3].mlp.down_proj.weight)
