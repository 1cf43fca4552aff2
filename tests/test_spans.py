"""model.spans: the clip grid, tiling, IoU (numpy and torch alike) and NMS."""
import numpy as np
import pytest
import torch

from model.spans import (clip_bounds, clip_to_seconds, covering_clips, cross_iou, generalized_temporal_iou,
                         num_clips, paired_iou, seconds_to_clip, span_cxw_to_xx, span_xx_to_cxw, temporal_iou,
                         temporal_nms, tile_windows)


def test_clip_grid_conversions():
    assert num_clips(150.0) == 75 and num_clips(30.7) == 15 and num_clips(0.2) == 1
    assert seconds_to_clip(3.0) == 2 and seconds_to_clip(5.0) == 2 and seconds_to_clip(7.0) == 4  # half to even
    assert seconds_to_clip(3.0, 1.0) == 3 and clip_to_seconds(4) == 8.0 and clip_to_seconds(3, 1.5) == 4.5
    assert covering_clips(2.0, 6.0) == (1, 3) and covering_clips(2.5, 6.1) == (1, 4)
    assert clip_bounds(3, 2.0, 5.3).tolist() == [[0, 2], [2, 4], [4, 5.3]]
    assert clip_bounds(2, 2.0, 1.0).tolist() == [[0, 2], [2, 2]]  # never ends before it starts


def test_tile_windows_cover_every_clip_with_half_overlap():
    tiles = tile_windows(300, 75)
    assert tiles[0] == (0, 75) and tiles[1] == (37, 112) and tiles[-1] == (225, 300)
    assert all(b - a == 75 for a, b in tiles)
    assert set().union(*(range(a, b) for a, b in tiles)) == set(range(300))
    assert tile_windows(30, 75) == [(0, 30)] and tile_windows(3, 1) == [(0, 1), (1, 2), (2, 3)]
    assert tile_windows(10, 4, stride=4) == [(0, 4), (4, 8), (6, 10)]


def test_iou_numpy_and_torch_agree():
    a = np.array([[0.0, 10.0], [5.0, 15.0], [20.0, 20.0]])
    b = np.array([[5.0, 15.0], [30.0, 40.0]])
    cross = cross_iou(a, b)
    assert cross[0].tolist() == [pytest.approx(1 / 3), 0.0] and cross[1, 0] == 1.0
    assert torch.allclose(cross_iou(torch.tensor(a), torch.tensor(b)), torch.tensor(cross))
    assert paired_iou(a[:2], b).tolist() == [pytest.approx(1 / 3), 0.0]
    assert temporal_iou((0, 10), (5, 15)) == pytest.approx(1 / 3)
    assert temporal_iou((2, 2), (2, 2)) == 0.0 and temporal_iou((0, 1, 0.9), (2, 3, 0.1)) == 0.0
    with np.errstate(invalid="ignore"):
        assert np.isnan(cross_iou(a[2:], a[2:])[0, 0])  # the official metric's 0/0 stays as upstream


def test_giou_and_span_conversions_are_differentiable():
    xx = torch.tensor([[0.1, 0.3], [0.5, 0.9]], requires_grad=True)
    giou = generalized_temporal_iou(xx, torch.tensor([[0.2, 0.4]]))
    assert giou[0, 0].item() == pytest.approx(0.1 / 0.3) and giou[1, 0].item() == pytest.approx(0 - 0.1 / 0.7)
    giou.sum().backward()
    assert xx.grad.abs().sum() > 0
    assert torch.allclose(span_cxw_to_xx(span_xx_to_cxw(xx)), xx)
    assert span_xx_to_cxw(np.array([[2.0, 6.0]])).tolist() == [[4.0, 4.0]]


def test_temporal_nms_keeps_best_first_within_groups():
    spans = [[0, 10], [1, 10], [20, 30], [0, 9]]
    scores = [0.9, 0.8, 0.7, 0.6]
    assert temporal_nms(spans, scores, 0.7) == [0, 2]
    assert temporal_nms(spans, scores, 0.7, max_keep=1) == [0]
    assert temporal_nms(spans, scores, 0.95) == [0, 1, 2, 3]
    assert temporal_nms(spans, scores, 0.7, groups=[1, 2, 1, 2]) == [0, 1, 2]
    assert temporal_nms([[0, 4], [0, 4]], [0.5, 0.5], 0.5) == [0]  # ties: input order
    assert temporal_nms([], [], 0.5) == []
