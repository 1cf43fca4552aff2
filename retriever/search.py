"""`vmr search`: a sentence -> the best moments across the whole library.

    query --CLIP text--> pooled embedding [D] + per-token features [L, Dt]
          --coarse.coarse_candidates--> ≤ n_windows scored windows (≤75 clips each)
          --rerank.Reranker.rerank--> localized moments (video seconds, model confidence) of the best windows
                                      that fit the rerank time budget (RERANK_BUDGET_S; the rest stay coarse)
          --merge.nms_merge--> ranked list, score = the checkpoint's merge.ScoreRule (model score + fitted
                               coarse weight)
    query --text index (store.text_index)--> speech and ocr moments (matched words' span, a text track's span,
          on the clip grid), which also seed candidate windows --fusion.fuse--> one list by weighted reciprocal-rank fusion (an index with a
          text channel; retriever.fusion)

Without a reranker (``rerank=False``, or no checkpoint) each window's coarse moment (its best pseudo-event) is
returned, flagged ``"reranked": false``. ``SearchEngine`` keeps the library, CLIP and reranker loaded for many
queries (a server, benchmarks); its ``search`` returns a ``SearchResult`` (moments + stage timings);
``search_library`` is the one-shot entry point the CLI calls.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from model.errors import ModelError
from model.spans import paired_iou
from retriever.coarse import CoarseConfig, coarse_candidates
from retriever.fusion import CHANNELS, TEXT_CHANNELS, FusionConfig, fuse, seeds_of, text_moments
from retriever.merge import NMS_IOU, Moment, ScoreRule, nms_merge
from retriever.windows import Window, index_clip_seconds
from store import kinds, text_index
from store.clip_source import CLIPSource
from store.coarse_store import LibrarySet
from store.errors import VmrError
from store.library import Library
from store.status import incomplete_note, library_status

log = logging.getLogger("vmr.search")
STAGES = ("text_encode", "text_search", "coarse", "windows", "rerank", "merge")
# Seconds the rerank stage may take per query (None: every candidate window). The reranker scores the coarse
# windows best first, each forward as many as fit the time left (Reranker.rerank); the rest keep their coarse
# moment, ranked below every reranked one. 1.5 s leaves ~0.4 s of a 2-s search for the other stages at 10^3 videos
# on the 2-core EPYC, where one forward of a paper-size int8 reranker takes ~1-1.7 s for 1 window and ~2.8 s for 4
# under load (bench/results/rerank.md); the world reranker and a GPU rerank all 24 candidate windows inside it.
RERANK_BUDGET_S = 1.5
TEXT_VERBS = {"speech": "said", "ocr": "shown"}  # how the table names a text channel's matched words


def load_query_encoder(meta: dict, device: str = "auto"):
    """The CLIP model that built the index, for encoding queries.

    The index records how its CLIP was loaded (meta ``clip_source``, store.clip_source: model name or config path,
    pretrained tag or checkpoint path, precision); random weights only where the index itself was built with them
    (tests: seeded, so equal).
    """
    from model.inference.features import ClipEncoder  # lazy: torch, loaded at the first query

    source = CLIPSource.recorded(meta)
    if not source.model:
        raise VmrError(f"the index does not record how its CLIP ({meta.get('clip_model')!r}) was loaded; "
                       "re-index it with this vmr")
    # queries are embedded at the precision the index's clips were
    encoder = ClipEncoder.load(source.model, source.pretrained, device=device, allow_random=not source.pretrained,
                               precision=source.precision)
    if encoder.model_id != meta.get("clip_model"):
        raise VmrError(f"the index was built with CLIP {meta.get('clip_model')} but {source.model} / "
                       f"{source.pretrained} now loads as {encoder.model_id}: restore that checkpoint or re-index")
    return encoder


def query_tokens(encoder, query: str) -> int:
    """Tokens the query needs, SOT and EOT included (more than the context length -> truncated)."""
    tokenizer = encoder.tokenizer
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return 0
    return len(encode(query)) + 2


@dataclass
class SearchResult:
    """One query's answer: ``moments`` (best first, the dicts `vmr search --json` prints), ``timings`` (seconds per
    stage of STAGES, and "total"), ``window_videos`` (the video id of each candidate window, coarse ranking
    order: video recall of the coarse stage) and ``rerank_depth`` (how many candidate windows there were and how
    many the reranker scored: "windows", "reranked", "unread" (windows of videos lacking a kind the checkpoint
    reads), "budget_s", and "batch" windows a forward, "batch_s" its
    estimated seconds)."""
    moments: list[dict]
    timings: dict[str, float]
    window_videos: list[int] = field(default_factory=list)
    rerank_depth: dict = field(default_factory=dict)


class SearchEngine:
    """An open library with its query encoder and (optionally) a reranker, for many queries.

    Args: index_dir; checkpoint: LLMEPET checkpoint path or None (coarse only); rerank: False forces coarse only;
    device: "auto" | "cpu" | "cuda"; coarse: CoarseConfig; precision: the reranker's LLM blocks ("auto" | "fp32" |
    "bf16" | "int8", model.inference.precision); rerank_budget_s: seconds the rerank stage may take (RERANK_BUDGET_S;
    None: rerank every candidate window). Each query opens its own DuckDB read connection, so
    an ingest can write between queries; a caller that knows no writer runs can hold one for a batch of queries
    (``with engine.library.session():``).
    """

    def __init__(self, index_dir, checkpoint: str | None = None, rerank: bool = True, device: str = "auto",
                 coarse: CoarseConfig | None = None, precision: str = "auto",
                 rerank_budget_s: float | None = RERANK_BUDGET_S, fusion: FusionConfig | None = None):
        dirs = [str(index_dir)] if isinstance(index_dir, (str, os.PathLike)) else [str(d) for d in index_dir]
        self.index_dir = ", ".join(dirs)
        libraries = [open_library(d) for d in dirs]
        # several indexes: one store whose ids are unique across them (store.coarse_store)
        self.library = libraries[0] if len(libraries) == 1 else LibrarySet(libraries)
        self.meta = self.library.meta()
        self.coarse_cfg = coarse or CoarseConfig()
        self.rerank_budget_s = rerank_budget_s
        self.clip_seconds = index_clip_seconds(self.meta)
        self.encoder = load_query_encoder(self.meta, device)
        if self.encoder.embed_dim != int(self.meta.get("embed_dim", self.encoder.embed_dim)):
            raise VmrError(f"CLIP {self.encoder.model_id} gives {self.encoder.embed_dim}-d vectors, the index holds "
                           f"{self.meta['embed_dim']}-d")
        self.reranker = None
        self.fallback_reason = None
        checkpoint = checkpoint or self.meta.get("reranker")
        if rerank and checkpoint:
            from retriever.rerank import Reranker  # lazy: torch, only where the index has a reranker

            if not Path(checkpoint).is_file():
                raise VmrError(f"reranker checkpoint not found: {checkpoint}")
            self.reranker = Reranker.load(checkpoint, device=device, precision=precision)
            self.reranker.check_index(self.meta)
            if self.reranker.data_cfg.max_v_l > 0:  # windows as long as the checkpoint's input, not a constant
                self.coarse_cfg = replace(self.coarse_cfg, window_clips=self.reranker.data_cfg.max_v_l)
        elif rerank:
            self.fallback_reason = "no reranker checkpoint given (--checkpoint): coarse moments only"
        self.fusion = fusion or FusionConfig.load()
        self.text_index = self._open_text_index(libraries)

    def _open_text_index(self, libraries: list[Library]):
        """The text index of a one-library engine whose index holds a text channel (synced with its DuckDB, rebuilt
        if missing or damaged), else None."""
        self.text_channels = [c for c in TEXT_CHANNELS if c in (self.meta.get("channels") or {})]
        if not self.text_channels or len(libraries) != 1 or not text_index.available():
            self.text_channels = []
            return None
        index = text_index.TextIndex(libraries[0].index_dir)
        with libraries[0].session() as con:
            index.sync(con)
        return index

    def channels_of(self, asked: list[str] | None) -> list[str]:
        """The channels a search uses: ``asked`` (None: every one the index holds), refused in one line when the
        index lacks one."""
        held = ["visual", *self.text_channels]
        if asked is None:
            return held
        for channel in asked:
            if channel not in CHANNELS:
                raise VmrError(f"unknown channel {channel!r}: give any of {', '.join(CHANNELS)}")
            if channel not in held:
                raise VmrError(f"the index {self.index_dir} holds no {channel} channel (it holds {', '.join(held)}): "
                               f"add it with `vmr index DIR --index IDX --channels visual,{channel}`")
        return list(asked)

    def text_hits(self, query: str, channels: list[str]) -> list[dict]:
        """The text channels' moments of ``query`` (retriever.fusion.text_moments), best first."""
        wanted = [c for c in channels if c in self.text_channels]
        if not wanted or self.text_index is None:
            return []
        with self.library.session() as con:
            segments = self.text_index.matching_segments(con, query, self.fusion.depth, wanted)
            videos = self.library.videos_by_id({s["video_id"] for s in segments})
        return text_moments(segments, query, videos, self.clip_seconds)

    def close(self) -> None:
        self.library.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- stages ------------------------------------------------------------------------------------------------
    def encode_query(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """(pooled [D], per-token [L, Dt]); warns when the query is cut to the CLIP context length."""
        if not isinstance(query, str) or not query.strip():
            raise VmrError("the query is empty")
        query = " ".join(query.split())
        n = query_tokens(self.encoder, query)
        if n > self.encoder.context_length:
            log.warning("the query is %d tokens long; CLIP reads only the first %d", n,
                        self.encoder.context_length)
        pooled = self.encoder.encode_text([query])[0]
        tokens = self.encoder.encode_text_tokens([query])[0] if self.reranker is not None else None
        return pooled, tokens

    def candidates(self, pooled: np.ndarray, timings: dict | None = None,
                   extra_seeds: dict[int, list[int]] | None = None) -> list[Window]:
        """Scored candidate windows, best first (then those around ``extra_seeds``, retriever.coarse). ``timings``
        gets "coarse" (opening the index for this query, FAISS, the hit videos' rows) and "windows" (exact scores,
        window placement)."""
        with self.library.session():  # one read connection for the whole query
            return coarse_candidates(self.library, pooled, self.coarse_cfg, None, timings, self.clip_seconds,
                                     extra_seeds)

    def search(self, query: str, top_k: int = 10, rerank: bool | None = None,
               rule: ScoreRule | None = None, channels: list[str] | None = None) -> SearchResult:
        """Best moments for ``query``, best first, with the seconds each stage took.

        rerank: None = rerank when a reranker is loaded; rule: the ranking rule (default: the checkpoint's);
        channels: the channels that propose moments (None: all the index holds; retriever.fusion). Each moment
        says its ``channels`` and ``matched_text``; with a text channel they are fused (``fusion_score``).
        """
        channels = self.channels_of(channels)
        t0 = time.perf_counter()
        texts = self.text_hits(query, channels)
        t_text = time.perf_counter() - t0
        if "visual" not in channels:
            moments = fuse(_by_channel(texts, channels), self.fusion, top_k)
            return SearchResult(moments, {**dict.fromkeys(STAGES, 0.0), "text_search": t_text,
                                          "total": time.perf_counter() - t0})
        seeds = seeds_of(texts, self.fusion, self.clip_seconds)
        depth = max(top_k, self.fusion.depth) if self.text_channels else top_k
        result = self._visual_search(query, depth, rerank, rule, seeds)
        result.timings["text_search"] = t_text
        if self.text_channels:
            proposals = {"visual": result.moments, **_by_channel(texts, channels)}
            t1 = time.perf_counter()
            result.moments = fuse(proposals, self.fusion, top_k)
            result.timings["merge"] += time.perf_counter() - t1
        else:
            for m in result.moments:
                m.update(channels=["visual"], matched_text=None, text_span=None)
        result.timings["total"] = time.perf_counter() - t0
        return result

    def _visual_search(self, query: str, top_k: int, rerank: bool | None, rule: ScoreRule | None,
                       seeds: dict[int, list[int]]) -> SearchResult:
        """The visual channel: CLIP coarse stage (with the text hits' seed windows) and the reranker."""
        timings = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        use_rerank = self.reranker is not None and (rerank is None or bool(rerank))
        pooled, tokens = self.encode_query(query)
        timings["text_encode"] = time.perf_counter() - t0
        windows = self.candidates(pooled, timings, seeds)
        t1 = time.perf_counter()
        depth = {"windows": len(windows), "reranked": 0}
        if use_rerank:
            ready, unread = self.reranker.with_inputs(self.library, windows, kinds.coarse_kind(self.meta))
            moments, n = self.reranker.rerank(ready, tokens, self.rerank_budget_s)
            timings["rerank"] = time.perf_counter() - t1
            depth.update(reranked=n, budget_s=self.rerank_budget_s, batch=self.reranker.batch_size,
                         batch_s=self.reranker.estimate_seconds(self.reranker.batch_size), unread=len(unread))
            rest = [coarse_moment(w) for w in ready[n:] + unread]
        else:
            moments, rest = [coarse_moment(w) for w in windows], []
        t2 = time.perf_counter()
        rule = rule or (self.reranker.score_rule if self.reranker is not None else ScoreRule())
        ranked = rank_moments(moments, top_k, rule, reranked=use_rerank)
        if rest and len(ranked) < top_k:  # windows past the budget: their coarse moments, below every reranked one
            kept = [(r["video_id"], r["start"], r["end"]) for r in ranked]
            rest = [m for m in rest if not overlaps_kept(m, kept)]
            ranked += rank_moments(rest, top_k - len(ranked), ScoreRule(), reranked=False)
        timings["merge"] = time.perf_counter() - (t2 if use_rerank else t1)
        timings["total"] = time.perf_counter() - t0
        return SearchResult(ranked, timings, [w.video_id for w in windows], depth)


def _by_channel(texts: list[dict], channels: list[str]) -> dict[str, list[dict]]:
    """{text channel: its moments, best first} of the asked text channels, in TEXT_CHANNELS order (the order their
    spans place a fused moment, retriever.fusion)."""
    return {c: [m for m in texts if m["channel"] == c] for c in TEXT_CHANNELS if c in channels}


def rank_moments(moments: list[Moment], top_k: int, rule: ScoreRule | None = None,
                 reranked: bool = True) -> list[dict]:
    """Score every moment by ``rule``, merge overlapping ones (NMS), keep the best ``top_k`` as JSON dicts."""
    rule = rule or ScoreRule()
    for m in moments:
        m.score = rule.score(m)
    return [m.to_dict(reranked=reranked) for m in nms_merge(moments, top_k=top_k)]


def overlaps_kept(m: Moment, kept: list[tuple[int, float, float]], iou_threshold: float = NMS_IOU) -> bool:
    """Whether ``m`` overlaps one of the ``kept`` (video id, start, end) of its video by more than the NMS IoU."""
    same = [(st, ed) for vid, st, ed in kept if vid == m.video_id]
    return bool(same) and bool((paired_iou(np.array([m.start, m.end]), np.array(same)) > iou_threshold).any())


def coarse_moment(window: Window) -> Moment:
    """The coarse stage's answer for a window: its best pseudo-event, scored by its mean cosine."""
    a, b = window.moment
    start = a * window.clip_seconds
    end = min(b * window.clip_seconds, max(window.duration, start))
    return Moment(window.video_id, window.path, start, end, None, window.score,
                  saliency=[float(s) for s in window.clip_scores], window=(window.start, window.end))


def open_library(index_dir: str) -> Library:
    """A library opened for search; a missing, misnamed or damaged index is a one-line VmrError."""
    if Path(index_dir).exists() and not Path(index_dir).is_dir():
        raise VmrError(f"--index {index_dir} is a file, not an index folder: give the folder `vmr index` wrote")
    if not Path(index_dir).is_dir():
        raise VmrError(f"no index at {index_dir} (build one with `vmr index DIR --index {index_dir}`)")
    try:
        return Library(index_dir, read_only=True)
    except VmrError:
        raise
    except Exception as err:  # a corrupt DuckDB/FAISS file: one line, not a traceback
        raise VmrError(f"cannot read the index at {index_dir}: {' '.join(str(err).split())[:200]} (a damaged "
                       "index: build a new one with `vmr index VIDEOS --index NEW_FOLDER`)") from None


def search_library(query: str, index_dir: str, top_k: int = 10, checkpoint: str | None = None,
                   rerank: bool = True, device: str = "auto", precision: str = "auto",
                   rerank_budget_s: float | None = RERANK_BUDGET_S, channels: list[str] | None = None) -> SearchResult:
    """One query against the index at ``index_dir``, or several searched as one (a list), as `vmr search` runs
    it. Errors: one-line VmrError."""
    if not isinstance(query, str) or not query.strip():
        raise VmrError("the query is empty")
    try:
        with SearchEngine(index_dir, checkpoint=checkpoint, rerank=rerank, device=device,
                          precision=precision, rerank_budget_s=rerank_budget_s) as engine:
            if engine.fallback_reason:
                log.warning("%s", engine.fallback_reason)
            result = engine.search(query, top_k=top_k, channels=channels)
    except ModelError as err:
        raise VmrError(str(err)) from None
    for one in [index_dir] if isinstance(index_dir, (str, os.PathLike)) else index_dir:
        note = incomplete_note(library_status(one))
        if note:
            log.warning("%s: %s", one, note)
    return result


def describe_results(results: list[dict]) -> str:
    """A readable table: rank, start-end, score (coarse), the channels that found it, file; matched words below."""
    if not results:
        return "no moments found (is the index empty?)"
    reranked = any(r.get("reranked") for r in results)
    lines = [f"{'#':>3}  {'start':>8} {'end':>8}  {'score':>8} {'coarse':>7}  {'channels':<13} file",
             "-" * 72]
    for i, r in enumerate(results, 1):
        coarse = "-" if r.get("coarse_score") is None else f"{r['coarse_score']:.3f}"
        lines.append(f"{i:>3}  {_clock(r['start']):>8} {_clock(r['end']):>8}  {r['score']:>8.3f} {coarse:>7}  "
                     f"{'+'.join(r.get('channels') or ['visual']):<13} {r['path']}")
        if r.get("matched_text"):
            lines.append(f"{'':>5}{'/'.join(TEXT_VERBS[c] for c in r['channels'] if c in TEXT_VERBS)}: "
                         f"\"{r['matched_text']}\"")
    if not reranked:
        lines.append("(not reranked: coarse or text moments only)")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    m, s = divmod(float(seconds), 60.0)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"
