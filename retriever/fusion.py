"""Channel fusion: the visual moments and the text channels' moments (speech, ocr) of a query -> one ranked list.

Each channel proposes moments, best first:
  visual  the reranked (or coarse) moments of retriever.search, as today;
  speech  the text index's hits (store.text_index: words, "quoted" phrases), each the span of its segment's
          matched words (``matched_span``: the phrase's occurrence, else the densest run of matched content
          words) snapped outwards to the clip grid;
  ocr     the same index's hits on on-screen text tracks (indexer.ocr): every word of a track carries the
          track's span, so a moment is the track's first-seen to last-seen clips.

Weighted reciprocal-rank fusion: a moment's ``fusion_score`` = sum over the channels that propose it of
weight[channel] / (k + rank in that channel). Two channels propose the same moment when their spans, in one
video, overlap by IoU >= ``same_moment_iou`` (not mere containment: a coarse visual moment is a whole pseudo-event,
often 5x a spoken sentence, and would vote for every sentence said during it). Its boundaries are the
reranked visual moment's where one overlaps (the reranker localises), else the first text channel's span in
TEXT_CHANNELS order, speech before ocr (a coarse visual moment is a whole pseudo-event, which the spoken words
place better; a caption often stays up longer than the moment it names). k, the weights and the overlap
rule are data (fusion.json beside this file, ``FusionConfig.load``), not code.

Every fused hit carries ``channels`` (the channels that proposed it, sorted), ``matched_text`` (the matched
words of its best text hit, None when no text channel matched) and ``text_span`` (the seconds those words are said
or shown, None likewise).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from store.text_index import parse_query, tokens

FUSION_FILE = Path(__file__).with_name("fusion.json")
TEXT_CHANNELS = ("speech", "ocr")  # the order their spans place a fused moment
CHANNELS = ("visual", *TEXT_CHANNELS)
RUN_GAP_WORDS = 3  # matched words further apart than this start a new run


@dataclass(frozen=True)
class FusionConfig:
    """k and weights of the reciprocal-rank fusion; depth: moments each channel contributes; seed_windows: text
    hits that also seed a candidate window of the reranker (retriever.coarse); same_moment_iou: see module."""
    k: float = 60.0
    weights: dict = field(default_factory=lambda: {"visual": 1.0, "speech": 2.0, "ocr": 2.0})
    depth: int = 50
    seed_windows: int = 6
    same_moment_iou: float = 0.3

    @classmethod
    def load(cls, path=FUSION_FILE) -> "FusionConfig":
        with open(path) as f:
            data = json.load(f)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


def matched_span(words: list[str], query: str) -> tuple[int, int, float] | None:
    """(first, last) index of the words of a segment that the query matched, and the coverage: the share of the
    query's search terms (store.text_index.parse_query) that span holds; None when nothing matched.

    A quoted phrase: its first occurrence (coverage 1). Else the run of matched words (gaps <= RUN_GAP_WORDS)
    holding the most distinct terms."""
    phrases, terms = parse_query(query)
    word_tokens = [tokens(w) for w in words]
    flat = [(t, i) for i, toks in enumerate(word_tokens) for t in toks]
    for phrase in phrases:
        for s in range(len(flat) - len(phrase) + 1):
            if [t for t, _ in flat[s: s + len(phrase)]] == phrase:
                return flat[s][1], flat[s + len(phrase) - 1][1], 1.0
    wanted = set(terms)
    hits = [i for i, toks in enumerate(word_tokens) if wanted & set(toks)]
    if not hits:
        return None
    runs, run = [], [hits[0]]
    for i in hits[1:]:
        if i - run[-1] > RUN_GAP_WORDS:
            runs.append(run)
            run = []
        run.append(i)
    runs.append(run)

    def held(r):
        return {t for i in r for t in word_tokens[i]} & wanted

    best = max(runs, key=lambda r: (len(held(r)), -(r[-1] - r[0])))
    return best[0], best[-1], len(held(best)) / len(wanted)


def snap(start: float, end: float, clip_seconds: float, duration: float | None) -> tuple[float, float]:
    """[start, end] s widened to whole clips of the grid (at least one), clamped to the video."""
    a = math.floor(max(0.0, start) / clip_seconds)
    b = max(a + 1, math.ceil(end / clip_seconds - 1e-9))
    lo, hi = a * clip_seconds, b * clip_seconds
    return lo, (min(hi, duration) if duration else hi)


def text_moments(segments: list[dict], query: str, videos: dict[int, dict], clip_seconds: float) -> list[dict]:
    """Moments of the text hits (store.text_index.TextIndex.matching_segments, best first) in `vmr search
    --json` form: the matched words' span on the clip grid; ``score`` the text engine's (BM25)."""
    out = []
    for seg in segments:
        video = videos.get(int(seg["video_id"]))
        if video is None or video.get("status") != "indexed":
            continue
        words = list(seg["words"] or [])
        span = matched_span(words, query) if words else None
        if span is None:  # a segment without word times (or matched by no single word): all of it
            start, end, text, coverage = seg["start"], seg["end"], seg["text"], 1.0
        else:
            start, end = seg["word_starts"][span[0]], seg["word_ends"][span[1]]
            text, coverage = " ".join(words[span[0]: span[1] + 1]), span[2]
        lo, hi = snap(start, end, clip_seconds, video.get("duration"))
        out.append({"path": video["path"], "video_id": int(seg["video_id"]), "start": round(lo, 3),
                    "end": round(hi, 3), "score": round(float(seg["score"]), 6), "coarse_score": None,
                    "confidence": None, "saliency": [], "span_saliency": None, "relevance": None,
                    "window": [round(lo, 3), round(hi, 3)], "reranked": False, "channel": seg["channel"],
                    "matched_text": text, "text_span": [round(float(start), 3), round(float(end), 3)],
                    "coverage": round(coverage, 3)})
    out.sort(key=lambda m: -m["coverage"])  # stable: BM25 order among equal coverage
    return out


def _same_moment(a: dict, b: dict, min_iou: float) -> bool:
    if a["video_id"] != b["video_id"]:
        return False
    inter = min(a["end"], b["end"]) - max(a["start"], b["start"])
    union = max(a["end"], b["end"]) - min(a["start"], b["start"])
    return inter > 0 and inter / union >= min_iou


def fuse(proposals: dict[str, list[dict]], cfg: FusionConfig, top_k: int) -> list[dict]:
    """One ranked list of the channels' moments (module docstring); ``proposals``: channel -> its moments, best
    first (visual first in the dict: its boundaries win, then TEXT_CHANNELS order). Each result gains
    fusion_score, channels, matched_text, text_span."""
    groups: list[dict] = []
    for channel, moments in proposals.items():
        weight = float(cfg.weights.get(channel, 1.0))
        for rank, moment in enumerate(moments[: cfg.depth], 1):
            group = next((g for g in groups if _same_moment(g["moment"], moment, cfg.same_moment_iou)), None)
            if group is None:
                group = {"moment": dict(moment), "ranks": {}, "matched_text": None}
                groups.append(group)
            if channel in group["ranks"]:
                continue  # a lower-ranked proposal of a channel that already proposed this moment
            group["ranks"][channel] = rank
            group["score"] = group.get("score", 0.0) + weight * moment.get("coverage", 1.0) / (cfg.k + rank)
            if group["matched_text"] is None and moment.get("matched_text"):
                group["matched_text"] = moment["matched_text"]
                if not group["moment"].get("reranked"):  # a coarse moment is a pseudo-event: the words place it
                    group["moment"].update(start=moment["start"], end=moment["end"])
                group["moment"]["text_span"] = moment.get("text_span")
    groups.sort(key=lambda g: -g["score"])
    out = []
    for g in groups[:top_k]:
        moment = {k: v for k, v in g["moment"].items() if k not in ("channel", "matched_text", "coverage")}
        moment.update(fusion_score=round(g["score"], 6), channels=sorted(g["ranks"]), matched_text=g["matched_text"],
                      text_span=moment.get("text_span"))
        out.append(moment)
    return out


def seeds_of(moments: list[dict], cfg: FusionConfig, clip_seconds: float) -> dict[int, list[int]]:
    """{video id: [clip]} of the best text moments: each seeds a reranker window (retriever.coarse)."""
    seeds: dict[int, list[int]] = {}
    for m in moments[: cfg.seed_windows]:
        seeds.setdefault(int(m["video_id"]), []).append(int(m["start"] // clip_seconds))
    return seeds


__all__ = ["FusionConfig", "CHANNELS", "TEXT_CHANNELS", "matched_span", "snap", "text_moments", "fuse", "seeds_of"]
