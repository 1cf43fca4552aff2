"""One frame per 2-s clip, chosen as ffmpeg's ``fps=0.5`` filter chooses it, decoded with PyAV.

The public CLIP features were extracted through ffmpeg's fps filter. With its default rounding ("near") an input
frame at time t (from the stream start) is assigned to output tick round(t / 2); the frame emitted for tick k is
the LAST input frame assigned to a tick <= k, i.e. the last frame shown before t = 2k + 1 s (a gap in a variable-
frame-rate stream repeats the previous frame). At the end it emits ticks up to round(end / 2) - 1, where end is the
end of the last frame: ``model.spans.num_clips(end)`` clips, the last one repeating the final frame if needed.

Cost: when the container has a keyframe index (mp4/mov; mkv/webm cues) and a keyframe lies between the current
decode position and the next wanted frame, we seek to it instead of decoding the gap; long-GOP or index-less files
are decoded straight through (frame-threaded). Only the chosen frames are converted to RGB.

    sample_clip_frames(path, resize, first_clip=0, stop_clip=None) -> (frames uint8 [n, S, S, 3], Sampled)
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import av
import numpy as np

from model.spans import CLIP_SECONDS, num_clips


class DecodeError(Exception):
    """This file cannot be indexed; the message (one line) is recorded as the reason."""


@dataclass
class VideoProbe:
    duration: float  # seconds of video as the container tells (an estimate; decoding has the last word)
    fps: float
    width: int  # as stored (decoded frames tell the rotation)
    height: int
    rotation: int
    codec: str


@dataclass
class Sampled:
    first_clip: int
    n: int  # frames returned (clips first_clip .. first_clip + n - 1)
    end_time: float | None  # end of the video stream, seconds from its start, when decoding reached it
    total_clips: int | None  # num_clips(end_time) when end_time is known
    decoded: int  # frames decoded (cost)
    seeks: int
    width: int = 0  # of the displayed picture (rotation applied), 0 if no frame was converted
    height: int = 0
    rotation: int = 0


def _open(path: str):
    try:
        container = av.open(path, metadata_errors="ignore")
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except PermissionError:
        raise DecodeError("permission denied (unreadable)") from None
    except av.FFmpegError as err:
        raise DecodeError(f"not a readable video container ({_short(err)})") from None
    except OSError as err:
        raise DecodeError(f"cannot open: {err.strerror or err}") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no"]
        container.close()
        raise DecodeError(f"no video stream ({'/'.join(kinds)} streams only)")
    demuxer = container.format.name or ""
    if demuxer == "image2" or demuxer.endswith("_pipe"):  # FFmpeg reads single images through these demuxers
        codec = container.streams.video[0].codec_context.name or demuxer.removesuffix("_pipe")
        container.close()
        raise DecodeError(f"a still image ({codec}), not a video")
    return container


def probe(path: str) -> VideoProbe:
    """Container facts without decoding (DecodeError if it is not a video)."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        duration = None
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        if not duration and container.duration:
            duration = container.duration / 1e6
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        ctx = stream.codec_context
        return VideoProbe(duration or 0.0, fps, ctx.width, ctx.height, 0, ctx.name or "unknown")
    finally:
        container.close()


def sample_clip_frames(path: str, resize, first_clip: int = 0, stop_clip: int | None = None):
    """Frames for clips first_clip .. stop_clip-1 (stop_clip None: to the end of the video).

    resize: rgb uint8 [H, W, 3] -> uint8 [S, S, 3] (the model's resize + crop).
    Returns (frames uint8 [n, S, S, 3], Sampled). Raises DecodeError when no frame at all can be decoded.
    """
    container = _open(path)
    try:
        return _sample(container, resize, first_clip, stop_clip)
    finally:
        container.close()


def _sample(container, resize, first_clip: int, stop_clip: int | None):
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    tb = float(stream.time_base)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else None
    keyframes = _keyframe_times(stream)
    fallback_gap = 1.0 / float(stream.average_rate) if stream.average_rate else 0.04

    out: list[np.ndarray] = []
    state = {"decoded": 0, "seeks": 0, "width": 0, "height": 0, "rotation": 0}
    prev = ahead = None  # last frame before the boundary / first frame at or past it
    prev_gap = fallback_gap
    frames = None
    eof = False
    converted = {}  # id(frame) -> resized array (a frame can serve several clips)

    def convert(frame) -> np.ndarray:
        return resize(display_rgb(frame))

    def frame_time(frame) -> float | None:
        return None if frame.pts is None else frame.pts * tb

    def seek(t: float, exact_pts: int | None = None):
        target = exact_pts if exact_pts is not None else max(0, int(round(t / tb)))
        container.seek(target, stream=stream, backward=True, any_frame=False)
        state["seeks"] += 1
        return _decode_iter(container, stream, state)

    if first_clip > 0 and start is not None:
        frames = seek(start + first_clip * CLIP_SECONDS - 1.0)
    if frames is None:
        frames = _decode_iter(container, stream, state)
    k = first_clip
    while stop_clip is None or k < stop_clip:
        if start is None:  # unknown start time: take the first decoded frame's
            ahead = next(frames, None)
            if ahead is None:
                break
            start = frame_time(ahead) or 0.0
        boundary = start + k * CLIP_SECONDS + CLIP_SECONDS / 2  # frames before 2k+1 s round to tick <= k
        # Skip ahead through the keyframe index when a keyframe lies between where we are and the boundary.
        position = frame_time(ahead) if ahead is not None else (frame_time(prev) if prev is not None else None)
        if keyframes and not eof:
            # Index times are decode times; keep a margin so the keyframe's picture lands before the boundary.
            target = boundary - 3 * fallback_gap
            j = bisect.bisect_left(keyframes, target / tb) - 1
            if j >= 0 and (position is None or keyframes[j] * tb > position + 1e-6):
                frames = seek(target)  # the demuxer lands on the keyframe at or before target
                ahead = None
                first = next(frames, None)
                if first is not None and position is not None and frame_time(first) is not None \
                        and frame_time(first) <= position:
                    keyframes = []  # the demuxer seeks coarser than its index says: decode straight on
                ahead = first
                if first is None:
                    eof = True
        while not eof and (ahead is None or (frame_time(ahead) is not None and frame_time(ahead) < boundary)):
            if ahead is not None:
                if prev is not None and frame_time(prev) is not None:
                    prev_gap = max(1e-6, frame_time(ahead) - frame_time(prev))
                prev = ahead
            ahead = next(frames, None)
            if ahead is None:
                eof = True
            elif frame_time(ahead) is None:  # no timestamp: treat as following the previous frame
                ahead.pts = int(((frame_time(prev) or start) + prev_gap) / tb)
        if eof:
            break
        if prev is None:  # the first frame comes after the boundary (stream starts late): it stands in
            prev = ahead
        out.append(_converted(prev, convert, converted, state))
        k += 1
    end_time = total = None
    if eof:
        if prev is None:
            if first_clip > 0:  # a later segment that starts past the end: nothing to add
                return np.zeros((0, 1, 1, 3), np.uint8), Sampled(first_clip, 0, None, None, state["decoded"],
                                                                 state["seeks"])
            raise DecodeError("no decodable video frame")
        last_duration = prev.duration * tb if prev.duration else prev_gap
        end_time = max(0.0, frame_time(prev) - (start or 0.0) + last_duration)
        total = num_clips(end_time)
        stop = total if stop_clip is None else min(total, stop_clip)
        while k < stop:  # ticks after the last frame repeat it (ffmpeg eof_action=round)
            out.append(_converted(prev, convert, converted, state))
            k += 1
        out = out[: max(0, stop - first_clip)]
    if not out:
        frames_arr = np.zeros((0, 0, 0, 3), np.uint8)
    else:
        frames_arr = np.stack(out)
    info = Sampled(first_clip, len(out), end_time, total, state["decoded"], state["seeks"], state["width"],
                   state["height"], state["rotation"])
    return frames_arr, info


def display_rotation(frame) -> int:
    """0, 90, 180 or 270: how far the stored picture is turned counter-clockwise for display (its display matrix)."""
    return int(round((getattr(frame, "rotation", 0) or 0) / 90)) % 4 * 90


def display_rgb(frame) -> np.ndarray:
    """uint8 [H, W, 3]: the frame in rgb24, turned to its display orientation."""
    rgb = frame.to_ndarray(format="rgb24")
    rotation = display_rotation(frame)
    return np.rot90(rgb, k=rotation // 90) if rotation else rgb


def _converted(frame, convert, cache: dict, state: dict) -> np.ndarray:
    """convert(frame), once per frame (only the current frame can repeat); records the displayed geometry."""
    key = id(frame)
    if key not in cache:
        cache.clear()
        rotation = display_rotation(frame)
        turned = rotation % 180 == 90
        state["height"], state["width"] = (frame.width, frame.height) if turned else (frame.height, frame.width)
        state["rotation"] = rotation
        cache[key] = (frame, convert(frame))  # keep the frame alive so id() stays unique
    return cache[key][1]


def _decode_iter(container, stream, state):
    """Decoded frames in order; a corrupt packet mid-file ends the stream (as far as it decodes)."""
    try:
        for packet in container.demux(stream):
            try:
                for frame in packet.decode():
                    state["decoded"] += 1
                    yield frame
            except av.error.InvalidDataError:
                continue  # skip a damaged packet, as ffmpeg does
    except (av.FFmpegError, OSError):
        return


def _keyframe_times(stream) -> list[int]:
    """Sorted keyframe timestamps (stream time base) from the container index; [] when it has none."""
    try:
        entries = stream.index_entries
        times = sorted({int(e.timestamp) for e in entries if e.is_keyframe})
    except (AttributeError, TypeError, av.FFmpegError):
        return []
    return times if len(times) > 1 else []


def _short(err: Exception) -> str:
    text = getattr(err, "strerror", None) or (str(err).strip().splitlines()[0] if str(err).strip() else "")
    return (text or type(err).__name__).split(": '")[0]  # drop the path ffmpeg appends


__all__ = ["DecodeError", "VideoProbe", "Sampled", "probe", "sample_clip_frames"]
