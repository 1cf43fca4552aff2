"""One model sample: the video and text features as LLMEPET reads them, shared by training, prediction and rerank."""
from __future__ import annotations

import torch


def temporal_endpoint_feature(n_clips: int, device=None) -> torch.Tensor:
    """TEF as the authors' dataset computes it: row i = (i / n, (i + 1) / n).

    Returns: Tensor [n_clips, 2].
    """
    start = torch.arange(n_clips, dtype=torch.float32, device=device) / n_clips
    return torch.stack([start, start + 1.0 / n_clips], dim=1)
