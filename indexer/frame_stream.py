"""One pass over every frame of a video segment, feeding every kind: CLIP's frame a clip and SlowFast's 32 frames.

decode.py picks CLIP's one frame a clip and seeks past the frames between. SlowFast needs every frame (HERO's
``fps=30`` resample), so when a run computes SlowFast a segment is decoded straight through once and both kinds
take their frames from that pass:

- CLIP: clip k's frame is the last frame shown before start + (k + 1/2) * clip_len, decode.py's rule (the same
  frames; tests/test_slowfast_ingest.py checks it), resized by the CLIP model's preprocessing;
- SlowFast: 30-fps tick n shows the last frame whose time from the stream start rounds to a tick <= n
  (slowfast_frames.resampled_source_frames); clip k's 32 frames are its ticks by slowfast_frames.clip_frame_ticks,
  turned to the display orientation, scaled and cropped from the decoded (yuv) frame by the extractor's own
  libavfilter chain (slowfast_frames.ExtractorScaler: one swscale pass, no full-size rgb picture). A clip is emitted as soon as its
  last tick is settled, so a segment holds about one clip of frames besides what it returns; at the end of the video
  the padding rule (which needs the number of ticks, known only then) gives the last clips.

Only the frames some tick or clip uses are converted: per clip, the window's offsets and the ones the end
padding can reach (``_padding_offsets``).

    decode_kinds(path, clip_resize | None, first_clip, stop_clip, clip_len)
        -> (clip frames uint8 [n, S, S, 3], slowfast windows uint8 [m, 32, 224, 224, 3], Streamed)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from indexer import slowfast_frames as sf
from indexer.decode import DecodeError, Sampled, _converted, _decode_iter, _open, display_rgb
from model.spans import num_clips

SEEK_MARGIN_SECONDS = 1.0  # a later segment seeks this much before its first clip (decode.py does the same)


@dataclass
class Streamed(Sampled):
    """Sampled (the CLIP side; n = 0 when CLIP was not asked for) plus the SlowFast side of one segment."""
    slowfast_first: int = 0  # clip index of the first window returned
    slowfast_n: int = 0
    slowfast_total: int | None = None  # SlowFast clips of the whole video, when decoding reached its end
    fps_floor: int = sf.TARGET_FPS  # the source fps HERO's window uses


def extractor_fps_of(stream) -> int:
    """floor(avg_frame_rate) of the stream; a stream that states no rate (some VFR files) gets 30, the rate the
    frames are resampled to, so its window is the plain 30-fps one."""
    rate = stream.average_rate or stream.guessed_rate
    return sf.extractor_fps(rate) if rate else sf.TARGET_FPS


def stream_duration_of(stream) -> float | None:
    """The video stream's own duration (ffprobe's stream ``duration``), None when the container gives none (HERO
    then keeps every padded clip)."""
    if stream.duration is None or not stream.time_base:
        return None
    return float(stream.duration * stream.time_base)


def _padding_offsets(window: np.ndarray, clip_frames: int) -> set[int]:
    """Offsets within a clip that its windows can use: the window's, and in the video's last clip the same second's
    positions of the last 1-s block (clip_frame_ticks' padding); the very last tick is kept separately."""
    per_second = window % sf.TARGET_FPS
    return {int(o) for o in (*window, *per_second, *(per_second + sf.TARGET_FPS)) if o < clip_frames}


def decode_kinds(path: str, clip_resize, first_clip: int = 0, stop_clip: int | None = None, clip_len: int = 2):
    """CLIP frames (``clip_resize`` None: none) and SlowFast windows of clips first_clip .. stop_clip - 1 (None: to
    the end). A segment that reaches the end also returns the SlowFast clips past stop_clip that the padding adds.
    Raises DecodeError when no frame at all can be decoded."""
    container = _open(path)
    try:
        return _Stream(container, clip_resize, first_clip, stop_clip, int(clip_len)).run()
    finally:
        container.close()


class _Stream:
    def __init__(self, container, clip_resize, first: int, stop: int | None, clip_len: int):
        self.container, self.clip_resize, self.first, self.stop, self.clip_len = container, clip_resize, first, stop, clip_len
        self.stream = container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.tb_exact = self.stream.time_base  # ticks are rounded in exact arithmetic, as ffmpeg's fps filter does
        self.tb = float(self.tb_exact)
        self.start_pts = self.stream.start_time
        self.start = float(self.start_pts * self.tb_exact) if self.start_pts is not None else None
        self.fps_floor = extractor_fps_of(self.stream)
        self.duration = stream_duration_of(self.stream)
        self.clip_frames = sf.TARGET_FPS * clip_len
        self.window = sf.clip_window(self.fps_floor, clip_len)
        self.keep = _padding_offsets(self.window, self.clip_frames)
        self.state = {"decoded": 0, "seeks": 0, "width": 0, "height": 0, "rotation": 0}
        self.clip_out, self.sf_out = [], []
        self.clip_cache, self.sf_cache = {}, {}
        self.slowfast_pixels = sf.ExtractorScaler()
        self.held = {}  # tick -> uint8 [224, 224, 3] of clips not yet emitted
        self.next_tick = first * self.clip_frames  # first tick not yet settled
        self.last_settled = None  # (tick, frame) of the latest settled tick
        self.k_clip = self.k_sf = first

    def _time(self, frame) -> float:
        return frame.pts * self.tb

    def run(self):
        fallback_gap = 1.0 / float(self.stream.average_rate) if self.stream.average_rate else 0.04
        frames = None
        if self.first > 0 and self.start is not None:
            target = self.start + self.first * self.clip_len - SEEK_MARGIN_SECONDS
            self.container.seek(max(0, int(round(target / self.tb))), stream=self.stream, backward=True, any_frame=False)
            self.state["seeks"] += 1
        frames = _decode_iter(self.container, self.stream, self.state)
        prev, gap, eof = None, fallback_gap, True
        for frame in frames:
            if self.start is None:  # unknown start time: take the first decoded frame's
                self.start_pts = frame.pts or 0
                self.start = float(self.start_pts * self.tb_exact)
            if frame.pts is None:  # no timestamp: treat as following the previous frame
                frame.pts = int(((self._time(prev) if prev is not None else self.start) + gap) / self.tb)
            t = self._time(frame)
            self._clip_frames_before(t, prev if prev is not None else frame)
            self._settle_ticks(sf.output_tick((frame.pts - self.start_pts) * self.tb_exact), prev if prev is not None else frame)
            if prev is not None:
                gap = max(1e-6, t - self._time(prev))
            prev = frame
            if self._segment_done():
                eof = False
                break
        if not eof:
            return self._result(None, None)
        if prev is None:
            if self.first > 0:  # a later segment that starts past the end: nothing to add
                return self._result(None, None)
            raise DecodeError("no decodable video frame")
        last_duration = prev.duration * self.tb if prev.duration else gap
        end_time = max(0.0, self._time(prev) - self.start + last_duration)
        exact_end = (prev.pts - self.start_pts + prev.duration) * self.tb_exact if prev.duration else end_time
        return self._finish(prev, end_time, exact_end)

    # ---- CLIP: decode.py's rule --------------------------------------------------------------------------------
    def _clip_frames_before(self, t: float, shown) -> None:
        """Clips whose boundary the frame at ``t`` reaches take ``shown``, the last frame before it (the first frame
        stands in when the stream starts after a boundary)."""
        while (self.stop is None or self.k_clip < self.stop) and \
                t >= self.start + self.k_clip * self.clip_len + self.clip_len / 2:
            self._take_clip_frame(shown)

    def _clip_pixels(self, frame) -> np.ndarray:
        return self.clip_resize(display_rgb(frame))

    def _take_clip_frame(self, frame) -> None:
        if self.clip_resize is not None:
            self.clip_out.append(_converted(frame, self._clip_pixels, self.clip_cache, self.state))
        self.k_clip += 1

    # ---- SlowFast: HERO's rule ---------------------------------------------------------------------------------
    def _settle_ticks(self, upto: int, shown, every: bool = False) -> None:
        """Ticks next_tick .. upto - 1 show ``shown``; hold the ones a window can use (``every``: all of them)."""
        for n in range(self.next_tick, upto):
            if every or n % self.clip_frames in self.keep:
                self.held[n] = _converted(shown, self.slowfast_pixels, self.sf_cache, self.state)
            self.last_settled = (n, shown)
        self.next_tick = max(self.next_tick, upto)
        while (self.stop is None or self.k_sf < self.stop) and \
                self.next_tick > self.k_sf * self.clip_frames + int(self.window.max()):
            self._emit(self.k_sf * self.clip_frames + self.window)

    def _emit(self, ticks: np.ndarray) -> None:
        self.sf_out.append(np.stack([self.held[int(n)] for n in ticks]))
        self.k_sf += 1
        for n in [n for n in self.held if n < self.k_sf * self.clip_frames]:
            del self.held[n]

    def _segment_done(self) -> bool:
        return self.stop is not None and self.k_clip >= self.stop and self.k_sf >= self.stop

    def _finish(self, last, end_time: float, exact_end):
        total = num_clips(end_time)
        clip_stop = total if self.stop is None else min(total, self.stop)
        while self.k_clip < clip_stop:  # ticks after the last frame repeat it (ffmpeg eof_action=round)
            self._take_clip_frame(last)
        del self.clip_out[max(0, clip_stop - self.first):]
        n_ticks = max(1, sf.output_tick(exact_end))
        self._settle_ticks(n_ticks, last, every=True)
        if n_ticks - 1 not in self.held and self.last_settled and self.last_settled[0] == n_ticks - 1:
            self.held[n_ticks - 1] = _converted(self.last_settled[1], self.slowfast_pixels, self.sf_cache, self.state)
        sf_total = sf.num_slowfast_clips(n_ticks, self.clip_len, self.duration)
        rows = sf.clip_frame_ticks(n_ticks, self.fps_floor, self.clip_len, self.duration)
        while self.k_sf < sf_total:
            self._emit(rows[self.k_sf])
        del self.sf_out[max(0, sf_total - self.first):]
        return self._result(end_time, sf_total)

    def _result(self, end_time: float | None, sf_total: int | None):
        s = self.state
        info = Streamed(self.first, len(self.clip_out), end_time, None if end_time is None else num_clips(end_time),
                        s["decoded"], s["seeks"], s["width"], s["height"], s["rotation"], slowfast_first=self.first,
                        slowfast_n=len(self.sf_out), slowfast_total=sf_total, fps_floor=self.fps_floor)
        clips = np.stack(self.clip_out) if self.clip_out else np.zeros((0, 1, 1, 3), np.uint8)
        windows = np.stack(self.sf_out) if self.sf_out else np.zeros((0, sf.NUM_FRAMES, sf.SIZE, sf.SIZE, 3), np.uint8)
        return clips, windows, info


__all__ = ["Streamed", "decode_kinds", "extractor_fps_of", "stream_duration_of"]
