"""The converter maps a state_dict laid out with the authors' parameter names (and their argparse options) onto
our model: same predictions, configuration read from shapes and options, unused tensors dropped."""
from __future__ import annotations

import argparse

import pytest
import torch

from model.inference.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.inference.convert import (UNUSED_PREFIXES, authors_key_to_ours, convert_authors_checkpoint,
                                     convert_state_dict, ours_key_to_authors)
from model.errors import ModelError
from model.net.llmepet import LLMEPET

from tests.test_model import make_batch


def authors_like_model():
    """Our model configured as a converted one (LLM width 256 = 2 heads of 128, as their blocks assume)."""
    cfg = ModelConfig(llm="", llm_dim=256, llm_heads=2, llm_kv_heads=2, llm_ffn_dim=64, llm_layers="14:16",
                      hidden_dim=32, nheads=4, dim_feedforward=48, num_dummies=3, total_prompts=4, num_prompts=2,
                      num_queries=5, enc_layers=2, dec_layers=2, t2v_layers=2, txt_dim=16, vid_dim=10, max_q_l=20,
                      compat="authors")
    torch.manual_seed(0)
    model = LLMEPET(cfg).eval()
    with torch.no_grad():
        for p in model.llm.blocks.parameters():
            p.normal_(0, 0.05)
    return model


def authors_state(model):
    state = {ours_key_to_authors(k): v.clone() for k, v in model.state_dict().items()}
    # tensors their model builds but never uses
    state["token_fc.weight"] = torch.zeros(3, 75)
    state["token_fc.bias"] = torch.zeros(3)
    state["llama_dim_mapper1.weight"] = torch.zeros(256, 32)
    state["txt_proj_linear.net.1.weight"] = torch.zeros(32, 16)
    return state


def authors_opt():
    return argparse.Namespace(dset_name="hl", first_layer=14, n_layers=16, nheads=4, dim_feedforward=48,
                              dropout=0.1, input_dropout=0.5, num_prompts=2, aux_loss=True, span_loss_type="l1",
                              clip_length=2, max_q_l=20, max_v_l=75, ctx_mode="video_tef",
                              v_feat_dirs=["features/qvhighlights/clip_features"], t_feat_dir="x/clip_text_features",
                              lw_saliency=1.0, event_coef=0.1)


def test_key_map_round_trip():
    model = authors_like_model()
    for key in model.state_dict():
        assert authors_key_to_ours(ours_key_to_authors(key)) == key
    assert ours_key_to_authors("llm.blocks.1.attention.wq.weight") == "transformer.llama.layers.1.attention.wq.weight"
    assert ours_key_to_authors("vid_proj.0.linear.weight") == "input_vid_proj.0.net.1.weight"
    assert all(authors_key_to_ours(p + "weight") is None for p in UNUSED_PREFIXES)
    with pytest.raises(ModelError):
        authors_key_to_ours("something_new.weight")


def test_converted_state_dict_gives_the_same_predictions():
    model = authors_like_model()
    cfg, state = convert_state_dict(authors_state(model), authors_opt())
    assert (cfg.hidden_dim, cfg.num_dummies, cfg.total_prompts, cfg.num_queries) == (32, 3, 4, 5)
    assert (cfg.enc_layers, cfg.dec_layers, cfg.t2v_layers, cfg.n_input_proj) == (2, 2, 2, 2)
    assert (cfg.llm_dim, cfg.llm_heads, cfg.llm_ffn_dim, cfg.llm_layers) == (256, 2, 64, "14:16")
    assert cfg.compat == "authors" and cfg.llm_attention == "batch" and cfg.t2v_cross_sample_mask and not cfg.event_loss
    converted = LLMEPET(cfg).eval()
    converted.load_state_dict(state, strict=True)
    txt, tm, vid, vm = make_batch([7, 5, 3], [4, 2, 3], seed=3)
    with torch.no_grad():
        a, b = model(txt, tm, vid, vm), converted(txt, tm, vid, vm)
    for k in ("pred_spans", "pred_logits", "saliency_scores"):
        assert (a[k] - b[k]).abs().max() <= 1e-6


def test_convert_checkpoint_file(tmp_path):
    model = authors_like_model()
    src, out = tmp_path / "theirs.ckpt", tmp_path / "ours.ckpt"
    torch.save({"model": authors_state(model), "opt": authors_opt(), "epoch": 3}, src)
    convert_authors_checkpoint(str(src), str(out))
    loaded, ckpt = load_checkpoint(str(out))
    assert ckpt["dataset"] == "qvhighlights" and ckpt["feature_spec"]["video_kinds"] == ["clip"]
    assert ckpt["feature_spec"]["video_dims"] == [8] and ckpt["data_config"]["max_q_l"] == 20
    assert not any(p.requires_grad for p in loaded.llm.blocks.parameters())
    txt, tm, vid, vm = make_batch([6, 4], [3, 3], seed=4)
    with torch.no_grad():
        a, b = model(txt, tm, vid, vm), loaded(txt, tm, vid, vm)
    assert (a["pred_spans"] - b["pred_spans"]).abs().max() <= 1e-6
    assert (a["saliency_scores"] - b["saliency_scores"]).abs().max() <= 1e-6


def test_llm_blocks_reference_and_copy(tmp_path):
    """--llm-blocks reference: the converted file names its source and the blocks' digest; predictions equal the
    embedded copy's; a missing or changed source is one line naming it and the fix."""
    model = authors_like_model()
    src = tmp_path / "theirs.ckpt"
    torch.save({"model": authors_state(model), "opt": authors_opt(), "epoch": 3}, src)
    ref, copy = tmp_path / "ref.ckpt", tmp_path / "copy.ckpt"
    convert_authors_checkpoint(str(src), str(ref))  # the default
    convert_authors_checkpoint(str(src), str(copy), llm_blocks="copy")
    assert ref.stat().st_size < copy.stat().st_size / 2
    by_ref, ckpt = load_checkpoint(str(ref))
    assert ckpt["llm"]["mode"] == "file" and ckpt["llm"]["path"] == str(src.resolve())
    by_copy, _ = load_checkpoint(str(copy))
    txt, tm, vid, vm = make_batch([6, 4], [3, 3], seed=4)
    with torch.no_grad():
        a, b = by_ref(txt, tm, vid, vm), by_copy(txt, tm, vid, vm)
    assert torch.equal(a["pred_spans"], b["pred_spans"]) and torch.equal(a["saliency_scores"], b["saliency_scores"])
    state = authors_state(model)
    state["transformer.llama.layers.0.attention.wq.weight"][0, 0] += 1.0
    torch.save({"model": state, "opt": authors_opt()}, src)
    with pytest.raises(ModelError, match="changed since it was converted.*--llm-blocks copy") as err:
        load_checkpoint(str(ref))
    assert str(src.resolve()) in str(err.value) and "\n" not in str(err.value)
    src.unlink()
    with pytest.raises(ModelError, match="which is missing.*--llm-blocks copy"):
        load_checkpoint(str(ref))
    load_checkpoint(str(copy))  # self-contained


def test_checkpoint_with_the_four_legacy_switches_still_loads(tmp_path):
    """Converted checkpoints written before ``compat`` stored its four behaviours one by one."""
    model = authors_like_model()
    src, out = tmp_path / "theirs.ckpt", tmp_path / "ours.ckpt"
    torch.save({"model": authors_state(model), "opt": authors_opt(), "epoch": 3}, src)
    convert_authors_checkpoint(str(src), str(out))
    ckpt = torch.load(out, weights_only=True)
    config = {k: v for k, v in ckpt["model_config"].items() if k != "compat"}
    ckpt["model_config"] = {**config, "llm_attention": "batch", "t2v_cross_sample_mask": True, "event_loss": False,
                            "pseudo_events_from": "projected"}
    torch.save(ckpt, out)
    loaded, _ = load_checkpoint(str(out))
    assert loaded.cfg.compat == "authors" and loaded.cfg.llm_attention == "batch"
    txt, tm, vid, vm = make_batch([6, 4], [3, 3], seed=4)
    with torch.no_grad():
        assert (model(txt, tm, vid, vm)["pred_spans"] - loaded(txt, tm, vid, vm)["pred_spans"]).abs().max() <= 1e-6
    vmr_ablation = ModelConfig.from_dict({"llm_attention": "time", "t2v_cross_sample_mask": False,
                                          "event_loss": False, "pseudo_events_from": "input"})
    assert vmr_ablation.compat == "vmr" and vmr_ablation.event_coef == 0.0 and not vmr_ablation.event_loss
    with pytest.raises(ModelError, match="mixes"):
        ModelConfig.from_dict({"llm_attention": "batch", "event_loss": True})


def test_bad_sources_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        convert_authors_checkpoint(str(tmp_path / "nope.ckpt"), str(tmp_path / "o.ckpt"))
    torch.save({"weights": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ModelError, match="not an authors"):
        convert_authors_checkpoint(str(tmp_path / "other.ckpt"), str(tmp_path / "o.ckpt"))
    torch.save({"model": {"a.weight": torch.zeros(1)}, "opt": argparse.Namespace()}, tmp_path / "x.ckpt")
    with pytest.raises(ModelError, match="not an LLMEPET"):
        convert_authors_checkpoint(str(tmp_path / "x.ckpt"), str(tmp_path / "o.ckpt"))
