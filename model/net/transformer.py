"""CG-DETR building blocks: the position encodings (a fixed sine encoding over valid clips, a trainable text
position table, the sine embedding of span anchors), encoder layers, the text-to-video (T2V) layer with dummy
tokens, the conditional-DETR decoder with span anchors, and the projection-free attention they share.

Layout is sequence-first as in DETR: tensors are [L, B, D] unless a docstring says otherwise. Padding masks
are [B, L] with True = padding (ignored), the convention of ``nn.MultiheadAttention``.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
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


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample (batch dim 1 of [L, B, D]) in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = (keep + torch.rand((1, x.shape[1], 1), dtype=x.dtype, device=x.device)).floor_()
        return x / keep * mask


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


class ProjectionFreeAttention(nn.Module):
    """Multi-head attention whose inputs are already projected (callers build q/k/v); only an output Linear.

    Query/key width ``embed_dim`` and value width ``value_dim`` may differ (the decoder's cross-attention
    concatenates content and position per head, doubling q/k).
    """

    def __init__(self, embed_dim: int, num_heads: int, value_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.value_dim = value_dim or embed_dim
        self.dropout = dropout
        self.out_proj = nn.Linear(self.value_dim, self.value_dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q, k, v, key_padding_mask=None, pair_mask=None, skip_values: int = 0):
        """q [Lq, B, E], k [Lk, B, E], v [Lk, B, Ev]; key_padding_mask [B, Lk]; pair_mask [B, H, Lq, Lk]
        (True = blocked). ``skip_values`` > 0: the first keys take attention mass but contribute no value
        (CG-DETR's dummy tokens absorb attention of clips unrelated to the sentence).

        Returns: out [Lq, B, Ev], weights averaged over heads [B, Lq, Lk] (before dropout).
        """
        lq, b, e = q.shape
        lk = k.shape[0]
        h = self.num_heads
        q = (q * (e // h) ** -0.5).reshape(lq, b, h, e // h).permute(1, 2, 0, 3)  # [B, H, Lq, d]
        k = k.reshape(lk, b, h, e // h).permute(1, 2, 0, 3)
        v = v.reshape(lk, b, h, self.value_dim // h).permute(1, 2, 0, 3)
        scores = q @ k.transpose(-1, -2)  # [B, H, Lq, Lk]
        if pair_mask is not None:
            scores = scores.masked_fill(pair_mask, float("-inf"))
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        weights = scores.softmax(-1)
        dropped = F.dropout(weights, self.dropout, self.training)
        out = dropped[..., skip_values:] @ v[:, :, skip_values:]  # [B, H, Lq, dv]
        out = out.permute(2, 0, 1, 3).reshape(lq, b, self.value_dim)
        return self.out_proj(out), weights.mean(1)


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer; positions added to queries and keys only (DETR)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.drop_path1 = DropPath(dropout)
        self.drop_path2 = DropPath(dropout)
        self.activation = nn.PReLU()

    def forward(self, src, padding_mask=None, pos=None):
        """src [L, B, D], padding_mask [B, L], pos [L, B, D] -> [L, B, D]."""
        qk = src if pos is None else src + pos
        attended = self.self_attn(qk, qk, value=src, key_padding_mask=padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.drop_path1(attended))
        hidden = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.drop_path2(hidden))


class Encoder(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)

    def forward(self, src, padding_mask=None, pos=None):
        for layer in self.layers:
            src = layer(src, padding_mask=padding_mask, pos=pos)
        return src


class T2VLayer(nn.Module):
    """Clips (queries) attend to [dummy tokens; words] (keys); only clips are updated.

    The residual after attention skips the first LayerNorm: out = norm2(h + FFN(norm1(h))), h = clip + attn.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_dummies: int):
        super().__init__()
        self.nhead = nhead
        self.num_dummies = num_dummies
        self.self_attn = ProjectionFreeAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.drop_path1 = DropPath(dropout)
        self.drop_path2 = DropPath(dropout)
        self.activation = nn.PReLU()

    def _feed_forward(self, h):
        ffn = self.linear2(self.dropout(self.activation(self.linear1(self.norm1(h)))))
        return self.norm2(h + self.drop_path2(ffn))

    def forward(self, vid, txt, vid_pos, txt_pos, txt_padding, pair_mask=None):
        """vid [Lv, B, D], txt [Ld+Lt, B, D] (dummies first), txt_padding [B, Ld+Lt].

        Returns: new vid [Lv, B, D], attention [B, Lv, Ld+Lt].
        """
        attended, weights = self.self_attn(vid + vid_pos, txt + txt_pos, txt, key_padding_mask=txt_padding,
                                           pair_mask=pair_mask, skip_values=self.num_dummies)
        return self._feed_forward(vid + self.drop_path1(attended)), weights

    def forward_without_keys(self, x):
        """The saliency token's pass: the authors run this layer with an empty key set, where attention
        yields zeros and the output projection leaves only its bias. x [1, B, D] -> [1, B, D]."""
        return self._feed_forward(x + self.drop_path1(self.self_attn.out_proj.bias.expand_as(x)))


class T2VEncoder(nn.Module):
    def __init__(self, layer: T2VLayer, num_layers: int, cross_sample_mask: bool = False):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.cross_sample_mask = cross_sample_mask

    def _authors_pair_mask(self, vid_padding, txt_padding):
        """Their 3-D attn_mask is built batch-repeated ([b0..bB-1] * H) but read head-major (row b*H + h),
        so sample b, head h is masked with sample (b*H + h) % B's (padded clip, padded word) pairs."""
        b = vid_padding.shape[0]
        h = self.layers[0].nhead
        source = (torch.arange(b, device=vid_padding.device)[:, None] * h
                  + torch.arange(h, device=vid_padding.device)[None]) % b  # [B, H]
        return vid_padding[source][..., :, None] & txt_padding[source][..., None, :]  # [B, H, Lv, Lk]

    def forward(self, vid, txt, vid_pos, txt_pos, vid_padding, txt_padding):
        """Returns: vid [Lv, B, D], attention averaged over layers [B, Lv, Ld+Lt]."""
        pair_mask = self._authors_pair_mask(vid_padding, txt_padding) if self.cross_sample_mask else None
        total = None
        for layer in self.layers:
            vid, weights = layer(vid, txt, vid_pos, txt_pos, txt_padding, pair_mask)
            total = weights if total is None else total + weights
        return vid, total / len(self.layers)

    def forward_without_keys(self, x):
        for layer in self.layers:
            x = layer.forward_without_keys(x)
        return x


class DecoderLayer(nn.Module):
    """Conditional-DETR decoder layer: content and sine-position parts concatenated per head in
    cross-attention; the query's own position projection only in the first layer."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, is_first: bool):
        super().__init__()
        self.nhead = nhead
        self.is_first = is_first
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = ProjectionFreeAttention(d_model, nhead, value_dim=d_model, dropout=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.drop_path1 = DropPath(dropout)

        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if is_first else None
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.cross_attn = ProjectionFreeAttention(d_model * 2, nhead, value_dim=d_model, dropout=dropout)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.drop_path2 = DropPath(dropout)
        self.drop_path3 = DropPath(dropout)
        self.activation = nn.PReLU()

    def forward(self, tgt, memory, memory_padding, pos, query_pos, query_sine):
        """tgt [Q, B, D], memory [L, B, D], memory_padding [B, L], pos [L, B, D], query_pos / query_sine
        [Q, B, D] -> [Q, B, D]."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        attended = self.self_attn(q, k, self.sa_v_proj(tgt))[0]
        tgt = self.norm1(tgt + self.drop_path1(attended))

        nq, b, d = tgt.shape
        hd = d // self.nhead
        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.is_first:
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q = torch.cat([q.view(nq, b, self.nhead, hd),
                       self.ca_qpos_sine_proj(query_sine).view(nq, b, self.nhead, hd)], dim=3).view(nq, b, 2 * d)
        k = torch.cat([k.view(-1, b, self.nhead, hd), k_pos.view(-1, b, self.nhead, hd)], dim=3).view(-1, b, 2 * d)
        attended = self.cross_attn(q, k, self.ca_v_proj(memory), key_padding_mask=memory_padding)[0]
        tgt = self.norm2(tgt + self.drop_path2(attended))
        hidden = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.drop_path3(hidden))


class Decoder(nn.Module):
    """Span queries refined layer by layer from learned (center, width) anchors (DAB-DETR style)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, num_layers: int):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(DecoderLayer(d_model, nhead, dim_feedforward, dropout, is_first=(i == 0))
                                    for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.ref_point_head = MLP(d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 1, 2)
        self.bbox_embed = MLP(d_model, d_model, 2, 3)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(self, memory, memory_padding, pos, anchors):
        """memory [L, B, D], memory_padding [B, L], pos [L, B, D], anchors [Q, B, 2] (before sigmoid).

        Returns: hs [layers, B, Q, D] (normed outputs), references [layers, B, Q, 2] (the anchor each layer
        started from, after sigmoid).
        """
        out = memory.new_zeros(anchors.shape[0], memory.shape[1], self.d_model)
        ref = anchors.sigmoid()
        references, hs = [ref], []
        for i, layer in enumerate(self.layers):
            sine = sine_embed_of_spans(ref, self.d_model)
            query_pos = self.ref_point_head(sine)
            if i > 0:
                sine = sine * self.query_scale(out)
            # width-modulated attention: rescale by a learned width over the anchor's width
            sine = sine * (self.ref_anchor_head(out).sigmoid()[..., 0] / ref[..., 1]).unsqueeze(-1)
            out = layer(out, memory, memory_padding, pos, query_pos, sine)
            new_ref = (self.bbox_embed(out) + inverse_sigmoid(ref)).sigmoid()
            if i < len(self.layers) - 1:
                references.append(new_ref)
            ref = new_ref.detach()
            hs.append(self.norm(out))
        return torch.stack(hs).transpose(1, 2), torch.stack(references).transpose(1, 2)
