"""A random-weight SlowFast-R50 8x8 weights file, for tests and benchmarks of the SlowFast ingest (the real weights
cannot be downloaded here; the compute and the plumbing are the same).

Conv weights at He scale (a residual branch's last conv smaller) so activations stay O(1) through the 50 layers and
the 2304-d outputs are well above fp16's resolution; BatchNorm statistics and affine terms random too. Saved in
pytorchvideo's layout, ``{"model_state": state_dict}``, as a user's ``--slowfast-weights`` file would be.

    save_random_slowfast(path, seed=0) -> path
"""
from __future__ import annotations

import math

import torch

from model.inference.slowfast import SlowFastR50
from model.inference.slowfast_weights import PYTORCHVIDEO_NAMES


def save_random_slowfast(path, seed: int = 0):
    """Write random SlowFastR50 weights to ``path`` in pytorchvideo's layout; returns ``path``."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in SlowFastR50().state_dict().items():
        if t.ndim == 5:
            scale = math.sqrt(2.0 / t[0].numel()) * (0.3 if name.endswith(".c.conv.weight") else 1.0)
            value = torch.randn(t.shape, generator=g) * scale
        elif name.endswith("running_var") or name.endswith("bn.weight"):
            value = torch.rand(t.shape, generator=g) + 0.5
        else:  # running_mean, bias
            value = torch.randn(t.shape, generator=g) * 0.1
        state[PYTORCHVIDEO_NAMES[name]] = value
    torch.save({"model_state": state}, path)
    return path
