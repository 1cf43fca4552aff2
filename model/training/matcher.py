"""Hungarian matching of predicted spans to target spans (scipy's linear_sum_assignment)."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from model.spans import generalized_temporal_iou, span_cxw_to_xx

Indices = list[tuple[torch.Tensor, torch.Tensor]]


def _assign(cost: torch.Tensor, sizes: list[int]) -> Indices:
    """cost [B, Q, sum(sizes)] -> per sample (query indices, target indices)."""
    cost = cost.cpu()
    out = []
    for i, block in enumerate(cost.split(sizes, -1)):
        rows, cols = linear_sum_assignment(block[i].numpy())
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


class HungarianMatcher(nn.Module):
    """Cost = cost_span * L1(cxw) - cost_giou * GIoU - cost_class * p(foreground)."""

    def __init__(self, cost_class: float = 4.0, cost_span: float = 10.0, cost_giou: float = 1.0):
        super().__init__()
        if cost_class == 0 and cost_span == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_span, self.cost_giou = cost_class, cost_span, cost_giou

    @torch.no_grad()
    def forward(self, pred_spans: torch.Tensor, target_spans: list[torch.Tensor],
                pred_logits: torch.Tensor | None = None) -> Indices:
        """pred_spans [B, Q, 2] (cxw), target_spans: B tensors [n_i, 2] (cxw), pred_logits [B, Q, 2] or None
        (no class cost: the event matcher). Returns per sample (query idx, target idx), min(Q, n_i) pairs."""
        b, q = pred_spans.shape[:2]
        out_spans = pred_spans.flatten(0, 1).float()
        tgt = torch.cat(target_spans).to(out_spans)
        # summed in the authors' order so near-ties resolve the same way
        cost = self.cost_span * torch.cdist(out_spans, tgt, p=1) \
            + self.cost_giou * -generalized_temporal_iou(span_cxw_to_xx(out_spans), span_cxw_to_xx(tgt))
        if pred_logits is not None:
            foreground = pred_logits.flatten(0, 1).softmax(-1)[:, :1].expand(-1, len(tgt))  # class 0
            cost = cost + self.cost_class * -foreground
        return _assign(cost.view(b, q, -1), [len(t) for t in target_spans])
