"""Clip export: a moment [start, end) of a source video written as a short mp4 (`vmr export-clip`, GET .../clip).

How a clip is cut (PyAV):
  - stream copy, when ``start`` falls on a keyframe of the video stream (within half a frame) and the codec fits
    in mp4 (COPY_VIDEO): the source's packets from that keyframe on are copied, their timestamps moved so the
    clip starts at 0. Fast (no decoding) and lossless.
  - re-encode otherwise: copying from the keyframe before ``start`` would show frames before the moment (the
    clip would start early), so the frames from ``start`` on are decoded and encoded again with libx264 (mpeg4
    where PyAV lacks it), odd sizes rounded down to even.
  The video ends with the last frame shown before ``end`` (in a stream copy with B-frames, the few frames the
  decoder needs past it come along). Audio, when present, is kept: copied when its codec fits in mp4
  (COPY_AUDIO), else decoded, trimmed to [start, end) to the sample and encoded as AAC.

Bounds: 0 <= start < end, end - start between MIN_CLIP_SECONDS and MAX_CLIP_SECONDS, start before the video's
end; an end past it is cut at it. A bad request raises ClipError (a VmrError: one line in the CLI, 422 in the API).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction

from store.errors import VmrError

MIN_CLIP_SECONDS = 0.1
MAX_CLIP_SECONDS = 600.0  # a re-encode of 10 min of HD on 2 cores takes minutes: longer moments are refused
COPY_VIDEO = {"h264", "hevc", "mpeg4", "av1"}  # codecs whose packets mp4 holds as they are
COPY_AUDIO = {"aac", "mp3", "ac3", "eac3", "alac"}
X264_OPTIONS = {"preset": "veryfast", "crf": "20"}


class ClipError(VmrError):
    """The clip asked for cannot be cut (bounds, a file without video, an undecodable source)."""


@dataclass
class ClipReport:
    """What was written: ``method`` "copy" (stream copy) or "reencode"; seconds of the source it covers."""
    path: str
    method: str
    start: float
    end: float
    audio: bool

    def describe(self) -> str:
        how = "stream copy from a keyframe" if self.method == "copy" else "re-encoded (start is not a keyframe)"
        return (f"wrote {self.path}: {self.start:.2f}-{self.end:.2f} s ({self.end - self.start:.2f} s, {how}"
                f"{', with audio' if self.audio else ', no audio'})")


def clip_filename(video_path: str, start: float, end: float) -> str:
    """'beach trip_12.0-31.5.mp4' for a download: the source's name and the moment's seconds."""
    stem = os.path.splitext(os.path.basename(video_path))[0] or "clip"
    return f"{stem}_{start:.1f}-{end:.1f}.mp4"


def cut_clip(src: str, start: float, end: float, out_path: str) -> ClipReport:
    """Write [start, end) seconds of the video at ``src`` to ``out_path`` (mp4); see the module docstring."""
    import av

    try:
        with av.open(src) as probe:
            if not probe.streams.video:
                raise ClipError(f"{os.path.basename(src)} has no video stream")
            video = probe.streams.video[0]
            duration = _duration(probe, video)
            start, end = check_bounds(start, end, duration)
            keyframe = _keyframe_at_or_before(probe, video, start)
            copy = (keyframe is not None and abs(keyframe - start) <= 0.5 / _fps(video)
                    and video.codec_context.name in COPY_VIDEO)
        if copy:
            start = keyframe
        with av.open(src) as source, av.open(out_path, mode="w", format="mp4") as out:
            has_audio = _write(source, out, start, end, copy)
    except av.error.FFmpegError as err:
        _remove(out_path)
        raise ClipError(f"cannot cut {os.path.basename(src)}: {' '.join(str(err).split())[:200]}") from None
    except BaseException:
        _remove(out_path)
        raise
    return ClipReport(out_path, "copy" if copy else "reencode", start, end, has_audio)


def export_from_index(index_dir: str, out_path: str, start: float, end: float, video_id: int | None = None,
                      video_path: str | None = None) -> ClipReport:
    """`vmr export-clip`: cut a moment of an indexed video, named by id or by its path in the index (as `vmr
    search` prints them). The file must lie inside the indexed folder, as for the page (server/media.py)."""
    from server.media import video_file
    from store import db

    if (video_id is None) == (video_path is None):
        raise ClipError("give the video by --video-id or by --video (its path as `vmr search` prints it)")
    con = db.connect(index_dir, read_only=True)
    try:
        root = db.read_meta(con).get("root")
        rows = [dict(zip(("id", "path", "status"), r)) for r in db.video_rows(con, ("id", "path", "status"))]
    finally:
        con.close()
    key, value = ("id", int(video_id)) if video_id is not None else ("path", video_path.replace("\\", "/"))
    row = next((r for r in rows if r[key] == value and r["status"] == "indexed"), None)
    if row is None:
        raise ClipError(f"no indexed video with {key} {value!r} in {index_dir} (`vmr search` prints both)")
    return cut_clip(video_file(root, row), start, end, out_path)


def check_bounds(start: float, end: float, duration: float | None) -> tuple[float, float]:
    """(start, end) checked against the module's rules, end cut at ``duration``; ClipError saying what is wrong."""
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0:
        raise ClipError(f"start {start} and end {end} must be seconds, start >= 0")
    if end <= start:
        raise ClipError(f"end ({end} s) must be after start ({start} s)")
    if duration and start >= duration:
        raise ClipError(f"start {start} s is past the video's end ({duration:.2f} s)")
    end = min(end, duration) if duration else end
    if end - start < MIN_CLIP_SECONDS - 1e-9:
        raise ClipError(f"a clip must last at least {MIN_CLIP_SECONDS} s ({start}-{end} s)")
    if end - start > MAX_CLIP_SECONDS:
        raise ClipError(f"a clip may last at most {MAX_CLIP_SECONDS:.0f} s ({end - start:.1f} s asked)")
    return start, end


def _write(source, out, start: float, end: float, copy: bool) -> bool:
    """Mux the clip into ``out``; True when it has audio."""
    video = source.streams.video[0]
    audio = source.streams.audio[0] if source.streams.audio else None
    v_out = out.add_stream_from_template(video) if copy else _video_encoder(out, video)
    copy_audio = audio is not None and audio.codec_context.name in COPY_AUDIO
    a_out = None
    if audio is not None:
        a_out = out.add_stream_from_template(audio) if copy_audio else _audio_encoder(out, audio)
    reencoder = None if copy else _VideoReencoder(v_out, start, end, out)
    video.thread_type = "AUTO"
    _seek(source, video, start)
    streams = [video] + ([audio] if audio is not None else [])
    done = {video.index: False, **({audio.index: False} if audio is not None else {})}
    for packet in source.demux(*streams):
        if all(done.values()):
            break
        if packet.stream.index == video.index:
            done[video.index] = (_copy_packet(packet, v_out, start, end, out) if copy
                                 else reencoder.packet(packet))
        elif copy_audio:
            done[audio.index] = _copy_packet(packet, a_out, start, end, out)
        else:
            done[audio.index] = _encode_audio(packet, a_out, start, end, out)
    if not copy:
        reencoder.finish()
    if a_out is not None and not copy_audio:
        for packet in a_out.encode(None):
            out.mux(packet)
    return audio is not None


def _copy_packet(packet, out_stream, start: float, end: float, out) -> bool:
    """Copy one packet, shifted by ``start``; True once the stream is past ``end`` (decode order: dts)."""
    if packet.dts is None or packet.pts is None:
        return False
    tb = packet.time_base
    if packet.dts * tb >= end:
        return True
    if packet.pts * tb < start - 1e-6:  # before the moment (leading frames of an open GOP, early audio)
        return False
    shift = int(round(start / tb))
    packet.pts -= shift
    packet.dts -= shift
    packet.stream = out_stream
    out.mux(packet)
    return False


class _VideoReencoder:
    """Decodes the source's video packets and encodes the frames of [start, end), the first one at 0: the frame on
    screen at ``start`` (the last one that began at or before it), so the clip opens on what was shown there."""

    def __init__(self, v_out, start: float, end: float, out):
        self.v_out, self.start, self.end, self.out = v_out, start, end, out
        self.held = None  # the latest frame that began at or before start, not yet written
        self.started = False

    def packet(self, packet) -> bool:
        """Feed one packet; True once a frame at or past ``end`` was seen."""
        for frame in packet.decode():
            t = frame.time
            if t is None:
                continue
            if not self.started and t <= self.start + 1e-6:
                self.held = frame
                continue
            if not self.started:
                self.started = True
                if self.held is not None:
                    self._encode(self.held, 0.0)
                    self.held = None
            if t >= self.end - 1e-6:
                return True
            self._encode(frame, t - self.start)
        return False

    def finish(self) -> None:
        if self.held is not None:  # the moment's only frame
            self._encode(self.held, 0.0)
        for encoded in self.v_out.encode(None):
            self.out.mux(encoded)

    def _encode(self, frame, t: float) -> None:
        v_out = self.v_out
        if frame.width != v_out.width or frame.height != v_out.height or frame.format.name != v_out.pix_fmt:
            frame = frame.reformat(width=v_out.width, height=v_out.height, format=v_out.pix_fmt)
        tb = v_out.codec_context.time_base
        frame.pts, frame.time_base = int(round(max(t, 0.0) / tb)), tb
        for encoded in v_out.encode(frame):
            self.out.mux(encoded)


def _encode_audio(packet, a_out, start: float, end: float, out) -> bool:
    import av
    import numpy as np

    for frame in packet.decode():
        if frame.time is None:
            continue
        rate = frame.sample_rate
        first = int(round((start - frame.time) * rate))  # samples to drop at the front
        last = int(round((end - frame.time) * rate))  # samples to keep up to
        if first >= frame.samples:
            continue
        if last <= 0:
            return True
        samples = frame.to_ndarray()
        if not frame.format.is_planar:
            samples = samples.reshape(-1, len(frame.layout.channels)).T
        samples = np.ascontiguousarray(samples[:, max(first, 0): min(last, frame.samples)], dtype=np.float32)
        trimmed = av.AudioFrame.from_ndarray(samples, format="fltp", layout=frame.layout.name)
        trimmed.sample_rate = rate
        trimmed.pts = max(int(round((frame.time - start) * rate)), 0)
        trimmed.time_base = Fraction(1, rate)
        for encoded in a_out.encode(trimmed):
            out.mux(encoded)
        if last <= frame.samples:
            return True
    return False


def _video_encoder(out, video):
    import av

    name = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = out.add_stream(name, rate=Fraction(_fps(video)).limit_denominator(1001))
    stream.width, stream.height = max(2, video.width // 2 * 2), max(2, video.height // 2 * 2)
    stream.pix_fmt = "yuv420p"
    stream.codec_context.time_base = Fraction(1, 1000)
    if name == "libx264":
        stream.options = dict(X264_OPTIONS)
    else:
        stream.codec_context.bit_rate = 4_000_000
    return stream


def _audio_encoder(out, audio):
    stream = out.add_stream("aac", rate=audio.codec_context.sample_rate or 44_100)
    stream.layout = audio.codec_context.layout.name
    return stream


def _seek(container, video, t: float) -> None:
    """Position the demuxer at the keyframe at or before ``t`` (the start of the file when there is none)."""
    if t > 0 and video.time_base is not None:
        container.seek(int(t / video.time_base), stream=video, backward=True, any_frame=False)


def _keyframe_at_or_before(container, video, t: float) -> float | None:
    """Seconds of the first keyframe the demuxer meets after a backward seek to ``t``, or None."""
    _seek(container, video, t)
    for packet in container.demux(video):
        if packet.pts is not None and packet.is_keyframe:
            return float(packet.pts * packet.time_base)
        if packet.pts is not None:
            return None
    return None


def _fps(video) -> float:
    rate = video.average_rate or video.guessed_rate or video.base_rate
    return float(rate) if rate else 25.0


def _duration(container, video) -> float | None:
    if video.duration is not None and video.time_base is not None:
        return float(video.duration * video.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
