"""VCMR R@k, IoU >= t: how often a library search puts the sentence's moment among its first k moments.

A ranked moment matches when it lies in the ground-truth video and overlaps one of that video's ground-truth
windows by temporal IoU >= t (the TVR / VCMR convention). One definition for the ranking rule's fit
(retriever.fit_score), the corpus metrics of the test world (world.corpus) and the benchmarks.
"""
from __future__ import annotations

from model.spans import temporal_iou


def moment_hits(moments: list[dict], gt_video: int, gt_windows: list, iou: float) -> list[bool]:
    """Per ranked moment ({video_id, start, end, ...}): does it match the ground truth at this IoU?"""
    return [m["video_id"] == gt_video and any(temporal_iou((m["start"], m["end"]), w) >= iou for w in gt_windows)
            for m in moments]


def query_hits(moments: list[dict], gt_video: int, gt_windows: list, ks, ious) -> dict[str, bool]:
    """{"VCMR_R{k}@{t}": one of the first k moments matches at IoU t} of one query."""
    ok = {t: moment_hits(moments, gt_video, gt_windows, t) for t in ious}
    return {f"VCMR_R{k}@{t}": any(ok[t][:k]) for k in ks for t in ious}


def vcmr_recall(per_query, ks, ious) -> dict[str, float]:
    """{"VCMR_R{k}@{t}": % of queries} over (ranked moments, gt video id, gt windows) per query (0 for none)."""
    totals = {f"VCMR_R{k}@{t}": 0 for k in ks for t in ious}
    n = 0
    for moments, gt_video, gt_windows in per_query:
        n += 1
        for key, hit in query_hits(moments, gt_video, gt_windows, ks, ious).items():
            totals[key] += hit
    return {key: 100.0 * hits / max(n, 1) for key, hits in totals.items()}
