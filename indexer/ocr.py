"""The on-screen text channel of an ingest: one frame per 2-s clip (indexer.decode, the visual channel's grid) ->
RapidOCR (PP-OCRv6 det + rec, ONNX, from its wheel) -> text tracks -> time-coded segments of channel "ocr" in
DuckDB (store.transcripts) -> the text index (store.text_index), through indexer.text_channel's shared loop.

    video --sample_clip_frames (the frame of each clip's middle, long side <= MAX_SIDE)--> lines [(text, score)]
          per clip --merge_tracks--> [{start, end, text, words}]: a line read in consecutive clips is one track,
          from the first clip it is seen in to the end of the last

Rate: one sample per 2-s clip, the grid every channel's moments are snapped to: a caption shown for under ~2 s can
fall between two samples; a finer rate would cost one OCR pass (~0.25 s on one core for a 320x240 frame, more for
larger ones) per extra sample. Lines are compared normalised (the text index's tokens, so case and punctuation do
not split a track) and as the same when difflib's ratio >= SAME_TEXT_RATIO, which absorbs a misread letter in one
sample. The stored text of a track is its most frequent reading. Each word of a track carries the track's span,
so a hit's ``matched_text`` is the matched words (retriever.fusion.matched_span).

Meta ``channels.ocr`` records the model (rapidocr's version and the two model files), the SHA-256 of the files
and the options; a run with other model files is refused. A video without text settles as ``no_text``.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import os
import time
from dataclasses import dataclass

import numpy as np

from indexer.decode import sample_clip_frames
from indexer.text_channel import ChannelStep, sha256_of
from model.spans import CLIP_SECONDS
from store.errors import VmrError
from store.text_index import tokens

CHANNEL = "ocr"
MODEL_FILES = ("PP-OCRv6_det_small.onnx", "PP-OCRv6_rec_small.onnx")  # detection, recognition: in the wheel
MAX_SIDE = 960  # frames are read at most this many pixels on their long side (detection's own limit, too)
MIN_SCORE = 0.6  # recognition confidence under which a line is dropped (noise read as letters)
SAME_TEXT_RATIO = 0.8
CHUNK_CLIPS = 32  # clips decoded at once: bounds the frames held in memory on a long video
OPTIONS = {"sample_seconds": CLIP_SECONDS, "max_side": MAX_SIDE, "min_score": MIN_SCORE,
           "same_text_ratio": SAME_TEXT_RATIO, "use_cls": False}


@dataclass(frozen=True)
class OcrChoice:
    """The OCR a run loads: ``det``/``rec`` ONNX file paths, ``model`` the name recorded, ``digest`` SHA-256 over
    both files, ``device`` "cpu" | "cuda" (onnxruntime's CUDA provider)."""
    model: str
    det: str
    rec: str
    digest: str
    device: str

    def record(self) -> dict:
        """Meta ``channels.ocr``."""
        return {"model": self.model, "digest": self.digest, "language": None, "options": OPTIONS}


def resolve_ocr(device: str = "auto") -> OcrChoice:
    """The packaged RapidOCR models; one-line VmrError when the ocr extra is missing."""
    try:
        import onnxruntime
        import rapidocr
    except ImportError:
        raise VmrError("the ocr channel needs rapidocr and onnxruntime: pip install 'vmr[ocr]' (or leave ocr out of "
                       "--channels)") from None
    folder = os.path.join(os.path.dirname(rapidocr.__file__), "models")
    det, rec = (os.path.join(folder, name) for name in MODEL_FILES)
    if not (os.path.isfile(det) and os.path.isfile(rec)):
        raise VmrError(f"rapidocr {importlib.metadata.version('rapidocr')} does not ship {' and '.join(MODEL_FILES)}: install the "
                       "version pyproject.toml names (pip install 'vmr[ocr]')")
    use_cuda = device != "cpu" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if device == "cuda" and not use_cuda:
        raise VmrError("--device cuda asked for, but onnxruntime has no CUDA provider (onnxruntime-gpu)")
    digest = sha256_of(det)[:32] + sha256_of(rec)[:32]
    version = importlib.metadata.version("rapidocr")
    return OcrChoice(f"rapidocr-{version} {MODEL_FILES[0]}+{MODEL_FILES[1]}", det, rec, digest,
                     "cuda" if use_cuda else "cpu")


def normalised(text: str) -> str:
    """A line as tracks compare it: its lower-cased words (store.text_index.tokens), one space apart."""
    return " ".join(tokens(text))


def merge_tracks(lines_per_clip: list[list[tuple[str, float]]], clip_seconds: float = CLIP_SECONDS,
                 duration: float | None = None) -> list[dict]:
    """Text tracks of one video. ``lines_per_clip[k]``: the (text, score) lines read in clip k's sample. A line
    read again in the next sample (normalised, difflib ratio >= SAME_TEXT_RATIO) extends its track; a track not
    read in a sample ends. Returns segments {start, end, text, words [{word, start, end}]} (store.transcripts)
    in time order: [first clip's start, last clip's end] seconds, clamped to ``duration``."""
    open_tracks, closed = [], []
    for k, lines in enumerate(lines_per_clip):
        still = []
        free = [(text, score, normalised(text)) for text, score in lines if normalised(text)]
        for track in open_tracks:
            match = next((i for i, (_, _, norm) in enumerate(free)
                          if difflib.SequenceMatcher(None, track["norm"], norm).ratio() >= SAME_TEXT_RATIO), None)
            if match is None:
                closed.append(track)
                continue
            text, score, _ = free.pop(match)
            track["last"] = k
            track["readings"][text] = track["readings"].get(text, 0) + 1
            still.append(track)
        for text, score, norm in free:
            still.append({"first": k, "last": k, "norm": norm, "readings": {text: 1}})
        open_tracks = still
    out = []
    for track in sorted(closed + open_tracks, key=lambda t: (t["first"], t["last"])):
        text = max(track["readings"].items(), key=lambda kv: kv[1])[0]  # first reading among equal counts
        start = track["first"] * clip_seconds
        end = (track["last"] + 1) * clip_seconds
        end = min(end, duration) if duration else end
        out.append({"start": round(start, 3), "end": round(end, 3), "text": text,
                    "words": [{"word": w, "start": round(start, 3), "end": round(end, 3)} for w in text.split()]})
    return out


def fit_side(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] with its long side cut to MAX_SIDE (aspect kept); as it is when already within."""
    h, w = rgb.shape[:2]
    if max(h, w) <= MAX_SIDE:
        return rgb
    import cv2  # rapidocr's own dependency

    scale = MAX_SIDE / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


class OcrWorker:
    """Ray actor: holds one RapidOCR; ``read(path)`` reads one video's text -> {state, reason, language, seconds,
    video_s, segments (merge_tracks)}."""

    def __init__(self, choice: OcrChoice, threads: int):
        from rapidocr import RapidOCR

        self.choice = choice
        self.engine = RapidOCR(params={
            "Global.log_level": "critical", "Global.use_cls": False, "Global.text_score": MIN_SCORE,
            "Det.model_path": choice.det, "Rec.model_path": choice.rec, "Det.limit_type": "max",
            "Det.limit_side_len": MAX_SIDE, "EngineConfig.onnxruntime.intra_op_num_threads": int(threads),
            "EngineConfig.onnxruntime.use_cuda": choice.device == "cuda"})

    def lines(self, rgb: np.ndarray) -> list[tuple[str, float]]:
        """(text, score) of each line read in one RGB frame, top to bottom."""
        result = self.engine(rgb)
        if result.txts is None:
            return []
        order = np.argsort([float(np.asarray(b)[:, 1].min()) for b in result.boxes], kind="stable")
        return [(result.txts[i].strip(), float(result.scores[i])) for i in order
                if result.txts[i].strip() and result.scores[i] >= MIN_SCORE]

    def read(self, path: str) -> dict:
        t0 = time.perf_counter()
        lines_per_clip, duration, first, broken = [], None, 0, None
        try:
            while True:
                frames, sampled = sample_clip_frames(path, fit_side, first, first + CHUNK_CLIPS)
                lines_per_clip += [self.lines(f) for f in frames]
                first += sampled.n
                if sampled.end_time is not None:
                    duration = sampled.end_time
                if sampled.n < CHUNK_CLIPS or (sampled.total_clips is not None and first >= sampled.total_clips):
                    break
        except Exception as err:  # noqa: BLE001 - DecodeError or a model error: recorded, never fails the run
            broken = " ".join(str(err).split())[:200]
            if not lines_per_clip:
                return {"state": "failed", "reason": f"frames unreadable for ocr: {broken}", "language": None,
                        "segments": [], "video_s": 0.0, "seconds": time.perf_counter() - t0}
        segments = merge_tracks(lines_per_clip, CLIP_SECONDS, duration)
        reason = None if segments else "no on-screen text found"
        if broken:  # what was read before the break is kept, as a broken audio stream's is
            reason = f"frames broke at {len(lines_per_clip) * CLIP_SECONDS:.0f} s ({broken}): read to there"
        return {"state": "ok" if segments else "no_text", "reason": reason,
                "language": None, "segments": segments, "video_s": duration or len(lines_per_clip) * CLIP_SECONDS,
                "seconds": time.perf_counter() - t0}


def channel_step(choice: OcrChoice) -> ChannelStep:
    """The ocr step of an ingest (indexer.text_channel)."""
    return ChannelStep(CHANNEL, OcrWorker, (choice,), choice.record(), "install the rapidocr of {model}", "video_s",
                       cores_per_actor=4)  # onnxruntime's small models gain little past ~4


__all__ = ["CHANNEL", "OcrChoice", "resolve_ocr", "normalised", "merge_tracks", "OcrWorker", "channel_step"]
