"""SlowFast-R50 8x8 as the public features computed it: the network against pytorchvideo's on the same random weights,
the two weight layouts, and HERO's frame rule against a literal re-enactment of its steps.

No real weights exist here: parity is on random weights, including random BatchNorm statistics and affine
parameters, so a key mapped to the wrong layer changes the output.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import re
import struct
from fractions import Fraction

import numpy as np
import pytest
import torch

from indexer import slowfast_frames as sf
from model.errors import ModelError
from model.inference.slowfast import FEATURE_DIM, SlowFastR50, slow_indices
from model.inference.slowfast_weights import CAFFE2_NAMES, PYTORCHVIDEO_NAMES, build_slowfast, load_slowfast_state

ptv_hub = pytest.importorskip("pytorchvideo.models.hub", reason="pytorchvideo (the test extra) is absent")


# ---------------------------------------------------------------------------------------------------------------
# the network


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random conv weights (He scale, so activations neither vanish nor explode through 50 layers) and random BN
    affine and running statistics, all distinct, so that any mis-mapped tensor shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if t.ndim == 5:  # conv; a residual branch's last conv smaller, so 16 blocks of sums stay O(1)
                scale = math.sqrt(2.0 / t[0].numel()) * (0.3 if "conv_c" in name else 1.0)
                t.copy_(torch.randn(t.shape, generator=g) * scale)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:  # bias
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """pytorchvideo's hub ``slowfast_r50`` (untrained) with random weights, its checkpoint in the hub's layout, and
    ours loaded from that file."""
    ptv = ptv_hub.slowfast_r50(pretrained=False, head=None, head_pool=torch.nn.AdaptiveAvgPool3d,
                               head_output_size=((1, 1, 1), (1, 1, 1))).eval()
    # head=None: the net ends at PoolConcatPathway = blocks[5], the 2304-d vector HERO keeps. Adaptive pooling is
    # the global average at any size (AvgPool3d (8,7,7) / (32,7,7) is that at 224 x 224 only).
    _randomise(ptv, seed=18)
    path = tmp_path_factory.mktemp("slowfast") / "SLOWFAST_8x8_R50_random.pyth"
    torch.save({"model_state": ptv.state_dict()}, path)
    ours = build_slowfast(path)
    return ptv, ours, path


def _clip(dtype, size=40, frames=32, seed=0):
    """One normalised clip [1, 3, frames, size, size] (HERO's normalisation of random uint8 pixels).

    40 x 40 runs res3..res5 at 10, 5, 3 -> 2 x 2 (odd sizes under stride 2, every 3 x 3 tap and its padding
    counts) at a 30th of the 224 x 224 cost.
    """
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (1, frames, size, size, 3), generator=g, dtype=torch.uint8)
    return sf.normalise(pixels).to(dtype)


def _ptv_features(ptv, frames):
    slow = frames.index_select(2, torch.linspace(0, frames.shape[2] - 1, frames.shape[2] // 4).long())
    return ptv([slow, frames]).flatten(1)


def test_slow_pathway_indices():
    assert slow_indices(32).tolist() == [0, 4, 8, 13, 17, 22, 26, 31]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_network_matches_pytorchvideo(reference, dtype, tolerance):
    ptv, ours, _ = reference
    frames = _clip(dtype)
    with torch.no_grad():
        expected = _ptv_features(ptv.to(dtype), frames)
        got = ours.to(dtype)(frames)
    assert got.shape == expected.shape == (1, FEATURE_DIM)
    assert got.dtype == dtype and float(expected.abs().max()) > 0.1  # a live signal, not a collapsed net
    delta = float((got - expected).abs().max())
    print(f"{dtype}: max |delta| {delta:.3g} (max |feature| {float(expected.abs().max()):.3g})")
    assert delta <= tolerance
    assert float(got.min()) >= 0  # post-ReLU averages


def test_a_wrong_mapping_shows(reference):
    """Two same-shape BN statistics swapped: the parity check above would catch it."""
    ptv, _, _ = reference
    theirs = ptv.state_dict()
    state = {ours: theirs[name].clone() for ours, name in PYTORCHVIDEO_NAMES.items()}
    a, b = "slow.res4.2.b.bn.running_mean", "slow.res4.3.b.bn.running_mean"
    state[a], state[b] = state[b], state[a]
    with torch.device("meta"):
        wrong = SlowFastR50().eval()
    wrong.load_state_dict(state, assign=True)
    frames = _clip(torch.float32, size=32, frames=8)  # the smallest clip the fusion strides accept
    with torch.no_grad():
        delta = (wrong.float()(frames) - _ptv_features(ptv.float(), frames)).abs().max()
    assert float(delta) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# weights


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for a Caffe2 blob dict: numpy 1.x module names and array data as a
    py2 str (BINSTRING), not Python 3's ``_codecs.encode`` of bytes."""

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "")
        if module.startswith("numpy._core"):
            qual = name or obj.__qualname__
            self.write(pickle.GLOBAL + f"numpy.core.{module[len('numpy._core.'):]}\n{qual}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[type(len)] = save_global


_BN = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
_LAST_BLOCK = {2: 2, 3: 3, 4: 5}  # res{s}'s last block, where Caffe2 hangs the fast->slow fusion after res{s}
_FIELD = r"\.(weight|bias|running_mean|running_var)"
_PTV_TO_CAFFE2 = [  # the notes' table (shared/notes/slowfast.md section 2), as rules on pytorchvideo keys
    (r"blocks\.0\.multipathway_blocks\.(\d)\.conv\.weight", lambda p: f"{_t(p)}conv1_w"),
    (r"blocks\.0\.multipathway_blocks\.(\d)\.norm" + _FIELD, lambda p, f: f"{_t(p)}res_conv1_bn_{_BN[f]}"),
    (r"blocks\.0\.multipathway_fusion\.conv_fast_to_slow\.weight", lambda: "t_pool1_subsample_w"),
    (r"blocks\.0\.multipathway_fusion\.norm" + _FIELD, lambda f: f"t_pool1_subsample_bn_{_BN[f]}"),
    (r"blocks\.(\d)\.multipathway_blocks\.(\d)\.res_blocks\.(\d+)\.branch2\.conv_([abc])\.weight",
     lambda b, p, i, x: f"{_t(p)}res{int(b) + 1}_{i}_branch2{x}_w"),
    (r"blocks\.(\d)\.multipathway_blocks\.(\d)\.res_blocks\.(\d+)\.branch2\.norm_([abc])" + _FIELD,
     lambda b, p, i, x, f: f"{_t(p)}res{int(b) + 1}_{i}_branch2{x}_bn_{_BN[f]}"),
    (r"blocks\.(\d)\.multipathway_blocks\.(\d)\.res_blocks\.0\.branch1_conv\.weight",
     lambda b, p: f"{_t(p)}res{int(b) + 1}_0_branch1_w"),
    (r"blocks\.(\d)\.multipathway_blocks\.(\d)\.res_blocks\.0\.branch1_norm" + _FIELD,
     lambda b, p, f: f"{_t(p)}res{int(b) + 1}_0_branch1_bn_{_BN[f]}"),
    (r"blocks\.(\d)\.multipathway_fusion\.conv_fast_to_slow\.weight",
     lambda b: f"t_res{int(b) + 1}_{_LAST_BLOCK[int(b) + 1]}_branch2c_bn_subsample_w"),
    (r"blocks\.(\d)\.multipathway_fusion\.norm" + _FIELD,
     lambda b, f: f"t_res{int(b) + 1}_{_LAST_BLOCK[int(b) + 1]}_branch2c_bn_subsample_bn_{_BN[f]}"),
]


def _t(pathway: str) -> str:
    return "t_" if pathway == "1" else ""


def _caffe2_name(ptv_key: str) -> str | None:
    for pattern, name in _PTV_TO_CAFFE2:
        match = re.fullmatch(pattern, ptv_key)
        if match:
            return name(*match.groups())
    return None  # num_batches_tracked: Caffe2 has none


def _caffe2_blobs(ptv_state: dict) -> dict:
    """A Caffe2-layout blob dict from a pytorchvideo state dict (names by the notes' table, not by the code under
    test), plus the junk a real training checkpoint carries."""
    blobs = {}
    for key, value in ptv_state.items():
        name = _caffe2_name(key)
        assert name is not None or key.endswith("num_batches_tracked"), key
        if name is not None:
            blobs[name] = value.numpy().astype(np.float32)
    blobs.update({"conv1_w_momentum": np.zeros((64, 3, 1, 7, 7), np.float32), "lr": np.array([0.1], np.float32),
                  "model_iter": np.array([196000], np.int64), "pred_w": np.ones((400, 2304), np.float32),
                  "pred_b": np.zeros(400, np.float32), "t_res2_0_branch2a_w_momentum": np.zeros(3, np.float32)})
    return blobs


def _write_py2_pickle(path, data) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(data)
    path.write_bytes(buffer.getvalue())


def test_caffe2_pickle_fills_every_key(reference, tmp_path):
    """A Caffe2 pickle named by the notes' table from pytorchvideo's weights loads into exactly the state the
    pytorchvideo layout gives (so the Caffe2 network is the one checked against pytorchvideo above)."""
    ptv, _, ptv_path = reference
    blobs = _caffe2_blobs({k: v.float() for k, v in ptv.state_dict().items()})
    assert set(CAFFE2_NAMES.values()) < set(blobs)  # the table asks for nothing else than the notes' names
    path = tmp_path / "SLOWFAST_8x8_R50.pkl"
    _write_py2_pickle(path, {"blobs": blobs})
    assert b"numpy.core.multiarray" in path.read_bytes() and b"_codecs" not in path.read_bytes()
    state, kind = load_slowfast_state(path)
    expected, expected_kind = load_slowfast_state(ptv_path)
    assert (kind, expected_kind) == ("caffe2", "pytorchvideo")
    assert set(state) == set(expected) == set(CAFFE2_NAMES)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_caffe2_names_are_distinct_and_follow_pyslowfast():
    names = list(CAFFE2_NAMES.values())
    assert len(set(names)) == len(names) == len(SlowFastR50().state_dict())
    assert CAFFE2_NAMES["slow.stem.conv.weight"] == "conv1_w"
    assert CAFFE2_NAMES["fast.stem.bn.running_var"] == "t_res_conv1_bn_riv"
    assert CAFFE2_NAMES["fuse.stem.bn.weight"] == "t_pool1_subsample_bn_s"
    assert CAFFE2_NAMES["fuse.res4.conv.weight"] == "t_res4_5_branch2c_bn_subsample_w"
    assert CAFFE2_NAMES["fuse.res2.bn.running_mean"] == "t_res2_2_branch2c_bn_subsample_bn_rm"
    assert CAFFE2_NAMES["slow.res5.0.shortcut.bn.bias"] == "res5_0_branch1_bn_b"
    assert CAFFE2_NAMES["fast.res3.3.c.conv.weight"] == "t_res3_3_branch2c_w"


def test_caffe2_pickle_missing_a_key_is_refused(reference, tmp_path):
    ptv, _, _ = reference
    blobs = _caffe2_blobs({k: v.float() for k, v in ptv.state_dict().items()})
    del blobs["t_res4_5_branch2c_bn_subsample_bn_riv"]
    path = tmp_path / "SLOWFAST_8x8_R50.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))  # a Python-3 pickle (bytes via _codecs) reads too
    with pytest.raises(ModelError) as err:
        load_slowfast_state(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "t_res4_5_branch2c_bn_subsample_bn_riv" in message


def test_caffe2_pickle_with_a_wrong_shape_is_refused(reference, tmp_path):
    ptv, _, _ = reference
    blobs = _caffe2_blobs({k: v.float() for k, v in ptv.state_dict().items()})
    blobs["res3_1_branch2b_w"] = blobs["res3_1_branch2b_w"][:, :, :, :1]
    path = tmp_path / "bad.pkl"
    _write_py2_pickle(path, {"blobs": blobs})
    with pytest.raises(ModelError, match="res3_1_branch2b_w has shape"):
        load_slowfast_state(path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_names_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": _RunsCode(str(marker))}}, protocol=2))
    with pytest.raises(ModelError) as err:
        load_slowfast_state(path)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "mkdir" in message


def test_truncated_pickle_is_refused_in_one_line(tmp_path):
    path = tmp_path / "SLOWFAST_8x8_R50.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.ones((64, 3, 1, 7, 7), np.float32)}}, protocol=2)[:500])
    with pytest.raises(ModelError, match="not a readable Caffe2 pickle") as err:
        load_slowfast_state(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_weights_say_which_file_and_where_it_comes_from(tmp_path):
    path = tmp_path / "SLOWFAST_8x8_R50.pkl"
    with pytest.raises(ModelError) as err:
        build_slowfast(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "https://dl.fbaipublicfiles.com/pyslowfast/model_zoo/kinetics400/SLOWFAST_8x8_R50.pkl" in message


def test_pytorchvideo_layout_missing_a_key_is_refused(reference, tmp_path):
    ptv, _, _ = reference
    state = dict(ptv.state_dict())
    del state["blocks.3.multipathway_blocks.1.res_blocks.2.branch2.norm_b.running_var"]
    path = tmp_path / "slowfast_r50.pyth"
    torch.save({"model_state": state}, path)
    with pytest.raises(ModelError, match="1 of 550 weights missing"):
        load_slowfast_state(path)


# ---------------------------------------------------------------------------------------------------------------
# frames: an oracle that re-enacts HERO's steps literally (ffmpeg fps=30 as a stream, then its tensor ops)


def _oracle_fps30(rate: Fraction, n_frames: int) -> list[int]:
    """ffmpeg ``fps=30`` on a constant-rate stream, as a stream: every arriving frame flushes the ticks before its
    own with the previous frame; at EOF the ticks up to round(end * 30) repeat the last (integers only)."""
    def tick(num, den):  # round(num / den) halves up, num, den > 0
        return (2 * num + den) // (2 * den)

    out, next_tick, previous = [], 0, None
    for k in range(n_frames):
        t = tick(30 * k * rate.denominator, rate.numerator)
        while previous is not None and next_tick < t:
            out.append(previous)
            next_tick += 1
        previous = k
    while next_tick < tick(30 * n_frames * rate.denominator, rate.numerator):
        out.append(previous)
        next_tick += 1
    return out


def _oracle_hero(frames: list[int], fps_floor: int, duration: float | None, clip_len: int) -> np.ndarray:
    """HERO's Preprocessing.__call__ ('3d', tile padding) on an array of frame ids, step by step."""
    video = np.array(frames)
    while len(video) % 30:  # _pad_frames: copies of the last frame
        video = np.append(video, video[-1])
    seconds = video.reshape(-1, 30)
    while len(seconds) % clip_len:  # _pad_clips: copies of the last 1-s block
        seconds = np.concatenate([seconds, seconds[-1:]])
    clips = seconds.reshape(-1, 30 * clip_len)
    if duration is not None and duration > 0:
        clips = clips[: math.ceil(duration / clip_len)]
    end = Fraction(64 * fps_floor, 30) - 1  # window end, exact
    window = [min(math.floor(j * end / 31), 30 * clip_len - 1) for j in range(32)]
    return clips[:, window]


# the notes' table (shared/notes/slowfast.md section 1), written out independently of any code
NOTES_WINDOWS = {
    24: [0, 1, 3, 4, 6, 8, 9, 11, 12, 14, 16, 17, 19, 21, 22, 24, 25, 27, 29, 30, 32, 34, 35, 37, 38, 40, 42, 43,
         45, 46, 48, 50],
    25: [0, 1, 3, 5, 6, 8, 10, 11, 13, 15, 16, 18, 20, 21, 23, 25, 27, 28, 30, 32, 33, 35, 37, 38, 40, 42, 43, 45,
         47, 48, 50, 52],
    30: list(range(0, 60, 2))[:30] + [59, 59],
}
NOTES_REPEATS_OF_59 = {24: 0, 25: 0, 29: 1, 30: 2, 50: 14, 60: 17}


def test_clip_window_is_the_notes_table():
    for fps, window in NOTES_WINDOWS.items():
        assert clip_window_list(fps) == window
    for fps, repeats in NOTES_REPEATS_OF_59.items():
        assert clip_window_list(fps).count(59) == repeats
    assert sf.clip_window(30, clip_len=1).tolist() == list(range(0, 30, 2)) + [29] * 17  # Charades: 15 + 17 copies
    assert sf.extractor_fps(Fraction(30000, 1001)) == 29 and sf.extractor_fps("30000/1001") == 29


def clip_window_list(fps):
    return sf.clip_window(fps, clip_len=2).tolist()


RATES = [Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30), Fraction(50), Fraction(60)]
DURATIONS = [0.5, 2.0, 7.3, 9.97, 10.0, 10.03, 13.37]


@pytest.mark.parametrize("rate", RATES, ids=lambda r: f"{float(r):.2f}fps")
def test_frame_rule_matches_the_literal_extractor(rate):
    for seconds in DURATIONS:
        n_frames = max(1, round(seconds * rate))
        exact = float(n_frames / rate)
        for clip_len in (2, 1):
            # ffprobe's duration as the stream's, a container that says a little more / less, or none at all
            for duration in (exact, exact + 0.9, exact - 0.4, None):
                got = sf.cfr_clip_source_frames(rate, n_frames, duration, clip_len)
                want = _oracle_hero(_oracle_fps30(rate, n_frames), math.floor(rate), duration, clip_len)
                assert got.tolist() == want.tolist(), (float(rate), seconds, clip_len, duration)
                assert got.max() <= n_frames - 1 and got.min() >= 0


def test_fps_filter_picks_the_last_frame_of_each_tick():
    # 60 fps: frame 2n - 1 rounds up to tick n (a half), so tick n shows frame 2n
    assert sf.resampled_source_frames([Fraction(k, 60) for k in range(8)], Fraction(8, 60)).tolist() == [0, 2, 4, 6]
    # 24 fps: every 4th output frame repeats
    assert sf.resampled_source_frames([Fraction(k, 24) for k in range(4)], Fraction(4, 24)).tolist() == [0, 1, 1, 2,
                                                                                                          3]
    # a variable-rate gap repeats the frame before it
    assert sf.resampled_source_frames([0.0, 0.1, 0.2], 0.3).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_num_clips_and_streamed_windows():
    assert sf.num_slowfast_clips(30 * 150 + 1, 2, 150.03) == 76  # ceil(150.03 / 2): one more than CLIP's 75
    assert sf.num_slowfast_clips(61, 2, None) == 2
    # clip k's ticks depend only on k: a decoder can stream windows
    full = sf.clip_frame_ticks(601, 29, 2, 20.03)
    assert full.shape == (11, 32) and full[-1].tolist() == [600] * 32  # the padded last clip repeats the last frame


# ---------------------------------------------------------------------------------------------------------------
# pixels


@pytest.mark.parametrize("h,w,expect", [(1080, 1920, (224, 398)), (1920, 1080, (398, 224)), (480, 640, (224, 298)),
                                        (241, 317, (224, 294)), (224, 224, (224, 224))])
def test_output_size_truncates_like_hero(h, w, expect):
    assert sf.output_size(h, w) == expect


@pytest.mark.parametrize("h,w,rotation,expect", [
    (1080, 1920, 0, [("scale", "398:224:flags=bilinear"), ("crop", "224:224:87:0"), ("format", "rgb24")]),
    (1080, 1920, 90, [("transpose", "cclock"), ("scale", "224:398:flags=bilinear"), ("crop", "224:224:0:87"),
                      ("format", "rgb24")]),
    (317, 241, 180, [("hflip", None), ("vflip", None), ("scale", "224:294:flags=bilinear"), ("crop", "224:224:0:35"),
                     ("format", "rgb24")]),
    (48, 64, 270, [("transpose", "clock"), ("scale", "224:298:flags=bilinear"), ("crop", "224:224:0:37"),
                   ("format", "rgb24")])])
def test_scale_crop_filters_are_heros_chain_on_the_displayed_picture(h, w, rotation, expect):
    assert sf.scale_crop_filters(h, w, rotation) == expect


def test_extractor_scaler_centres_and_keeps_flat_colour():
    import av

    picture = np.zeros((224, 301, 3), np.uint8)
    picture[..., 0] = np.arange(301, dtype=np.uint8)[None, :] % 251
    scaler = sf.ExtractorScaler()
    out = scaler(av.VideoFrame.from_ndarray(picture, format="rgb24"))  # short side 224 already: a crop at x = 38
    assert out.shape == (224, 224, 3) and np.array_equal(out, picture[:, 38:262])
    flat = av.VideoFrame.from_ndarray(np.full((181, 97, 3), (10, 200, 77), np.uint8), format="rgb24")
    out = scaler(flat.reformat(format="yuv444p"))  # 97 x 181 -> 224 x 418, converted back to rgb in the scale
    assert out.shape == (224, 224, 3) and len(np.unique(out.reshape(-1, 3), axis=0)) == 1
    assert np.abs(out[0, 0].astype(int) - (10, 200, 77)).max() <= 3  # yuv rounding only


def test_normalise():
    clips = np.full((1, 32, 4, 4, 3), 255, np.uint8)
    clips[..., 1] = 0
    x = sf.normalise(clips)
    assert x.shape == (1, 3, 32, 4, 4) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.tensor((1 - 0.45) / 0.225)) and torch.allclose(x[:, 1],
                                                                                        torch.tensor(-2.0))
