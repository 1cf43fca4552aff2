"""model.data.dataset / providers / targets / sample: annotations, the public feature layout, labels as the authors make
them, windows, model inputs and batching."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from providers import ArrayProvider
from model.data.dataset import MomentDataset, load_annotations
from model.data.targets import (crop_annotation, make_labels, saliency_from_scores, saliency_from_window, span_targets,
                                training_crop)
from model.data.providers import PublicFeatureDir, check_feature_spec
from model.data.sample import DataConfig, collate
from model.errors import ModelError

from shared_data import SHARED_DATA as DATA
needs_data = pytest.mark.skipif(not DATA.exists(), reason="shared data not present")


def _write_public(root: Path, vid: str, qid, slowfast: np.ndarray, clip: np.ndarray, text: np.ndarray):
    for d in ("slowfast_features", "clip_features", "clip_text_features"):
        (root / d).mkdir(parents=True, exist_ok=True)
    np.savez(root / "slowfast_features" / f"{vid}.npz", features=slowfast)
    np.savez(root / "clip_features" / f"{vid}.npz", features=clip)
    np.savez(root / "clip_text_features" / f"qid{qid}.npz", last_hidden_state=text)


def test_public_layout_sample_matches_authors_recipe(tmp_path):
    rng = np.random.default_rng(0)
    sf, cl, tx = (rng.normal(size=(80, 6)) * 3, rng.normal(size=(79, 4)) * 2, rng.normal(size=(40, 5)) * 5)
    _write_public(tmp_path, "abc_0.0_150.0", 7, sf.astype(np.float32), cl.astype(np.float32), tx.astype(np.float32))
    prov = PublicFeatureDir(str(tmp_path))
    assert prov.v_feat_dirs == ["slowfast_features", "clip_features"]  # the authors' order
    assert prov.feature_spec() == {"clip_model": "ViT-B-32:openai", "video_kinds": ["slowfast", "clip"],
                                   "video_dims": [6, 4], "text_dim": 5, "clip_seconds": 2.0}
    ann = {"qid": 7, "query": "q", "vid": "abc_0.0_150.0", "duration": 150, "relevant_windows": [[10, 20]],
           "relevant_clip_ids": [5, 6, 7, 8, 9], "saliency_scores": [[1, 1, 1], [4, 4, 4], [2, 2, 2], [0, 0, 1], [3, 3, 3]]}
    cfg = DataConfig(max_q_l=32, max_v_l=75)
    item = MomentDataset([ann], prov, cfg, seed=1)[0]
    video, text = item["video"].numpy(), item["text"].numpy()
    # each source cut to 75 rows, normalised on its own, then concatenated, then TEF
    assert video.shape == (75, 6 + 4 + 2)
    np.testing.assert_allclose(video[:, :6], sf[:75] / (np.linalg.norm(sf[:75], axis=1, keepdims=True) + 1e-5),
                               rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(video[:, 6:10], axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(video[:, 10:], np.stack([np.arange(75) / 75, np.arange(1, 76) / 75], 1), atol=1e-6)
    assert text.shape == (32, 5)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-4)
    labels = item["labels"]
    # span target: [10, 20] s over 75 clips * 2 s, as (center, width)
    np.testing.assert_allclose(labels["spans"].numpy(), [[15 / 150, 10 / 150]], rtol=1e-6)
    assert labels["saliency_pos"][0] == 6 and labels["saliency_neg"][0] == 8  # hard: max / min summed score
    assert labels["saliency_pos"][1] in ann["relevant_clip_ids"]
    assert labels["saliency_neg"][1] not in ann["relevant_clip_ids"]
    assert labels["saliency_all"][6] == 12 and labels["saliency_all"][8] == 1 and labels["saliency_all"][0] == 0
    assert item["meta"]["duration"] == 150 and item["meta"]["offset"] == 0.0


def test_missing_features_are_one_line_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        PublicFeatureDir(str(tmp_path / "nope"))
    (tmp_path / "clip_features").mkdir()
    (tmp_path / "clip_text_features").mkdir()
    prov = PublicFeatureDir(str(tmp_path))
    with pytest.raises(ModelError, match="no features for video 'x'"):
        prov.video_sources("x")
    with pytest.raises(ModelError, match="no text features for qid 3"):
        prov.text_features_for_qid(3)


def test_span_targets_keep_at_most_max_windows():
    cfg = DataConfig(max_windows=2)
    windows = [[0, 2], [4, 6], [8, 10], [12, 14]]
    t = span_targets(windows, 10, cfg, random.Random(0))
    assert t.shape == (2, 2)
    assert t[:, 1].tolist() == pytest.approx([0.1, 0.1])


def test_charades_labels_from_window():
    pos, neg, all_scores = saliency_from_window([3.2, 9.8], duration=30.0, n_clips=30, rng=random.Random(0))
    # 1-s clips: window clips 3..8 (end clip int(9.8) - 1)
    assert all(3 <= p <= 8 for p in pos) and len(set(pos)) == 2
    assert all(n < 3 or n > 8 for n in neg)
    assert all_scores.tolist() == [0] * 3 + [1] * 6 + [0] * 21
    pos, neg, _ = saliency_from_window([0.0, 30.0], 30.0, 30, random.Random(0))  # whole video: no negatives
    assert neg == pos


def test_qvh_labels_when_every_clip_is_relevant():
    pos, neg, all_scores = saliency_from_scores([0, 1, 2], [[1, 1, 1], [2, 2, 2], [0, 0, 0]], 3, random.Random(0))
    assert pos == [1, 1] and neg == [2, 2]  # no easy negatives: the hard pair twice


def test_index_provider_long_video_training_crop():
    rng = np.random.default_rng(1)
    video = rng.normal(size=(200, 8)).astype(np.float32)
    prov = ArrayProvider({"long": video}, {"a dog": rng.normal(size=(3, 4)).astype(np.float32)}, dim=8, tdim=4)
    ann = {"qid": "x1", "query": "a dog", "vid": "long", "duration": 400.0, "relevant_windows": [[300.0, 320.0]]}
    cfg = DataConfig(max_v_l=75)
    ds = MomentDataset([ann], prov, cfg, seed=0)
    for _ in range(5):
        item = ds[0]
        off = item["meta"]["offset"]
        assert item["video"].shape == (75, 10) and item["meta"]["duration"] == 150.0
        assert off <= 300 and off + 150 >= 320  # the window holds the GT
        cx, w = item["labels"]["spans"][0].tolist()
        assert (cx - w / 2) * 150 + off == pytest.approx(300) and (cx + w / 2) * 150 + off == pytest.approx(320)
    # a GT longer than the window: the crop lies inside it
    ann2 = dict(ann, relevant_windows=[[10.0, 390.0]])
    s, e = training_crop(200, ann2, cfg, random.Random(0))
    assert 5 <= s and e <= 195 and e - s == 75
    crop = crop_annotation(dict(ann2, relevant_clip_ids=[4, 5, 150], saliency_scores=[[1] * 3] * 3), 5, 80, 2.0)
    assert crop["relevant_windows"] == [[0.0, 150.0]] and crop["relevant_clip_ids"] == [0]


def test_collate_pads_and_masks():
    rng = np.random.default_rng(2)
    vids = {"a": rng.normal(size=(10, 8)).astype(np.float32), "b": rng.normal(size=(6, 8)).astype(np.float32)}
    texts = {"qa": rng.normal(size=(3, 4)).astype(np.float32), "qb": rng.normal(size=(5, 4)).astype(np.float32)}
    anns = [{"qid": 1, "query": "qa", "vid": "a", "duration": 20, "relevant_windows": [[2, 6]]},
            {"qid": 2, "query": "qb", "vid": "b", "duration": 12, "relevant_windows": [[0, 4], [6, 12]]}]
    ds = MomentDataset(anns, ArrayProvider(vids, texts, dim=8, tdim=4), DataConfig(), seed=0)
    batch = collate([ds[0], ds[1]])
    inp, tgt = batch["inputs"], batch["targets"]
    assert inp["src_vid"].shape == (2, 10, 10) and inp["src_txt"].shape == (2, 5, 4)
    assert inp["src_vid_mask"].sum(1).tolist() == [10, 6] and inp["src_txt_mask"].sum(1).tolist() == [3, 5]
    assert torch.all(inp["src_vid"][1, 6:] == 0)
    assert tgt["saliency_pos_labels"].shape == (2, 2) and tgt["saliency_pos_labels"].dtype == torch.long
    assert tgt["saliency_all_labels"].shape == (2, 10) and tgt["relevant_clips"] is tgt["saliency_all_labels"]
    assert [t["spans"].shape[0] for t in tgt["span_labels"]] == [1, 2]
    # TEF follows each video's own length
    assert inp["src_vid"][1, 5, -1].item() == pytest.approx(1.0)


def test_feature_spec_mismatch_is_refused():
    spec = {"clip_model": "ViT-B-32:openai", "video_kinds": ["clip"], "video_dims": [512], "text_dim": 512,
            "clip_seconds": 2.0}
    check_feature_spec(spec, dict(spec))
    with pytest.raises(ModelError, match="clip_model ViT-L-14:openai"):
        check_feature_spec(spec, dict(spec, clip_model="ViT-L-14:openai"))
    with pytest.raises(ModelError, match="video_dims"):
        check_feature_spec(spec, dict(spec, video_kinds=["slowfast", "clip"], video_dims=[2304, 512]))


@needs_data
def test_real_annotation_files_parse_and_label():
    cfg = DataConfig(clip_length=2.0, max_v_l=75)
    qvh = load_annotations(str(DATA / "qvhighlights" / "highlight_train_release.jsonl"))
    assert len(qvh) == 7218
    rng = random.Random(0)
    for ann in qvh[:50]:
        labels = make_labels(ann, 75, cfg, rng)
        st, ed = ann["relevant_windows"][0]
        assert labels["saliency_all"][int(st // 2)] > 0
    charades = load_annotations(str(DATA / "charades_sta" / "charades_sta_test_tvr_format.jsonl"))
    ann = charades[0]
    assert isinstance(ann["relevant_windows"][0][0], float)
    n = int(round(ann["duration"]))
    labels = make_labels(ann, n, DataConfig(clip_length=1.0), rng)
    assert labels["spans"].shape == (1, 2) and labels["saliency_all"].sum() > 0
    tacos = load_annotations(str(DATA / "tacos" / "val.jsonl"))
    assert isinstance(tacos[0]["qid"], str)
