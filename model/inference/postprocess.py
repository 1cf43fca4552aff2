"""Model outputs -> submission rows, as the authors' inference + PostProcessorDETR compute them.

Per sample: foreground probability = softmax(pred_logits)[..., 0]; spans (normalised center/width) -> seconds
times the window's duration, clamped to [0, duration]; rows [st, ed, score] sorted by score (descending), each
number rounded to 4 decimals; then the dataset's post-processor: clamp to [0, max_ts] (the preset's
``max_timestamp``; QVHighlights and Charades-STA: 150 s) and round both ends to a multiple of the clip length;
scores re-rounded to 4 decimals.
Saliency scores are passed through float16 (the authors call ``.half()`` before writing them), valid clips only.
The authors' default is no NMS (nms_thd = -1); NMS is used here only to merge the windows of a long video.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.spans import seconds_to_clip, span_cxw_to_xx, temporal_nms



def _round4(x: float) -> float:
    return float(f"{x:.4f}")


def decode_outputs(outputs: dict, src_vid_mask: torch.Tensor, metas: list[dict]) -> list[dict]:
    """Raw per-sample predictions in window seconds.

    Args:
        outputs: model outputs with pred_logits [B, Q, 2], pred_spans [B, Q, 2] (cxw, normalised),
            saliency_scores [B, Lv].
        src_vid_mask: [B, Lv] (1 = valid clip).
        metas: per sample dict with "duration" (seconds the window covers).
    Returns: per sample {"windows": [[st, ed, score], ...] score-sorted, rounded, "saliency": [float, ...]}, and
    "relevance": [float, ...] in (0, 1) when the model has the relevance head.
    """
    scores = F.softmax(outputs["pred_logits"].float(), -1)[..., 0]  # foreground is class 0
    spans = span_cxw_to_xx(outputs["pred_spans"].float())
    saliency = outputs["saliency_scores"].half()  # as the authors: fp16 values in the submission
    lengths = src_vid_mask.sum(1).long().tolist()
    out = []
    for i, meta in enumerate(metas):
        duration = float(meta["duration"])
        xx = torch.clamp(spans[i].cpu() * duration, 0, duration)
        rows = torch.cat([xx, scores[i].cpu()[:, None]], dim=1).tolist()
        rows = sorted(rows, key=lambda r: r[2], reverse=True)
        rows = [[_round4(v) for v in r] for r in rows]
        out.append({"windows": rows, "saliency": saliency[i, :lengths[i]].float().cpu().tolist()})
        if "relevance_scores" in outputs:  # the relevance head's per-clip probability (model.net.llmepet.RelevanceHead)
            out[-1]["relevance"] = outputs["relevance_scores"][i, :lengths[i]].float().sigmoid().cpu().tolist()
    return out


def clean_windows(rows: list[list[float]], clip_length: float, max_ts: float | None) -> list[list[float]]:
    """The authors' PostProcessorDETR: clamp to [0, max_ts] (if set), round to multiples of clip_length."""
    out = []
    for st, ed, score in rows:
        if max_ts is not None:
            st, ed = min(max(st, 0.0), max_ts), min(max(ed, 0.0), max_ts)
        # torch.round is round-half-to-even, as Python's round
        st, ed = round(st / clip_length) * clip_length, round(ed / clip_length) * clip_length
        out.append([float(st), float(ed), _round4(score)])
    return out


def merge_windows(parts: list[tuple[float, dict]], n_clips: int, clip_length: float, nms_iou: float = 0.7,
                  max_keep: int = 10) -> dict:
    """One prediction for a long video from its windows.

    Args:
        parts: (offset seconds, decoded window prediction) per window.
        n_clips: clips of the whole video.
    Returns: {"windows": NMS-merged rows in video seconds, "saliency": [n_clips] mean over the covering windows}.
    """
    rows, sal_sum, sal_cnt = [], [0.0] * n_clips, [0] * n_clips
    for offset, pred in parts:
        rows += [[_round4(st + offset), _round4(ed + offset), s] for st, ed, s in pred["windows"]]
        for j, v in enumerate(pred["saliency"]):
            c = seconds_to_clip(offset, clip_length) + j
            if c < n_clips:
                sal_sum[c] += v
                sal_cnt[c] += 1
    saliency = [s / c if c else 0.0 for s, c in zip(sal_sum, sal_cnt)]
    kept = temporal_nms([r[:2] for r in rows], [r[2] for r in rows], nms_iou, max_keep)
    return {"windows": [rows[i] for i in kept], "saliency": saliency}
