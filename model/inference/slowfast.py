"""SlowFast-R50 8x8 as the public SlowFast features were computed: 2304-d, the pooled res5 of both pathways.

The public QVHighlights / Charades-STA / TACoS ``slowfast_features`` come from HERO's extractor running PySlowFast's
SlowFast-R50 8x8 (alpha 4, beta 1/8, fusion kernel 7x1x1, Kinetics-400 weights) and keeping, per clip, the global
average of each pathway's res5 output concatenated as [slow 2048 | fast 256] - the head's input, before dropout and
the classifier. This module computes exactly that from 32 normalised frames per clip; the frame rule that picks the
32 frames is indexer/slowfast_frames.py, the weights model/slowfast_weights.py.

    SlowFastR50()(frames float [N, 3, 32, H, W]) -> features [N, 2304]   (>= 0: post-ReLU averages)

Shapes at the extractor's 224 x 224 (N clips):
    input          fast [N, 3, 32, 224, 224]; slow = fast at SLOW_INDICES: [N, 3, 8, 224, 224]
    stem           slow [N, 64, 8, 56, 56]        fast [N, 8, 32, 56, 56]     (+ fuse: slow 64 + 16 channels)
    res2           slow [N, 256, 8, 56, 56]       fast [N, 32, 32, 56, 56]    (+ fuse: 256 + 64)
    res3           slow [N, 512, 8, 28, 28]       fast [N, 64, 32, 28, 28]    (+ fuse: 512 + 128)
    res4           slow [N, 1024, 8, 14, 14]      fast [N, 128, 32, 14, 14]   (+ fuse: 1024 + 256)
    res5           slow [N, 2048, 8, 7, 7]        fast [N, 256, 32, 7, 7]
    output         [N, 2048 + 256] = mean over (T, H, W) of each, slow first

The extractor's head pools with AvgPool3d kernels (8, 7, 7) / (32, 7, 7) at stride 1, which at 224 x 224 is the
global average; here it is a mean over (T, H, W) at any size, so tests can run small inputs. BatchNorm is frozen
(inference only: running statistics, eps 1e-5), so the state dict holds no ``num_batches_tracked`` and a loader can
insist that every key is filled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ALPHA = 4  # fast frames per slow frame
BETA_INV = 8  # slow channels per fast channel
FUSION_RATIO = 2  # the fast->slow fusion conv doubles the fast channels
FUSION_KERNEL = 7  # temporal kernel of the fusion conv (stride ALPHA)
NUM_FRAMES = 32  # fast-pathway frames per clip
STAGE_DEPTHS = (3, 4, 6, 3)  # ResNet-50: bottleneck blocks in res2..res5
STAGES = ("res2", "res3", "res4", "res5")
FUSED_AFTER = ("stem", "res2", "res3", "res4")  # fast->slow lateral connections (none after res5)
SLOW_TEMPORAL_KERNELS = (1, 1, 3, 3)  # conv_a temporal kernel per stage: the slow pathway is 2-D until res4
FAST_TEMPORAL_KERNELS = (3, 3, 3, 3)
SPATIAL_STRIDES = (1, 2, 2, 2)  # on each stage's first 3x3 conv (PySlowFast STRIDE_1X1 False)
BN_EPS = 1e-5
FEATURE_DIM = 2048 + 256


def slow_indices(num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """The fast frames the slow pathway sees: ``linspace(0, T-1, T // ALPHA)`` truncated, as PySlowFast's pack.

    For T = 32 that is [0, 4, 8, 13, 17, 22, 26, 31] - not a stride of 4.
    """
    return torch.linspace(0, num_frames - 1, num_frames // ALPHA).long()


class FrozenBatchNorm3d(nn.Module):
    """BatchNorm3d in inference mode: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.

    All four are buffers (the extractor never trains), so the state dict has exactly these keys per norm.
    """

    def __init__(self, channels: int, eps: float = BN_EPS):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConvBN(nn.Module):
    """Conv3d without bias, then frozen BatchNorm, then ReLU when ``relu``: keys ``conv.weight``, ``bn.*``."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=(1, 1, 1), relu: bool = True):
        super().__init__()
        padding = tuple(k // 2 for k in kernel)
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm3d(c_out)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class Bottleneck(nn.Module):
    """ResNet bottleneck: a (T x 1 x 1) -> b (1 x 3 x 3, spatial stride) -> c (1 x 1 x 1), plus the shortcut.

    [N, c_in, T, H, W] -> [N, c_out, T, H / stride, W / stride]. The shortcut is a strided 1x1x1 ConvBN when the
    channels or the size change (each stage's first block), the identity otherwise.
    """

    def __init__(self, c_in: int, c_inner: int, c_out: int, temporal_kernel: int, stride: int):
        super().__init__()
        self.a = ConvBN(c_in, c_inner, (temporal_kernel, 1, 1))
        self.b = ConvBN(c_inner, c_inner, (1, 3, 3), stride=(1, stride, stride))
        self.c = ConvBN(c_inner, c_out, (1, 1, 1), relu=False)
        needs_projection = c_in != c_out or stride != 1
        self.shortcut = ConvBN(c_in, c_out, (1, 1, 1), (1, stride, stride), relu=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(shortcut + self.c(self.b(self.a(x))))


class Pathway(nn.Module):
    """One pathway's stem and res2..res5 (no fusion: SlowFastR50 interleaves that).

    ``width`` is the stem's channels (slow 64, fast 8); ``lateral`` the channels the fusion adds to each stage's
    input (slow: 2 x the fast channels, fast: 0). Keys: ``stem.*``, ``res{2..5}.{block}.{a,b,c,shortcut}.*``.
    """

    def __init__(self, width: int, stem_temporal_kernel: int, temporal_kernels, lateral):
        super().__init__()
        self.stem = ConvBN(3, width, (stem_temporal_kernel, 7, 7), stride=(1, 2, 2))
        c_in = width
        for i, name in enumerate(STAGES):
            c_inner = width * 2 ** i
            c_out = 4 * c_inner
            blocks = []
            for j in range(STAGE_DEPTHS[i]):
                blocks.append(Bottleneck(c_in + lateral[i] if j == 0 else c_out, c_inner, c_out,
                                         temporal_kernels[i], SPATIAL_STRIDES[i] if j == 0 else 1))
            setattr(self, name, nn.ModuleList(blocks))
            c_in = c_out

    def run_stem(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, T, H, W] -> [N, width, T, ~H/4, ~W/4]: conv 7x7 stride 2, then max-pool 3x3 stride 2."""
        return F.max_pool3d(self.stem(x), kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def run_stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        for block in getattr(self, name):
            x = block(x)
        return x


class SlowFastR50(nn.Module):
    """SlowFast-R50 8x8 feature extractor (PySlowFast SLOWFAST_8x8_R50 up to the head's pooling).

    forward(frames [N, 3, 32, H, W], normalised RGB: (x / 255 - 0.45) / 0.225) -> [N, 2304] = [slow 2048 | fast 256].
    Keys: ``slow.*`` and ``fast.*`` (Pathway), ``fuse.{stem,res2,res3,res4}.{conv.weight,bn.*}``.
    """

    def __init__(self):
        super().__init__()
        fast_width = 64 // BETA_INV
        fast_channels = [fast_width] + [4 * fast_width * 2 ** i for i in range(3)]  # after stem, res2, res3, res4
        fused = [FUSION_RATIO * c for c in fast_channels]  # what each fusion adds to the slow pathway: 16 .. 256
        self.slow = Pathway(64, 1, SLOW_TEMPORAL_KERNELS, fused)
        self.fast = Pathway(fast_width, 5, FAST_TEMPORAL_KERNELS, (0, 0, 0, 0))
        self.fuse = nn.ModuleDict({
            name: ConvBN(c // FUSION_RATIO, c, (FUSION_KERNEL, 1, 1), stride=(ALPHA, 1, 1))
            for name, c in zip(FUSED_AFTER, fused)
        })

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [N, 3, T, H, W] (T = 32 in the recipe) -> [N, 2304]; the slow pathway takes slow_indices(T)."""
        slow = frames.index_select(2, slow_indices(frames.shape[2]).to(frames.device))
        return self.forward_pathways(slow, frames)

    def forward_pathways(self, slow: torch.Tensor, fast: torch.Tensor) -> torch.Tensor:
        """slow [N, 3, T/4, H, W], fast [N, 3, T, H, W] -> [N, 2304] (slow res5 mean | fast res5 mean)."""
        slow, fast = self.slow.run_stem(slow), self.fast.run_stem(fast)
        slow = torch.cat([slow, self.fuse["stem"](fast)], 1)
        for name in STAGES:
            slow, fast = self.slow.run_stage(name, slow), self.fast.run_stage(name, fast)
            if name in self.fuse:
                slow = torch.cat([slow, self.fuse[name](fast)], 1)
        return torch.cat([slow.mean(dim=(2, 3, 4)), fast.mean(dim=(2, 3, 4))], 1)
