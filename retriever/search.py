"""`vmr search`: a sentence -> the best moments across the whole library.

    query --CLIP text--> pooled embedding [D] + per-token features [L, Dt]
          --coarse.coarse_candidates--> ≤ n_windows scored windows (≤75 clips each)
          --rerank.Reranker.moments--> localized moments (video seconds, model confidence)
          --merge.nms_merge--> ranked list, final score = merge.final_score(confidence, coarse)

Without a reranker (``rerank=False``, or no checkpoint) each window's coarse moment (its best pseudo-event) is
returned, flagged ``"reranked": false``. ``SearchEngine`` keeps the library, CLIP and reranker loaded for many
queries (benchmarks, corpus metrics); ``search_library`` is the one-shot entry point the CLI calls.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from model.errors import ModelError
from retriever.coarse import CoarseConfig, all_windows, coarse_candidates, features_of, video_table
from retriever.merge import COARSE_WEIGHT, Moment, final_score, nms_merge
from retriever.windows import Window
from store.errors import VmrError

log = logging.getLogger("vmr.search")
STAGES = ("text_encode", "coarse", "windows", "rerank", "merge")


def load_query_encoder(meta: dict, device: str = "auto"):
    """The CLIP model that built the index, for encoding queries.

    The index records how its CLIP was loaded (meta ``clip_source``: model name or config path, pretrained tag or
    checkpoint path); random weights only where the index itself was built with them (tests: seeded, so equal).
    """
    from model.features import ClipEncoder

    source = meta.get("clip_source") or {}
    if not source.get("model"):
        raise VmrError(f"the index does not record how its CLIP ({meta.get('clip_model')!r}) was loaded; "
                       "re-index it with this vmr")
    encoder = ClipEncoder.load(source["model"], source.get("pretrained"), device=device,
                               allow_random=not source.get("pretrained"))
    if encoder.model_id != meta.get("clip_model"):
        raise VmrError(f"the index was built with CLIP {meta.get('clip_model')} but {source['model']} / "
                       f"{source.get('pretrained')} now loads as {encoder.model_id}: restore that checkpoint or re-index")
    return encoder


def query_tokens(encoder, query: str) -> int:
    """Tokens the query needs, SOT and EOT included (more than the context length -> truncated)."""
    tokenizer = encoder.tokenizer
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return 0
    return len(encode(query)) + 2


class SearchEngine:
    """An open library with its query encoder and (optionally) a reranker, for many queries.

    Args: index_dir; checkpoint: LLMEPET checkpoint path or None (coarse only); rerank: False forces coarse only;
    device: "auto" | "cpu" | "cuda"; coarse: CoarseConfig; hold_connection: keep one DuckDB read connection open
    for the engine's life (a query server with no writer beside it: saves the file open per query, ~0.1 s, but
    an ingest cannot write while it is held). Off by default, so a search never holds an ingest up.
    """

    def __init__(self, index_dir, checkpoint: str | None = None, rerank: bool = True, device: str = "auto",
                 coarse: CoarseConfig | None = None, hold_connection: bool = False):
        from store.library import Library

        self.index_dir = str(index_dir)
        if not Path(self.index_dir).is_dir():
            raise VmrError(f"no index at {self.index_dir} (build one with `vmr index DIR --index {self.index_dir}`)")
        try:
            self.library = Library(self.index_dir, read_only=True)
            self.meta = self.library.meta()
        except VmrError:
            raise
        except Exception as err:  # a corrupt DuckDB/FAISS file: one line, not a traceback
            raise VmrError(f"cannot read the index at {self.index_dir}: {' '.join(str(err).split())[:200]}") from None
        self.coarse_cfg = coarse or CoarseConfig()
        self.encoder = load_query_encoder(self.meta, device)
        if self.encoder.embed_dim != int(self.meta.get("embed_dim", self.encoder.embed_dim)):
            raise VmrError(f"CLIP {self.encoder.model_id} gives {self.encoder.embed_dim}-d vectors, the index holds "
                           f"{self.meta['embed_dim']}-d")
        self.reranker = None
        self.fallback_reason = None
        checkpoint = checkpoint or self.meta.get("reranker")
        if rerank and checkpoint:
            from retriever.rerank import Reranker

            if not Path(checkpoint).is_file():
                raise VmrError(f"reranker checkpoint not found: {checkpoint}")
            self.reranker = Reranker.load(checkpoint, device=device)
            self.reranker.check_index(self.meta)
        elif rerank:
            self.fallback_reason = "no reranker checkpoint given (--checkpoint): coarse moments only"
        self.last_timings: dict = {}
        self.last_window_videos: list[int] = []
        self._features = None  # preloaded clip features (preload_features), for repeated exhaustive queries
        self._held = None
        if hold_connection:
            self._held = self.library.session()
            self._held.__enter__()

    def preload_features(self) -> None:
        """Read every video's clip features once and keep them for the exhaustive modes (benchmarks running many
        exhaustive queries). Needs ``hold_connection=True``: the held read connection keeps writers out, so the
        cached features cannot go stale."""
        if self._held is None:
            raise ValueError("preload_features needs hold_connection=True")
        self._features = features_of(self.library, list(video_table(self.library)))

    def close(self) -> None:
        if self._held is not None:
            self._held.__exit__(None, None, None)
            self._held = None
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
            log.warning("warning: the query is %d tokens long; CLIP reads only the first %d", n,
                        self.encoder.context_length)
        pooled = self.encoder.encode_text([query])[0]
        tokens = self.encoder.encode_text_tokens([query])[0] if self.reranker is not None else None
        return pooled, tokens

    def candidates(self, pooled: np.ndarray, exhaustive: bool = False, timings: dict | None = None) -> list[Window]:
        """Scored candidate windows (coarse) or every window (exhaustive). ``timings`` gets "coarse" (opening the
        index for this query, the video table, FAISS) and "windows" (exact scores, window placement)."""
        t0 = time.perf_counter()
        with self.library.session():  # one read connection for the whole query
            if exhaustive:
                videos = video_table(self.library)
                if timings is not None:
                    timings["coarse"] = timings.get("coarse", 0.0) + time.perf_counter() - t0
                t0 = time.perf_counter()
                windows = all_windows(self.library, pooled, videos, self._features)
                if timings is not None:
                    timings["windows"] = time.perf_counter() - t0
                return windows
            # the hit videos' rows are read with their features (not the whole video table)
            return coarse_candidates(self.library, pooled, self.coarse_cfg, None, timings)

    def search(self, query: str, top_k: int = 10, exhaustive: bool = False, rerank: bool | None = None,
               coarse_weight: float = COARSE_WEIGHT) -> list[dict]:
        """Best moments for ``query``, best first, as DESIGN.md's JSON dicts. Stage seconds in ``last_timings``.

        exhaustive: True reranks every window of every video (the baseline); "pruned" returns the same top_k
        without reranking the windows that cannot reach it (``pruned_moments``); coarse_weight: of the final-score
        rule.
        """
        timings = dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        use_rerank = self.reranker is not None if rerank is None else (rerank and self.reranker is not None)
        pooled, tokens = self.encode_query(query)
        timings["text_encode"] = time.perf_counter() - t0
        windows = self.candidates(pooled, exhaustive, timings)
        self.last_window_videos = [w.video_id for w in windows]  # coarse video ranking (corpus metrics)
        t1 = time.perf_counter()
        if use_rerank and exhaustive == "pruned":
            moments = pruned_moments(self.reranker, windows, tokens, top_k, coarse_weight)
        elif use_rerank:
            moments = self.reranker.moments(windows, tokens)
        else:
            moments = [coarse_moment(w) for w in windows]
        t2 = time.perf_counter()
        timings["rerank"] = t2 - t1 if use_rerank else 0.0
        for m in moments:
            m.score = final_score(m.confidence, m.coarse, coarse_weight)
        ranked = nms_merge(moments, top_k=top_k)
        timings["merge"] = time.perf_counter() - t2 + (0.0 if use_rerank else t2 - t1)
        timings["total"] = time.perf_counter() - t0
        self.last_timings = timings
        return [m.to_dict(reranked=use_rerank) for m in ranked]


def pruned_moments(reranker, windows: list[Window], tokens: np.ndarray, top_k: int,
                   coarse_weight: float = COARSE_WEIGHT, batch: int = 64) -> list[Moment]:
    """Reranked moments of ``windows`` sufficient for the exact final top_k (scored), skipping hopeless windows.

    A moment's final score is confidence + w * coarse with confidence ≤ 1 (a probability) and coarse the mean
    cosine of clips inside its window, so ≤ the window's best clip cosine: 1 + w * max(clip_scores) bounds every
    moment a window can give. Windows are reranked in order of that bound; once the next bound is below the
    top_k-th score after the merge, no remaining window can enter or change the top_k (NMS only removes a moment
    for a better one of the same video). So nms_merge(result, top_k) equals the merge over all windows, ties aside.
    """
    if coarse_weight < 0:
        raise ValueError("pruning needs a non-negative coarse weight")
    order = sorted(windows, key=lambda w: -float(np.max(w.clip_scores)))
    moments: list[Moment] = []
    for start in range(0, len(order), batch):
        if start and len(moments) >= top_k:
            kept = nms_merge(moments, top_k=top_k)
            if len(kept) >= top_k and 1.0 + coarse_weight * float(np.max(order[start].clip_scores)) < kept[-1].score:
                break
        new = reranker.moments(order[start: start + batch], tokens)
        for m in new:
            m.score = final_score(m.confidence, m.coarse, coarse_weight)
        moments += new
    return moments


def coarse_moment(window: Window) -> Moment:
    """The coarse stage's answer for a window: its best pseudo-event, scored by its mean cosine."""
    a, b = window.moment
    start = a * 2.0
    end = min(b * 2.0, max(window.duration, start))
    return Moment(window.video_id, window.path, start, end, None, window.score,
                  saliency=[float(s) for s in window.clip_scores], window=(window.start, window.end))


def search_library(query: str, index_dir: str, top_k: int = 10, checkpoint: str | None = None,
                   rerank: bool = True, device: str = "auto") -> list[dict]:
    """One query against the index at ``index_dir`` (what `vmr search` runs). Errors: one-line VmrError."""
    if not isinstance(query, str) or not query.strip():
        raise VmrError("the query is empty")
    try:
        with SearchEngine(index_dir, checkpoint=checkpoint, rerank=rerank, device=device) as engine:
            if engine.fallback_reason:
                log.warning("warning: %s", engine.fallback_reason)
            return engine.search(query, top_k=top_k)
    except ModelError as err:
        raise VmrError(str(err)) from None


def describe_results(results: list[dict]) -> str:
    """A readable table: rank, start-end, score (coarse), file."""
    if not results:
        return "no moments found (is the index empty?)"
    reranked = results[0].get("reranked", False)
    lines = [f"{'#':>3}  {'start':>8} {'end':>8}  {'score':>8} {'coarse':>7}  file",
             "-" * 60]
    for i, r in enumerate(results, 1):
        lines.append(f"{i:>3}  {_clock(r['start']):>8} {_clock(r['end']):>8}  {r['score']:>8.3f} "
                     f"{r['coarse_score']:>7.3f}  {r['path']}")
    if not reranked:
        lines.append("(coarse moments only: not reranked)")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    m, s = divmod(float(seconds), 60.0)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"
