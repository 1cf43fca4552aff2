"""Which frames, and which pixels, the public SlowFast features saw: HERO's extractor rule.

The public SlowFast features (QVHighlights, TACoS: 2-s clips; Charades-STA: 1-s clips) were extracted by HERO's
``slowfast/extract_feature`` (notes: shared/notes/slowfast.md section 1). Per video it

1. decodes through ffmpeg ``fps=30``: output frame n is the LAST source frame whose time, in 1/30 s and rounded to
   the nearest (halves up), is <= n; it emits round(end * 30) frames, ``end`` = end of the last source frame, the
   grid counted from the first frame (``resampled_source_frames``);
2. pads the frames to whole seconds by repeating the last frame, then the seconds to whole clips by repeating the
   last 1-s block (not the last frame), and cuts the result into clips of 30 * clip_len frames;
3. keeps the first ceil(duration / clip_len) clips when ffprobe gave the stream a duration (and a frame count);
4. takes 32 frames of each clip at ``linspace(0, 64 * fps / 30 - 1, 32)`` (float32, clamped to the clip, truncated)
   where ``fps`` is floor(the SOURCE's average frame rate) - although the frames were resampled to 30 fps, so a
   24-fps source's window spans 1.67 s and a 60-fps source's repeats the clip's last frame 17 times
   (``clip_window``). The slow pathway's 8 of those 32 frames are model/slowfast.py's ``slow_indices``.

Steps 2-4 are done here in closed form per clip (``clip_frame_ticks``), so a decoder can stream 2-s windows without
holding the video. Pixels: the extractor's own libavfilter chain after ``fps=30``, ``scale=W:H`` (short side to 224,
``int()`` of the exact ratio; swscale's bilinear, resizing and converting yuv -> rgb in one pass), ``crop=224:224:x:y``
(``int()`` offsets), ``format=rgb24`` (``scale_crop_filters``, run on each decoded frame by ``ExtractorScaler``), then
/255, mean 0.45, std 0.225 (``normalise``). A rotated video is turned to its display orientation before the scale,
with the transposes the ffmpeg CLI's autorotate uses, and sized from the displayed picture.

    clip_window(fps_floor, clip_len) -> int64 [32]                        indices into a clip's 30 * clip_len frames
    clip_frame_ticks(n_ticks, fps_floor, clip_len, stream_duration) -> int64 [clips, 32]   30-fps output frames
    output_tick(t) -> int                                                   the 30-fps frame a time t rounds to
    resampled_source_frames(frame_times, end_time) -> int64 [n_ticks]     source frame of each 30-fps frame
    cfr_clip_source_frames(avg_fps, n_frames, stream_duration, clip_len) -> int64 [clips, 32]   source frames
    scale_crop_filters(height, width, rotation) -> [(filter, args)]        the chain after fps=30
    ExtractorScaler()(frame av.VideoFrame) -> uint8 [224, 224, 3]
    normalise(clips uint8 [N, T, 224, 224, 3]) -> float32 [N, 3, T, 224, 224]
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import av
import numpy as np
import torch

from indexer.decode import display_rotation

TARGET_FPS = 30  # HERO --target_framerate
NUM_FRAMES = 32  # PySlowFast DATA.NUM_FRAMES
SAMPLING_RATE = 2  # PySlowFast DATA.SAMPLING_RATE: the window is 32 * 2 frames at the source rate
SIZE = 224
MEAN = 0.45
STD = 0.225


def extractor_fps(avg_frame_rate) -> int:
    """The fps HERO's window uses: floor of ffprobe's avg_frame_rate (30000/1001 -> 29)."""
    return math.floor(Fraction(avg_frame_rate))  # "30000/1001", Fraction(30000, 1001) or 29.97


def clip_window(fps_floor: int, clip_len: int = 2) -> np.ndarray:
    """The 32 indices HERO takes from each clip's 30 * clip_len frames, for a source of floor-fps ``fps_floor``.

    Literally its get_start_end_idx + temporal_sampling: end = 0 + 64 * fps / 30 - 1 (Python float), a float32
    ``torch.linspace(0, end, 32)``, clamped to [0, 30 * clip_len - 1], truncated by ``.long()``.
    """
    clip_size = NUM_FRAMES * SAMPLING_RATE * fps_floor / TARGET_FPS
    index = torch.linspace(0.0, clip_size - 1, NUM_FRAMES)
    return torch.clamp(index, 0, TARGET_FPS * clip_len - 1).long().numpy()


def num_slowfast_clips(n_ticks: int, clip_len: int = 2, stream_duration: float | None = None) -> int:
    """SlowFast features HERO gives a video of ``n_ticks`` 30-fps frames: whole clips after padding, cut to
    ceil(stream_duration / clip_len) when ffprobe reported a positive duration (None or <= 0: it did not)."""
    seconds = -(-n_ticks // TARGET_FPS)
    clips = -(-seconds // clip_len)
    if stream_duration is not None and stream_duration > 0:
        clips = min(clips, math.ceil(stream_duration / clip_len))
    return clips


def clip_frame_ticks(n_ticks: int, fps_floor: int, clip_len: int = 2,
                     stream_duration: float | None = None) -> np.ndarray:
    """int64 [num_clips, 32]: for each clip, the 30-fps output frames (0 .. n_ticks - 1) its 32 frames are.

    A padded position p (in the frames after both paddings) is the output frame p when p < n_ticks; the last frame
    when it lies in the padded tail of the last second; and in a padded second (p >= 30 * seconds) the same
    position of the video's last second, which may itself be padding.
    """
    if n_ticks <= 0:
        raise ValueError("a video with no frame has no SlowFast clips")
    if int(clip_len) != clip_len or clip_len < 1:
        raise ValueError(f"clip_len must be a whole number of seconds, got {clip_len}")
    clip_frames = TARGET_FPS * int(clip_len)
    clips = num_slowfast_clips(n_ticks, int(clip_len), stream_duration)
    p = np.arange(clips)[:, None] * clip_frames + clip_window(fps_floor, int(clip_len))[None, :]
    last_second = (-(-n_ticks // TARGET_FPS) - 1) * TARGET_FPS
    p = np.where(p >= last_second + TARGET_FPS, last_second + p % TARGET_FPS, p)
    return np.minimum(p, n_ticks - 1).astype(np.int64)


def output_tick(t) -> int:
    """The 30-fps output tick a frame at t seconds (from the first frame) rounds to: nearest, halves up."""
    return math.floor(t * TARGET_FPS + Fraction(1, 2) if isinstance(t, Fraction) else t * TARGET_FPS + 0.5)


def resampled_source_frames(frame_times: Sequence, end_time) -> np.ndarray:
    """int64 [round(end_time * 30)]: the source frame ffmpeg's ``fps=30`` emits as each output frame.

    frame_times: each source frame's presentation time in seconds from the first frame (ascending; Fractions for
    exact rounding); end_time: the end of the last frame. Output frame n is the last source frame whose tick is
    <= n; past the last frame it is repeated (eof_action=round).
    """
    n_ticks = output_tick(end_time)
    ticks = np.array([output_tick(t) for t in frame_times], dtype=np.int64)
    # the last frame k with ticks[k] <= n, for each n (ticks is non-decreasing)
    out = np.searchsorted(ticks, np.arange(n_ticks), side="right") - 1
    return np.maximum(out, 0).astype(np.int64)


def cfr_clip_source_frames(avg_fps, n_frames: int, stream_duration: float | None = None,
                           clip_len: int = 2) -> np.ndarray:
    """int64 [num_clips, 32]: the source frame (0 .. n_frames - 1) behind each of every clip's 32 frames, for a
    constant-rate stream of ``n_frames`` frames at exactly ``avg_fps`` (a Fraction such as 30000/1001, or a number)
    whose ffprobe duration is ``stream_duration`` (None: ffprobe gave none; HERO then keeps every padded clip)."""
    rate = Fraction(avg_fps).limit_denominator(1_000_000)
    source = resampled_source_frames([Fraction(k) / rate for k in range(n_frames)], Fraction(n_frames) / rate)
    return source[clip_frame_ticks(len(source), extractor_fps(rate), clip_len, stream_duration)]


def output_size(height: int, width: int, size: int = SIZE) -> tuple[int, int]:
    """(H, W) after HERO's scale: the short side to ``size``, the long side int(long * size / short)."""
    if height >= width:
        return int(height * size / width), size
    return size, int(width * size / height)


# The filters that turn a stored picture to its display orientation (degrees counter-clockwise,
# decode.display_rotation): the ones the ffmpeg CLI's autorotate puts before a filter chain.
ROTATION_FILTERS = {0: [], 90: [("transpose", "cclock")], 180: [("hflip", None), ("vflip", None)],
                    270: [("transpose", "clock")]}


def scale_crop_filters(height: int, width: int, rotation: int = 0, size: int = SIZE) -> list[tuple[str, str | None]]:
    """[(filter, args)]: the extractor's chain after ``fps=30`` for a stored picture of (height, width) shown turned
    ``rotation`` (0/90/180/270) degrees: the ROTATION_FILTERS, ``scale=W:H:flags=bilinear``, ``crop=size:size:x:y``,
    ``format=rgb24``.

    (H, W) = output_size of the DISPLAYED picture, x = int((W - size) / 2), y = int((H - size) / 2). The crop keeps
    the pixel format and the sink takes rgb24 only, so libavfilter's format negotiation makes the scale filter
    resize and convert yuv -> rgb in one swscale call, then crops the rgb picture, as in the extractor's ffmpeg.
    """
    if rotation % 180:
        height, width = width, height
    out_h, out_w = output_size(height, width, size)
    x, y = int((out_w - size) / 2), int((out_h - size) / 2)
    return [*ROTATION_FILTERS[rotation], ("scale", f"{out_w}:{out_h}:flags=bilinear"),
            ("crop", f"{size}:{size}:{x}:{y}"), ("format", "rgb24")]


class ExtractorScaler:
    """The extractor's pixels for decoded frames: av.VideoFrame (any size, pixel format, rotation) -> uint8
    [size, size, 3], through libavfilter running ``scale_crop_filters`` (one graph per frame geometry).

    The colour matrix and range are the frame's own tags (the scale filter's in_color_matrix=auto), as they were for
    the extractor's ffmpeg. The frame is left as it was, so CLIP can still convert it.
    """

    def __init__(self, size: int = SIZE):
        self.size = size
        self._graphs: dict[tuple, tuple] = {}  # (width, height, pix_fmt, rotation) -> (graph, source, sink)

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        rotation = display_rotation(frame)
        key = (frame.width, frame.height, frame.format.name, rotation)
        if key not in self._graphs:
            self._graphs[key] = self._graph(frame, rotation)
        _, source, sink = self._graphs[key]
        source.push(frame)
        return sink.pull().to_ndarray()

    def _graph(self, frame: av.VideoFrame, rotation: int) -> tuple:
        graph = av.filter.Graph()
        source = graph.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                                  time_base=frame.time_base or Fraction(1, 1000))
        node = source
        for name, args in [*scale_crop_filters(frame.height, frame.width, rotation, self.size), ("buffersink", None)]:
            nxt = graph.add(name, args) if args else graph.add(name)
            node.link_to(nxt)
            node = nxt
        graph.configure()
        return graph, source, node


def normalise(clips: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, T, H, W, 3] -> float32 [N, 3, T, H, W]: /255, then (x - 0.45) / (0.225 + 1e-8) as HERO's."""
    x = torch.as_tensor(clips).float().permute(0, 4, 1, 2, 3) / 255.0
    return (x - MEAN) / (STD + 1e-8)
