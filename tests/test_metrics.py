"""model.inference.metrics reproduces the official QVHighlights eval exactly, and handles Charades/TACoS."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from model.errors import ModelError
from model.inference.metrics import describe_metrics, detection_ap, evaluate, evaluate_files, saliency_ap
from model.jsonl import load_jsonl

from shared_data import SHARED_DATA as DATA
QVH = DATA / "qvhighlights"
SAMPLES = QVH / "official_eval_samples"

# (submission, ground truth, expected metrics, eval variant that wrote them) - see shared/data/README.md
OFFICIAL_CASES = [
    ("sample_val_preds.jsonl", "highlight_val_release.jsonl", "sample_val_preds_metrics_raw.json", "momentdetr"),
    ("moment_detr_clip_only_val_preds.jsonl", "highlight_val_release.jsonl",
     "moment_detr_clip_only_val_preds_metrics.json", "momentdetr"),
    ("cgdetr_hl_val_submission.jsonl", "highlight_val_release.jsonl", "cgdetr_hl_val_submission_metrics.json",
     "cgdetr"),
    ("cgdetr_hl_test_submission.jsonl", "highlight_test_with_gt.jsonl",
     "cgdetr_hl_test_submission_metrics.recomputed_cgdetr_eval.json", "cgdetr"),
    ("cgdetr_hl_test_submission.jsonl", "highlight_test_with_gt.jsonl",
     "cgdetr_hl_test_submission_metrics.recomputed_momentdetr_eval.json", "momentdetr"),
]

needs_data = pytest.mark.skipif(not QVH.exists(), reason="shared data not present")


@needs_data
@pytest.mark.parametrize("sub,gt,expected,variant", OFFICIAL_CASES, ids=[c[2] for c in OFFICIAL_CASES])
def test_official_samples_reproduced_exactly(sub, gt, expected, variant):
    got = evaluate_files(str(SAMPLES / sub), str(QVH / gt), variant=variant)
    want = json.loads((SAMPLES / expected).read_text())
    got = json.loads(json.dumps(got))  # the JSON the CLI prints
    assert got == want
    assert list(got) == list(want) and list(got["brief"]) == list(want["brief"])  # same key order too


@needs_data
def test_cli_eval_json_matches_expected(tmp_path):
    from cli import main

    # a 300-query slice keeps the CLI test fast; its expected values come from the (verified) library call
    gt = load_jsonl(QVH / "highlight_val_release.jsonl")[:300]
    qids = {d["qid"] for d in gt}
    sub = [d for d in load_jsonl(SAMPLES / "cgdetr_hl_val_submission.jsonl") if d["qid"] in qids]
    for name, rows in (("gt.jsonl", gt), ("sub.jsonl", sub)):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows))
    res = CliRunner().invoke(main, ["eval", "--submission", str(tmp_path / "sub.jsonl"), "--gt",
                                    str(tmp_path / "gt.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.output)
    assert printed == json.loads(json.dumps(evaluate(sub, gt)))
    assert 0 < printed["brief"]["MR-full-R1@0.7"] < 100 and "HL-min-VeryGood-Hit1" in printed["brief"]
    res = CliRunner().invoke(main, ["eval", "--submission", str(tmp_path / "sub.jsonl"), "--gt",
                                    str(QVH / "highlight_val_release.jsonl")])
    assert res.exit_code == 1 and "different qids" in res.output


def test_detection_ap_hand_computed():
    gt = np.array([[0.0, 10.0], [20.0, 30.0]])
    preds = [[0, 10, 0.9], [40, 50, 0.8], [20, 30, 0.7]]
    # TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 0.5 * 1 + 0.5 * 2/3
    ap = detection_ap(gt, preds)
    assert np.allclose(ap, 0.5 + 0.5 * 2 / 3)
    # a duplicate of an already matched window is a false positive
    ap_dup = detection_ap(gt[:1], [[0, 10, 0.9], [0, 10, 0.8]])
    assert np.allclose(ap_dup, 1.0)
    ap_dup_first = detection_ap(gt[:1], [[40, 50, 0.9], [0, 10, 0.8]])
    assert np.allclose(ap_dup_first, 0.5)
    assert detection_ap(gt, []).sum() == 0


def test_saliency_ap_edge_cases():
    assert saliency_ap(np.zeros(5), np.arange(5.0)) == 0.0
    assert saliency_ap(np.ones(5), np.arange(5.0)) == 1.0
    assert saliency_ap(np.array([0, 0, 1.0]), np.array([0.1, 0.2, 0.9])) == 1.0
    assert saliency_ap(np.array([1, 0, 0.0]), np.array([0.1, 0.2, 0.9])) == pytest.approx(1 / 3)


def _perturbed_submission(gt: list[dict], rng: random.Random, keep_saliency: bool) -> list[dict]:
    sub = []
    for d in gt:
        st, ed = d["relevant_windows"][0]
        jitter = rng.uniform(-0.2, 0.2) * (ed - st)
        windows = [[max(0.0, st + jitter), ed + jitter, 0.9], [0.0, d["duration"], 0.5]]
        row = {"qid": d["qid"], "query": d["query"], "vid": d["vid"], "pred_relevant_windows": windows}
        if keep_saliency:
            row["pred_saliency_scores"] = [rng.random() for _ in range(int(d["duration"] // 2))]
        sub.append(row)
    return sub


@needs_data
def test_charades_float_windows_no_saliency_empty_buckets():
    gt = load_jsonl(DATA / "charades_sta" / "charades_sta_test_tvr_format.jsonl")
    short = [d for d in gt if d["relevant_windows"][0][1] - d["relevant_windows"][0][0] <= 10][:100]
    sub = _perturbed_submission(short, random.Random(0), keep_saliency=True)  # saliency present, GT has none
    m = evaluate(sub, short)
    assert not any(k.startswith("HL") for k in m)  # no saliency labels: HL is skipped
    assert m["middle"]["MR-mAP"]["average"] == 0.0 and m["long"]["MR-R1"]["0.7"] == 0.0  # empty buckets
    assert m["short"]["MR-mAP"] == m["full"]["MR-mAP"]
    assert 30 < m["brief"]["MR-full-R1@0.5"] <= 100
    # perfect predictions give 100
    perfect = [dict(r, pred_relevant_windows=[g["relevant_windows"][0] + [1.0]]) for r, g in zip(sub, short)]
    assert evaluate(perfect, short)["brief"]["MR-full-R1@0.7"] == 100.0
    assert "MR-full-mIoU" in describe_metrics(evaluate(perfect, short))


@needs_data
def test_tacos_string_qids_long_windows():
    gt = load_jsonl(DATA / "tacos" / "test.jsonl")[:150]
    assert isinstance(gt[0]["qid"], str)
    sub = _perturbed_submission(gt, random.Random(1), keep_saliency=False)
    m = evaluate(sub, gt)
    n_long = sum(1 for d in gt if 30 < d["relevant_windows"][0][1] - d["relevant_windows"][0][0] <= 150)
    assert n_long > 0 and m["long"]["MR-mAP"]["average"] > 0
    assert set(m) == {"brief", "full", "long", "middle", "short"}


def test_mismatched_qids_and_bad_file(tmp_path):
    gt = [{"qid": 1, "duration": 10, "relevant_windows": [[0, 4]]}]
    with pytest.raises(ModelError, match="different qids"):
        evaluate([{"qid": 2, "pred_relevant_windows": [[0, 4, 1.0]]}], gt)
    with pytest.raises(ModelError, match="empty"):
        evaluate([{"qid": 1, "pred_relevant_windows": []}], gt)
    with pytest.raises(ModelError, match="no relevant_windows"):
        evaluate([{"qid": 1, "pred_relevant_windows": [[0, 4, 1.0]]}], [{"qid": 1, "duration": 10}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qid": 1}\n{oops\n')
    with pytest.raises(ModelError, match="bad.jsonl:2"):
        load_jsonl(bad)
