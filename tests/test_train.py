"""model.training.train: a tiny LLMEPET overfits a small synthetic set; `vmr train` -> `vmr predict` -> `vmr eval` runs
end to end on the real QVHighlights annotations (a subset) with features generated into the public layout; --resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from providers import ArrayProvider
from model.config import ModelConfig
from model.training.criterion import build_criterion
from model.data.dataset import MomentDataset
from model.data.sample import DataConfig
from model.errors import ModelError
from model.net.llmepet import build_model
from model.training.settings import TrainConfig, build_settings
from model.training.train import Trainer, best_score, build_run

from shared_data import SHARED_DATA
QVH = SHARED_DATA / "qvhighlights"
needs_data = pytest.mark.skipif(not QVH.exists(), reason="shared data not present")

TINY = dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1, dec_layers=2, t2v_layers=1, dummy_layers=1,
            moment_layers=1, sent_layers=1, num_dummies=3, total_prompts=3, num_queries=5, llm="random", llm_dim=32,
            llm_heads=4, llm_kv_heads=4, llm_ffn_dim=64, llm_layers="0:1")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic_set(n=8, n_clips=20, dim=16, seed=0):
    """Videos whose moment clips carry the prototype their query describes."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(4, dim))
    videos, texts, anns = {}, {}, []
    for i in range(n):
        feats = rng.normal(size=(n_clips, dim)) * 0.5
        s = int(rng.integers(0, n_clips - 6))
        e = s + int(rng.integers(3, 6))
        feats[s:e] += 2 * protos[i % 4]
        videos[f"v{i}"] = feats.astype(np.float32)
        texts[f"q{i}"] = (np.stack([protos[i % 4]] * 2) + rng.normal(size=(2, dim)) * 0.1).astype(np.float32)
        anns.append({"qid": i, "query": f"q{i}", "vid": f"v{i}", "duration": 2 * n_clips,
                     "relevant_windows": [[2 * s, 2 * e]]})
    return ArrayProvider(videos, texts, dim, dim, clip_model="test"), anns


@pytest.mark.slow
def test_tiny_model_overfits_synthetic_set(tmp_path):
    torch.manual_seed(0)
    provider, anns = synthetic_set()
    cfg = ModelConfig(txt_dim=16, vid_dim=18, input_dropout=0.0, dropout=0.0, vid_has_window_suffix=False, **TINY)
    model = build_model(cfg)
    data_cfg = DataConfig()
    tcfg = TrainConfig(bsz=8, eval_bsz=8, lr=3e-3, lr_drop=60, n_epoch=80, eval_epoch=80, grad_clip=1.0,
                       seed=0, progress=False)
    ds = MomentDataset(anns, provider, data_cfg, seed=0)
    trainer = Trainer(model, build_criterion(cfg), ds, anns, provider, data_cfg, tcfg, "custom",
                      provider.feature_spec(), str(tmp_path / "m.pt"), torch.device("cpu"))
    summary = trainer.fit()
    losses = [h["loss_overall"] for h in summary["history"]]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    val = summary["history"][-1]["val"]
    assert val["MR-full-R1@0.7"] >= 75.0, val
    assert (tmp_path / "m.pt").exists() and (tmp_path / "m.log.jsonl").exists()


def test_model_without_llm_blocks_trains_saves_and_predicts(tmp_path):
    """llm_layers "0:0" (the paper's ablation without LLM blocks) needs no LLM and goes through train and predict."""
    from model.inference.checkpoint import load_checkpoint
    from model.inference.predict import predict_annotations

    torch.manual_seed(0)
    provider, anns = synthetic_set()
    cfg = ModelConfig(txt_dim=16, vid_dim=18, vid_has_window_suffix=False, **{**TINY, "llm": "", "llm_layers": "0:0"})
    model = build_model(cfg)
    assert len(model.llm.blocks) == 0 and cfg.n_llm_layers == 0
    data_cfg = DataConfig()
    tcfg = TrainConfig(bsz=8, eval_bsz=8, lr=3e-3, lr_drop=60, n_epoch=8, eval_epoch=8, seed=0, progress=False)
    trainer = Trainer(model, build_criterion(cfg), MomentDataset(anns, provider, data_cfg, seed=0), anns, provider,
                      data_cfg, tcfg, "custom", provider.feature_spec(), str(tmp_path / "m.pt"), torch.device("cpu"))
    losses = [h["loss_overall"] for h in trainer.fit()["history"]]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    loaded, _ = load_checkpoint(str(tmp_path / "m.pt"))
    rows = predict_annotations(loaded, anns, provider, data_cfg, "custom", progress=False)
    assert [r["qid"] for r in rows] == [a["qid"] for a in anns] and all(r["pred_relevant_windows"] for r in rows)


def test_settings_layers_and_errors(tmp_path):
    model_over, data_cfg, tcfg = build_settings("tacos", overrides=["lr=3e-4", "v_feat_dirs=clip_features",
                                                                    "max_v_l=50", "amp=false"])
    assert model_over["num_dummies"] == 50 and model_over["max_v_l"] == 50 and data_cfg.max_v_l == 50
    assert data_cfg.v_feat_dirs == ["clip_features"] and tcfg.lr == 3e-4 and tcfg.amp is False
    assert tcfg.lr_drop == 200 and data_cfg.clip_length == 2.0
    assert build_settings("charades")[1].clip_length == 1.0
    with pytest.raises(ModelError, match="unknown setting 'nope'"):
        build_settings("qvhighlights", overrides=["nope=1"])
    with pytest.raises(ModelError, match="expected an integer"):
        build_settings("qvhighlights", overrides=["bsz=big"])
    with pytest.raises(ModelError, match="KEY=VALUE"):
        build_settings("qvhighlights", overrides=["bsz"])
    assert best_score({"brief": {"MR-full-mAP": 3.0, "MR-full-mIoU": 5.0}}, "qvhighlights") == 3.0
    assert best_score({"brief": {"MR-full-mAP": 3.0, "MR-full-mIoU": 5.0}}, "tacos") == 5.0


def write_public_features(root: Path, anns: list[dict], seed: int = 0, slowfast_dim: int = 2304,
                          clip_dim: int = 512) -> None:
    """SlowFast + CLIP clip features and per-token CLIP text features shaped like the public releases; the moment
    clips lean towards the query's mean token so the task is learnable."""
    rng = np.random.default_rng(seed)
    for d in ("slowfast_features", "clip_features", "clip_text_features"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for a in anns:
        n = int(a["duration"] // 2)
        tokens = rng.normal(size=(len(a["query"].split()) + 2, clip_dim)).astype(np.float32)
        clip = rng.normal(size=(n, clip_dim)).astype(np.float32)
        for st, ed in a.get("relevant_windows", []):
            clip[int(st // 2):int(ed // 2)] += 2 * tokens.mean(0)
        np.savez(root / "clip_features" / f"{a['vid']}.npz", features=clip)
        np.savez(root / "slowfast_features" / f"{a['vid']}.npz",
                 features=rng.normal(size=(n, slowfast_dim)).astype(np.float32))
        np.savez(root / "clip_text_features" / f"qid{a['qid']}.npz", last_hidden_state=tokens)


def _subset(path: Path, n: int) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


@needs_data
def test_cli_train_predict_eval_on_real_qvh_annotations(tmp_path):
    from cli import main

    train = _subset(QVH / "highlight_train_release.jsonl", 24)
    val = _subset(QVH / "highlight_val_release.jsonl", 12)
    write_public_features(tmp_path / "features", train + val)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tiny.json").write_text(json.dumps(dict(TINY, bsz=8, eval_bsz=8, n_epoch=2, eval_epoch=1,
                                                        progress=False)))
    ckpt = tmp_path / "model.pt"
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--train", str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.jsonl"),
                               "--features", str(tmp_path / "features"), "--out", str(ckpt), "--config",
                               str(tmp_path / "tiny.json"), "--set", "lr=5e-4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert ckpt.exists() and "best checkpoint" in res.output
    log = [json.loads(line) for line in (tmp_path / "model.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and "MR-full-mAP" in log[0]["val"]

    pred = tmp_path / "pred.jsonl"
    res = runner.invoke(main, ["predict", "--checkpoint", str(ckpt), "--features", str(tmp_path / "features"),
                               "--annotations", str(tmp_path / "val.jsonl"), "--out", str(pred), "--batch-size", "5",
                               "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert [r["qid"] for r in rows] == [a["qid"] for a in val]
    for r, a in zip(rows, val):
        assert set(r) == {"qid", "query", "vid", "pred_relevant_windows", "pred_saliency_scores"}
        scores = [w[2] for w in r["pred_relevant_windows"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 5
        assert all(0 <= w[0] <= w[1] <= 150 and w[0] % 2 == 0 and w[1] % 2 == 0 for w in r["pred_relevant_windows"])
        assert len(r["pred_saliency_scores"]) == a["duration"] // 2

    res = runner.invoke(main, ["eval", "--submission", str(pred), "--gt", str(tmp_path / "val.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert {"MR-full-mAP", "MR-full-R1@0.7", "HL-min-VeryGood-Hit1"} <= set(metrics["brief"])

    # the best checkpoint is the best-scoring epoch; resume from the latest for one more epoch
    from model.inference.checkpoint import read_checkpoint
    best = max(log, key=lambda r: r["score"])  # first of equal scores wins: only a strict improvement replaces
    assert read_checkpoint(str(ckpt))["metrics"] == pytest.approx(best["val"])
    res = runner.invoke(main, ["train", "--train", str(tmp_path / "train.jsonl"), "--features",
                               str(tmp_path / "features"), "--out", str(tmp_path / "resumed.pt"), "--resume",
                               str(tmp_path / "model.latest.pt"), "--set", "n_epoch=3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (tmp_path / "resumed.log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [3]

    # a features dir whose CLIP differs from the checkpoint's is refused in one line
    (tmp_path / "features" / "feature_spec.json").write_text(json.dumps({"clip_model": "ViT-L-14:openai"}))
    res = runner.invoke(main, ["predict", "--checkpoint", str(ckpt), "--features", str(tmp_path / "features"),
                               "--annotations", str(tmp_path / "val.jsonl"), "--out", str(pred), "--device", "cpu"])
    assert res.exit_code == 1 and "clip_model ViT-L-14:openai" in res.output


def test_resume_rejects_other_dataset(tmp_path):
    provider, anns = synthetic_set(n=4)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(a) for a in anns))
    cfg = ModelConfig(txt_dim=16, vid_dim=18, **TINY)
    from model.inference.checkpoint import save_checkpoint

    save_checkpoint(str(tmp_path / "c.pt"), build_model(cfg), DataConfig(), provider.feature_spec(), "tacos")
    with pytest.raises(ModelError, match="trained for tacos"):
        build_run(str(tmp_path / "a.jsonl"), None, None, str(tmp_path / "o.pt"), "qvhighlights",
                  resume=str(tmp_path / "c.pt"), device="cpu", provider=provider)


def test_bf16_autocast_training_step_runs(tmp_path):
    """The CUDA path (bf16 autocast for the forward, float32 losses) exercised with CPU autocast."""
    provider, anns = synthetic_set(n=4)
    cfg = ModelConfig(txt_dim=16, vid_dim=18, vid_has_window_suffix=False, **TINY)
    model = build_model(cfg)
    tcfg = TrainConfig(bsz=4, n_epoch=1, progress=False)
    ds = MomentDataset(anns, provider, DataConfig(), seed=0)
    trainer = Trainer(model, build_criterion(cfg), ds, None, provider, DataConfig(), tcfg, "custom",
                      provider.feature_spec(), str(tmp_path / "m.pt"), torch.device("cpu"))
    trainer.autocast_dtype = torch.bfloat16
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    losses = trainer.train_epoch(0)
    assert np.isfinite(losses["loss_overall"])
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_cli_train_predict_eval_on_an_index(tmp_path):
    """`--index` as the data source (features through retriever.provider), with a 600-s video: training crops
    75-clip windows around its moments, prediction covers it with windows and scores all its 300 clips."""
    import world
    from world.generator import build_world, write_jsonl
    from world.synthetic import write_library
    from cli import main
    from model.inference.features import ClipEncoder

    videos, rows = build_world(tmp_path, n_videos=6, seed=7, long_videos=1, write=False)
    encoder = ClipEncoder.load(str(world.WORLD_CLIP_CONFIG), str(world.WORLD_CLIP_WEIGHTS), device="cpu")
    write_library(tmp_path / "index", videos, encoder, seed=7)
    write_jsonl(rows, tmp_path / "ann.jsonl")
    long_rows = [r for r in rows if r["duration"] > 150]
    assert long_rows and all(r["relevant_windows"][0][0] >= 150 for r in long_rows)
    (tmp_path / "tiny.json").write_text(json.dumps(dict(TINY, bsz=8, eval_bsz=8, n_epoch=1, progress=False,
                                                        vid_has_window_suffix=False)))
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--train", str(tmp_path / "ann.jsonl"), "--val", str(tmp_path / "ann.jsonl"),
                               "--index", str(tmp_path / "index"), "--out", str(tmp_path / "m.pt"), "--dataset",
                               "custom", "--config", str(tmp_path / "tiny.json"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["predict", "--checkpoint", str(tmp_path / "m.pt"), "--index", str(tmp_path / "index"),
                               "--annotations", str(tmp_path / "ann.jsonl"), "--out", str(tmp_path / "p.jsonl"),
                               "--device", "cpu"])
    assert res.exit_code == 0, res.output
    preds = {p["qid"]: p for p in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())}
    for r in rows:
        assert len(preds[r["qid"]]["pred_saliency_scores"]) == int(r["duration"] // 2)
        assert all(0 <= w[0] <= w[1] <= r["duration"] for w in preds[r["qid"]]["pred_relevant_windows"])
    res = runner.invoke(main, ["eval", "--submission", str(tmp_path / "p.jsonl"), "--gt", str(tmp_path / "ann.jsonl"),
                               "--json"])
    assert res.exit_code == 0 and "MR-full-mAP" in json.loads(res.output)["brief"]
