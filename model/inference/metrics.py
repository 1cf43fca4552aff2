"""The official QVHighlights evaluation: moment retrieval (MR) and highlight detection (HL).

Computes what the public ``standalone_eval`` of Moment-DETR / CG-DETR / LLMEPET computes, value for value:

- MR mAP: per query, detection AP of the (at most 10) predicted windows against all GT windows, ActivityNet style
  (greedy matching in score order, VOC interpolated precision), averaged over queries, at IoU 0.5:0.05:0.95.
- MR R1@t and mIoU: the top-1 window against the GT window it overlaps most.
- Length buckets: a query's GT windows are filtered to ``lo < length <= hi`` (short 0-10 s, middle 10-30 s,
  long 30-150 s; full = every window). Queries without a window in the bucket leave it.
- HL mAP / Hit@1: per-clip saliency scores against each of the 3 annotators' scores binarised at
  >= 2 (Fair), 3 (Good), 4 (VeryGood); clips outside ``relevant_clip_ids`` count as 0.

Every reported number is ``float(f"{100 * x:.2f}")``, as the official code formats them.

Two key sets exist upstream: Moment-DETR's eval (R1 at IoU 0.5..0.95, no mIoU) and the CG-DETR/LLMEPET eval
(R1 from IoU 0.3, plus ``MR-mIoU``); the shared values are identical. ``variant`` picks one; the default is the
CG-DETR/LLMEPET one, which is what LLMEPET reports.

Charades-STA / TACoS: no saliency labels (HL is skipped), float windows, string qids. Where a length bucket is
empty, upstream writes a dummy dict of zeros keyed by 19 float thresholds; we write zeros under the same keys a
non-empty bucket has.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np

from model.errors import ModelError
from model.jsonl import load_jsonl
from model.spans import cross_iou, paired_iou

MAP_IOU_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]        # 0.5 .. 0.95
R1_IOU_THRESHOLDS = {"cgdetr": [round(0.3 + 0.05 * i, 2) for i in range(14)],   # 0.3 .. 0.95
                     "momentdetr": MAP_IOU_THRESHOLDS}
VARIANTS = tuple(R1_IOU_THRESHOLDS)
# (name, (lo, hi)): keep GT windows with lo < length <= hi; None = keep everything ("full").
LENGTH_BUCKETS = [("short", (0, 10)), ("middle", (10, 30)), ("long", (30, 150)), ("full", None)]
# HL: minimum annotator score (0..4) for a clip to count as positive.
SALIENCY_LEVELS = [("Fair", 2), ("Good", 3), ("VeryGood", 4)]
MAX_PRED_WINDOWS = 10
CLIP_SECONDS = 2  # the QVHighlights saliency grid of the annotation files (an int: ``duration / 2`` as upstream)


def _pct(x: float) -> float:
    """The official number format: percent, two decimals (string round trip, as upstream)."""
    return float(f"{100 * x:.2f}")


# ------------------------------------------------------------------------------------------ moment retrieval
def _voc_interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the PR curve with precision made monotone from the right (VOC 2011)."""
    prec = np.hstack([[0], precision, [0]])
    rec = np.hstack([[0], recall, [1]])
    for i in range(len(prec) - 2, -1, -1):
        prec[i] = max(prec[i], prec[i + 1])
    steps = np.where(rec[1:] != rec[:-1])[0] + 1
    return float(np.sum((rec[steps] - rec[steps - 1]) * prec[steps]))


def detection_ap(gt_windows: np.ndarray, pred_windows: list, thresholds=MAP_IOU_THRESHOLDS) -> np.ndarray:
    """AP of one query's predictions at each IoU threshold.

    Args:
        gt_windows: [G, 2] (start, end).
        pred_windows: list of [start, end, score].
    Returns: [len(thresholds)] AP in [0, 1].

    Predictions are taken in decreasing score order (stable for ties); each one is a true positive for the
    not-yet-matched GT window it overlaps most, provided that IoU >= threshold.
    """
    n_thr = len(thresholds)
    if len(pred_windows) == 0:
        return np.zeros(n_thr)
    preds = sorted(pred_windows, key=lambda w: -w[2])
    ious = cross_iou(np.array([[p[0], p[1]] for p in preds], dtype=float), gt_windows)  # [P, G]
    tp = np.zeros((n_thr, len(preds)))
    fp = np.zeros((n_thr, len(preds)))
    matched = np.full((n_thr, len(gt_windows)), -1)
    for p, iou in enumerate(ious):
        # Highest-IoU GT first; numpy's default argsort, reversed, fixes the order of ties as upstream.
        candidates = iou.argsort()[::-1]
        for t, thr in enumerate(thresholds):
            for g in candidates:
                if iou[g] < thr:
                    break
                if matched[t, g] >= 0:
                    continue
                tp[t, p] = 1
                matched[t, g] = p
                break
            if tp[t, p] == 0:
                fp[t, p] = 1
    tp_cum = np.cumsum(tp, axis=1).astype(float)
    fp_cum = np.cumsum(fp, axis=1).astype(float)
    recall = tp_cum / float(len(gt_windows))
    precision = tp_cum / (tp_cum + fp_cum)
    return np.array([_voc_interpolated_ap(precision[t], recall[t]) for t in range(n_thr)])


def _mr_map(submission: list[dict], gt_by_qid: dict) -> dict:
    """{"0.5": mAP, ..., "0.95": mAP, "average": mean over thresholds} (percent)."""
    ap = np.array([detection_ap(np.array(gt_by_qid[d["qid"]]["relevant_windows"], dtype=float),
                                d["pred_relevant_windows"][:MAX_PRED_WINDOWS]) for d in submission])
    per_thr = ap.mean(0)
    out = {str(t): v for t, v in zip(MAP_IOU_THRESHOLDS, per_thr)}
    out["average"] = np.mean(per_thr)
    return {k: _pct(v) for k, v in out.items()}


def _mr_r1(submission: list[dict], gt_by_qid: dict, thresholds: list[float]) -> tuple[dict, float]:
    """Recall@1 at each IoU threshold and the mean IoU of the top-1 window (both percent)."""
    top1, best_gt = [], []
    for d in submission:
        pred = d["pred_relevant_windows"][0][:2]
        gts = gt_by_qid[d["qid"]]["relevant_windows"]
        # The GT window the top-1 prediction overlaps most (first one on ties).
        best = int(np.argmax(cross_iou(np.array([pred], dtype=float), np.array(gts, dtype=float))[0]))
        top1.append(pred)
        best_gt.append(gts[best])
    iou = paired_iou(np.array(top1, dtype=float), np.array(best_gt, dtype=float))
    return {str(t): _pct(np.mean(iou >= t)) for t in thresholds}, _pct(np.mean(iou))


def _in_bucket(submission: list[dict], ground_truth: list[dict], bounds) -> tuple[list[dict], list[dict]]:
    """The queries with a GT window of length in (lo, hi], their GT reduced to those windows."""
    if bounds is None:
        return submission, ground_truth
    lo, hi = bounds
    kept_gt = []
    for d in ground_truth:
        windows = [w for w in d["relevant_windows"] if lo < w[1] - w[0] <= hi]
        if windows:
            d = copy.copy(d)
            d["relevant_windows"] = windows
            kept_gt.append(d)
    qids = {d["qid"] for d in kept_gt}
    return [d for d in submission if d["qid"] in qids], kept_gt


def eval_moment_retrieval(submission: list[dict], ground_truth: list[dict], variant: str = "cgdetr") -> dict:
    """{bucket: {"MR-mIoU", "MR-mAP": {thr: v, "average": v}, "MR-R1": {thr: v}}} for short/middle/long/full."""
    r1_thresholds = R1_IOU_THRESHOLDS[variant]
    out = {}
    for name, bounds in LENGTH_BUCKETS:
        sub, gt = _in_bucket(submission, ground_truth, bounds)
        if not gt:  # e.g. Charades has no window over 30 s in some subsets: zeros, not a crash
            mr_map = {**{str(t): 0.0 for t in MAP_IOU_THRESHOLDS}, "average": 0.0}
            r1, miou = {str(t): 0.0 for t in r1_thresholds}, 0.0
        else:
            gt_by_qid = {d["qid"]: d for d in gt}
            mr_map = _mr_map(sub, gt_by_qid)
            r1, miou = _mr_r1(sub, gt_by_qid, r1_thresholds)
        bucket = {"MR-mIoU": miou} if variant == "cgdetr" else {}
        bucket.update({"MR-mAP": mr_map, "MR-R1": r1})
        out[name] = bucket
    return out


# ---------------------------------------------------------------------------------------- highlight detection
def _precision_recall_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score threshold, as scikit-learn's ``precision_recall_curve``
    returns them: from full recall down, then the (precision 1, recall 0) end point."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, y_true = scores[order], y_true[order]
    last_of_each_score = np.r_[np.where(np.diff(scores))[0], y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[last_of_each_score]
    fps = 1 + last_of_each_score - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    full = tps.searchsorted(tps[-1])  # stop once every positive is recalled
    return np.hstack([precision[full::-1], 1]), np.hstack([recall[full::-1], 0])


def saliency_ap(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Upstream's ``get_ap``: AP of clip scores against binary labels (same length).

    All-negative labels give 0, all-positive 1. The "interpolation" is a running max taken from the full-recall
    end towards the low-recall end (upstream's order, kept for identical values); AP = mean precision at the
    points where recall changes.
    """
    if np.all(y_true == y_true[0]):
        return 0.0 if y_true[0] == 0 else 1.0
    precision, recall = _precision_recall_curve(y_true == 1, scores)
    recall = recall.astype(np.float32)
    precision = np.maximum.accumulate(precision)
    return float(np.mean(precision[np.where(np.diff(recall))]))


def _gt_clip_scores(d: dict) -> np.ndarray:
    """[n_clips, 3] annotator scores 0..4 over the whole video (0 outside ``relevant_clip_ids``)."""
    n = int(d["duration"] / CLIP_SECONDS)
    full = np.zeros((n, 3))
    ids = np.asarray(d["relevant_clip_ids"], dtype=int)
    if ids.size and ids.max() >= n:
        raise ModelError(f"qid {d['qid']}: relevant_clip_ids reach clip {ids.max()} but duration "
                         f"{d['duration']} s has only {n} clips")
    full[ids] = np.asarray(d["saliency_scores"], dtype=float).reshape(len(ids), 3)
    return full


def _fit_length(scores: np.ndarray, n: int) -> np.ndarray:
    """Predicted clip scores cut or zero-padded to the GT length (upstream pads short predictions)."""
    if len(scores) >= n:
        return scores[:n]
    return np.concatenate([scores, np.zeros(n - len(scores))])


def eval_highlight(submission: list[dict], ground_truth: list[dict]) -> dict:
    """{"HL-min-<level>": {"HL-mAP", "HL-Hit1"}} for Fair / Good / VeryGood (percent)."""
    gt_scores = {d["qid"]: _gt_clip_scores(d) for d in ground_truth}
    out = {}
    for level, min_score in SALIENCY_LEVELS:
        hits = np.zeros((len(submission), 3))
        aps = np.zeros((len(submission), 3))
        for i, d in enumerate(submission):
            positive = (gt_scores[d["qid"]] >= min_score).astype(float)  # [n_clips, 3]
            pred = np.asarray(d["pred_saliency_scores"], dtype=float)
            top = int(np.argmax(pred))
            if top < len(positive):
                hits[i] = positive[top]
            pred = _fit_length(pred, len(positive))
            for a in range(3):
                aps[i, a] = saliency_ap(positive[:, a], pred)
        # Hit@1: a hit if ANY annotator rates the top clip positive; mAP: mean over queries and annotators.
        out[f"HL-min-{level}"] = {"HL-mAP": _pct(np.mean(aps)), "HL-Hit1": _pct(np.mean(np.max(hits, 1)))}
    return out


# -------------------------------------------------------------------------------------------------- top level
def _has_saliency_labels(ground_truth: list[dict]) -> bool:
    return all("relevant_clip_ids" in d and "saliency_scores" in d for d in ground_truth)


def evaluate(submission: list[dict], ground_truth: list[dict], variant: str = "cgdetr") -> dict:
    """All official metrics of ``submission`` (prediction dicts) against ``ground_truth`` (annotation dicts).

    Returns an OrderedDict: "brief" (the headline numbers) first, then the full per-bucket / per-level dicts in
    key order, exactly as the official eval writes its JSON.
    Raises ModelError when the two sets of qids differ or a prediction is malformed.
    """
    if variant not in VARIANTS:
        raise ModelError(f"unknown eval variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not submission:
        raise ModelError("the submission has no predictions")
    pred_qids, gt_qids = [d.get("qid") for d in submission], {d["qid"] for d in ground_truth}
    if len(set(pred_qids)) != len(pred_qids):
        raise ModelError("the submission has more than one prediction for some qid")
    if set(pred_qids) != gt_qids:
        missing, extra = len(gt_qids - set(pred_qids)), len(set(pred_qids) - gt_qids)
        raise ModelError(f"submission and ground truth have different qids ({missing} GT qids without a "
                         f"prediction, {extra} predicted qids not in the GT)")

    for d in ground_truth:
        if not d.get("relevant_windows"):
            raise ModelError(f"ground truth qid {d['qid']!r} has no relevant_windows (an unlabelled split?)")
    metrics, brief = {}, OrderedDict()
    if "pred_relevant_windows" in submission[0]:
        for d in submission:
            if not d.get("pred_relevant_windows"):
                raise ModelError(f"qid {d['qid']}: empty pred_relevant_windows")
        mr = eval_moment_retrieval(submission, ground_truth, variant)
        metrics.update(mr)
        mr_brief = {"MR-full-mAP": mr["full"]["MR-mAP"]["average"],
                    "MR-full-mAP@0.5": mr["full"]["MR-mAP"]["0.5"],
                    "MR-full-mAP@0.75": mr["full"]["MR-mAP"]["0.75"],
                    "MR-short-mAP": mr["short"]["MR-mAP"]["average"],
                    "MR-middle-mAP": mr["middle"]["MR-mAP"]["average"],
                    "MR-long-mAP": mr["long"]["MR-mAP"]["average"],
                    "MR-full-R1@0.5": mr["full"]["MR-R1"]["0.5"],
                    "MR-full-R1@0.7": mr["full"]["MR-R1"]["0.7"]}
        if variant == "cgdetr":
            mr_brief["MR-full-mIoU"] = mr["full"]["MR-mIoU"]
            mr_brief["MR-full-R1@0.3"] = mr["full"]["MR-R1"]["0.3"]
        brief.update(sorted(mr_brief.items()))
    if "pred_saliency_scores" in submission[0] and _has_saliency_labels(ground_truth):
        hl = eval_highlight(submission, ground_truth)
        metrics.update(hl)
        for level, vals in hl.items():
            brief[f"{level}-mAP"] = vals["HL-mAP"]
            brief[f"{level}-Hit1"] = vals["HL-Hit1"]
    result = OrderedDict(brief=brief)
    result.update(sorted(metrics.items()))
    return result


def evaluate_files(submission_path: str, gt_path: str, variant: str = "cgdetr") -> dict:
    """`vmr eval`: the official metrics of a submission jsonl against an annotation jsonl."""
    records = {}
    for path in (submission_path, gt_path):
        records[path] = load_jsonl(path)
        if not records[path]:
            raise ModelError(f"{path} holds no records (jsonl: one JSON record a line)")
    return evaluate(records[submission_path], records[gt_path], variant)


def describe_metrics(metrics: dict) -> str:
    """The headline numbers, one per line, aligned."""
    brief = metrics["brief"]
    width = max(len(k) for k in brief) if brief else 0
    return "\n".join(f"{k:<{width}}  {v:6.2f}" for k, v in brief.items())
