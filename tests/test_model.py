"""LLMEPET forward, masks, losses and configuration (tiny configs, CPU)."""
from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig, dataset_defaults, train_defaults
from model.training.criterion import build_criterion
from model.errors import ModelError
from model.net.llmepet import LLMEPET, build_model, source_video_ids
from model.pseudo_events import pseudo_event_spans_cxw

TXT_DIM, VID_DIM = 16, 10


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(llm="random", llm_dim=64, llm_heads=2, llm_kv_heads=1, llm_ffn_dim=96, llm_layers="0:2",
                hidden_dim=32, nheads=4, dim_feedforward=48, num_dummies=3, total_prompts=4, num_queries=5,
                enc_layers=2, dec_layers=2, t2v_layers=2, txt_dim=TXT_DIM, vid_dim=VID_DIM, max_q_l=20)
    base.update(kw)
    return ModelConfig(**base)


def make_batch(lengths_v, lengths_t, lv=None, lt=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths_v)
    lv, lt = lv or max(lengths_v), lt or max(lengths_t)
    vid, txt = torch.zeros(b, lv, VID_DIM), torch.zeros(b, lt, TXT_DIM)
    vm, tm = torch.zeros(b, lv), torch.zeros(b, lt)
    for i, (nv, nt) in enumerate(zip(lengths_v, lengths_t)):
        vid[i, :nv] = torch.randn(nv, VID_DIM, generator=g)
        txt[i, :nt] = torch.randn(nt, TXT_DIM, generator=g)
        vm[i, :nv], tm[i, :nt] = 1, 1
    return txt, tm, vid, vm


def make_targets(lengths_v, lv):
    sal = torch.zeros(len(lengths_v), lv)
    spans, pos, neg = [], [], []
    for i, n in enumerate(lengths_v):
        a, b = n // 4, n // 2
        sal[i, a:b + 1] = torch.arange(1, b - a + 2).float().clamp(max=4)
        spans.append({"spans": torch.tensor([[(a + b + 1) / 2 / n, (b + 1 - a) / n]])})
        pos.append([b, a])
        neg.append([n - 1, 0])
    return dict(span_labels=spans, saliency_pos_labels=torch.tensor(pos), saliency_neg_labels=torch.tensor(neg),
                saliency_all_labels=sal)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg()).eval()


def test_forward_shapes_and_heads(model):
    txt, tm, vid, vm = make_batch([8, 6, 5], [4, 3, 4])
    out = model(txt, tm, vid, vm)
    assert out["pred_spans"].shape == (3, 5, 2) and out["pred_logits"].shape == (3, 5, 2)
    assert out["saliency_scores"].shape == (3, 8) and out["pred_event_spans"].shape == (3, 5, 2)
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_spans"].shape == (3, 5, 2)
    assert ((out["pred_spans"] >= 0) & (out["pred_spans"] <= 1)).all()
    # inference runs no training-only parts
    assert out["saliency_scores_neg"] is None and "pseudo_event_spans" not in out


def test_padding_does_not_change_a_sample_in_time_mode(model):
    """The same two samples, padded to longer clip / word lengths, give the same outputs on valid parts."""
    txt, tm, vid, vm = make_batch([7, 4], [5, 3], seed=1)
    txt2, tm2, vid2, vm2 = make_batch([7, 4], [5, 3], lv=12, lt=9, seed=1)
    with torch.no_grad():
        a, b = model(txt, tm, vid, vm), model(txt2, tm2, vid2, vm2)
    for k in ("pred_spans", "pred_logits", "pred_event_spans"):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    for i, n in enumerate([7, 4]):
        torch.testing.assert_close(a["saliency_scores"][i, :n], b["saliency_scores"][i, :n], atol=1e-5, rtol=1e-4)
    # and a sample does not depend on the others in its batch
    with torch.no_grad():
        alone = model(txt[1:, :3], tm[1:, :3], vid[1:, :4], vm[1:, :4])
    torch.testing.assert_close(alone["pred_spans"][0], a["pred_spans"][1], atol=1e-5, rtol=1e-4)


def test_batch_mode_mixes_samples_as_the_authors_code():
    torch.manual_seed(0)
    m = build_model(tiny_cfg(compat="authors")).eval()
    txt, tm, vid, vm = make_batch([6, 6, 6], [4, 4, 4], seed=2)
    with torch.no_grad():
        full = m(txt, tm, vid, vm)["pred_spans"][0]
        alone = m(txt[:1], tm[:1], vid[:1], vm[:1])["pred_spans"][0]
    assert (full - alone).abs().max() > 1e-4


def test_training_forward_losses_and_gradients():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    m = build_model(cfg).train()
    lengths = [8, 6, 5]
    txt, tm, vid, vm = make_batch(lengths, [4, 3, 4])
    targets = make_targets(lengths, 8)
    out = m(txt, tm, vid, vm, targets=targets, vid=["a_0_10", "b_0_10", "b_10_20"])
    assert out["saliency_scores_neg"] is not None and out["real_neg_mask"].tolist() == [True, False, True]
    crit = build_criterion(cfg)
    losses = crit(out, targets)
    expected = {"loss_span", "loss_giou", "loss_label", "loss_saliency", "loss_ms_align", "loss_distill",
                "loss_orthogonal_dummy", "loss_event_span", "loss_event_giou", "loss_span_0", "loss_giou_0",
                "loss_label_0"}
    assert expected <= set(losses)
    total = crit.total(losses)
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is None for p in m.llm.blocks.parameters())  # frozen
    assert m.llm.to_llm.weight.grad is not None and m.llm.to_llm.weight.grad.abs().sum() > 0
    assert m.event_head.layers[-1].weight.grad.abs().sum() > 0  # pseudo-event regulation is active


def test_negative_pass_is_skipped_when_predicting():
    torch.manual_seed(0)
    m = build_model(tiny_cfg()).eval()
    lengths = [6, 6]
    txt, tm, vid, vm = make_batch(lengths, [4, 4])
    out = m(txt, tm, vid, vm, targets=make_targets(lengths, 6), vid=["a", "b"])
    assert out["saliency_scores_neg"] is None
    out = m(txt, tm, vid, vm, targets=make_targets(lengths, 6), vid=["a", "b"], negative_pass=True)
    assert out["saliency_scores_neg"].shape == (2, 6)


def test_pseudo_events_per_video_on_valid_clips(model):
    lengths = [9, 5, 7]  # odd batch: the authors' pairing would wrap across videos here
    txt, tm, vid, vm = make_batch(lengths, [3, 3, 3])
    with torch.no_grad():
        out = model(txt, tm, vid, vm, targets=make_targets(lengths, 9))
    for i, n in enumerate(lengths):
        spans = out["pseudo_event_spans"][i]
        # default: the input clip features without the 2 TEF columns (what the index stores)
        torch.testing.assert_close(spans, pseudo_event_spans_cxw(vid[i, :n, :VID_DIM - 2]))
        assert (spans[:, 1] > 0).all() and abs(float(spans[:, 1].sum()) - (n - 1) / n) < 1e-5
    torch.manual_seed(0)
    authors_like = build_model(tiny_cfg(compat="authors")).eval()
    with torch.no_grad():
        out = authors_like(txt, tm, vid, vm, targets=make_targets(lengths, 9))
        projected = authors_like.vid_proj(vid) + authors_like.token_type.weight[1]
    torch.testing.assert_close(out["pseudo_event_spans"][2], pseudo_event_spans_cxw(projected[2, :7]))


def test_event_loss_switch_and_weights():
    on = build_criterion(tiny_cfg())
    off = build_criterion(tiny_cfg(compat="authors"))
    ablation = build_criterion(tiny_cfg(event_coef=0.0))
    assert "event_spans" in on.losses and "event_spans" not in off.losses and "event_spans" not in ablation.losses
    assert on.weight_dict["loss_event_span"] == pytest.approx(0.1 * 10)
    assert on.weight_dict["loss_label_0"] == 4 and "loss_saliency_0" not in on.weight_dict


def test_config_round_trip_and_dataset_defaults():
    cfg = tiny_cfg().replace(**dataset_defaults("qvhighlights"))
    assert cfg.enc_layers == 6 and cfg.dec_layers == 6 and cfg.max_q_l == 32
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    tacos = dataset_defaults("tacos")
    assert tacos["num_dummies"] == 50 and tacos["set_cost_giou"] == 4.0 and tacos["lw_saliency"] == 4.0
    assert dataset_defaults("charades")["dec_layers"] == 2 and train_defaults("tacos")["lr"] == 2e-4
    with pytest.raises(ModelError):
        dataset_defaults("kinetics")
    with pytest.raises(ModelError):
        tiny_cfg(compat="sideways")
    with pytest.raises(ModelError):
        ModelConfig.from_dict({"no_such_key": 1})


def test_presets_are_data_files_and_a_new_one_is_a_new_file(tmp_path, monkeypatch):
    import json
    import shutil

    import model.config as config

    assert config.preset_names() == ["charades", "custom", "qvhighlights", "tacos"]
    assert config.load_preset("HL")["name"] == "qvhighlights" and config.load_preset("charades_sta")["max_timestamp"] == 150
    for name in config.preset_names():  # every key of every preset is a real setting
        preset = config.load_preset(name)
        ModelConfig().replace(**preset["model"])
        assert set(preset["train"]) <= {"bsz", "eval_bsz", "lr", "lr_drop", "wd", "n_epoch", "grad_clip",
                                        "clip_length", "max_windows", "eval_epoch"}
    presets = tmp_path / "presets"
    shutil.copytree(config.PRESETS_DIR, presets)
    (presets / "didemo.json").write_text(json.dumps({"name": "didemo", "aliases": ["dd"], "model": {"enc_layers": 2},
                                                     "train": {"lr": 5e-4}, "max_timestamp": None}))
    monkeypatch.setattr(config, "PRESETS_DIR", presets)
    assert dataset_defaults("dd") == {"enc_layers": 2} and train_defaults("didemo")["lr"] == 5e-4
    from model.training.settings import build_settings
    model_over, _, train_cfg = build_settings("didemo")
    assert model_over["enc_layers"] == 2 and train_cfg.lr == 5e-4


def test_missing_llm_is_a_model_error():
    with pytest.raises(ModelError, match="--llm"):
        build_model(tiny_cfg(llm=""))
    m = build_model(tiny_cfg(llm=""), llm_weights=False)  # loading a full checkpoint next
    assert isinstance(m, LLMEPET)


def test_source_video_ids():
    assert source_video_ids(["ab_cd_30.0_180.0", "x_2_3", "plain"], True) == ["ab_cd", "x", "plain"]
    assert source_video_ids(["ab_cd_30.0_180.0"], False) == ["ab_cd_30.0_180.0"]


def test_losses_under_bf16_autocast():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    m = build_model(cfg).train()
    lengths = [6, 5]
    txt, tm, vid, vm = make_batch(lengths, [4, 3])
    targets = make_targets(lengths, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(txt, tm, vid, vm, targets=targets, vid=["a", "b"])
        losses = build_criterion(cfg)(out, targets)
    total = build_criterion(cfg).total(losses)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
