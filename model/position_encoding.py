"""Position encodings: a fixed sine encoding over valid clips, and a trainable text position table."""
from __future__ import annotations

import math

import torch
from torch import nn


class ClipSinePosition(nn.Module):
    """Sine/cosine encoding of each clip's position normalised to [0, 2*pi] over the video's VALID clips.

    Padding does not change the encoding of valid clips: positions are the running count of valid clips,
    divided by the total count.
    """

    def __init__(self, num_feats: int, temperature: float = 10000.0):
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [B, L] (1 = valid) -> encoding [B, L, num_feats]."""
        position = mask.cumsum(1, dtype=torch.float32)
        position = position / (position[:, -1:] + 1e-6) * (2 * math.pi)
        pair = torch.arange(self.num_feats, dtype=torch.float32, device=mask.device) // 2
        freq = self.temperature ** (2 * pair / self.num_feats)
        angle = position[:, :, None] / freq  # [B, L, F]
        # interleave sin (even channels) and cos (odd channels)
        return torch.stack((angle[:, :, 0::2].sin(), angle[:, :, 1::2].cos()), dim=3).flatten(2)


class TextPositionTable(nn.Module):
    """Learned absolute positions for text tokens: LayerNorm(x + table[pos]) then dropout."""

    def __init__(self, max_len: int, dim: int, dropout: float):
        super().__init__()
        self.table = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]."""
        positions = torch.arange(x.shape[1], device=x.device)
        return self.dropout(self.norm(x + self.table(positions)[None]))


def sine_embed_of_spans(spans: torch.Tensor, dim: int) -> torch.Tensor:
    """Sine embedding of (center, width) anchors for the decoder queries.

    spans [..., 2] in [0, 1] -> [..., dim]: dim/2 channels for the center, dim/2 for the width.
    """
    half = dim // 2
    pair = torch.arange(half, dtype=torch.float32, device=spans.device) // 2
    freq = 10000 ** (2 * pair / half)
    parts = []
    for k in range(2):
        angle = spans[..., k, None] * (2 * math.pi) / freq
        parts.append(torch.stack((angle[..., 0::2].sin(), angle[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)
