"""Rerank stage: the checkpoint's LLMEPET over the candidate windows -> localized moments in video seconds.

Each window is one model sample, assembled by model.data.sample as training and prediction assemble theirs (clip
features L2-normalised with the TEF appended, the query's tokens cut to max_q_l and L2-normalised). Windows run in
batches (padded, masked; as many a forward as the hardware does best, model.inference.precision.choose_batch_size) with
the query's text side computed once per batch; the outputs are decoded by model.postprocess (foreground probability,
spans in window seconds, rounded to the 2-s grid) and shifted by the window's start. ``Reranker.rerank`` can stop
at a time budget, taking the windows in the caller's (coarse) order.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
import torch

from model.data.sample import collate, text_input, video_input
from model.inference.checkpoint import data_config_of, load_checkpoint
from model.inference.features import resolve_device
from model.inference.postprocess import clean_windows, decode_outputs
from model.inference.precision import choose_batch_size, detect_hardware, llm_block_params
from retriever.merge import Moment, ScoreRule, span_coarse_score
from retriever.windows import Window, index_clip_seconds
from store import kinds
from store.errors import VmrError

log = logging.getLogger(__name__)
MOMENTS_PER_WINDOW = 3  # best predicted spans kept per window before the cross-window NMS


class Reranker:
    """A loaded LLMEPET checkpoint, ready to score windows.

    Attributes: model (eval mode), data_cfg (model.data.sample.DataConfig), spec (feature spec dict: clip_model,
    video_dims, text_dim, clip_seconds), device.
    """

    def __init__(self, model, data_cfg, spec: dict, device, batch_size: int | None = None, path: str = ""):
        """``batch_size``: windows per forward; None: chosen for the hardware
        (model.inference.precision.choose_batch_size)."""
        self.model = model.eval()
        self.data_cfg = data_cfg
        self.spec = spec
        self.device = device
        if batch_size is None:
            batch_size = choose_batch_size(detect_hardware(device), llm_block_params(model))
        # A converted authors' checkpoint (compat "authors") attends across the batch (its LLM blocks mix the
        # samples at each time step, its T2V mask reads other samples' padding): a window's result would depend on
        # its batch companions, so such checkpoints rerank one window at a time.
        self.batch_size = 1 if getattr(model.cfg, "compat", "vmr") == "authors" else batch_size
        self.path = path
        # the checkpoint's ranking rule, fit on validation queries after training (retriever.merge.ScoreRule)
        self.score_rule = ScoreRule.from_dict(model.cfg.extra.get("score_rule"))
        # seconds a forward of n windows took, per n (exponential mean of the latest): what fits a time budget
        self.forward_seconds: dict[int, float] = {}

    @classmethod
    def load(cls, checkpoint: str, device: str = "auto", batch_size: int | None = None,
             precision: str = "auto") -> "Reranker":
        """``precision``: of the frozen LLM blocks, chosen once here (model.inference.precision; the choice is logged);
        ``batch_size`` None: chosen for the hardware (logged)."""
        torch_device = resolve_device(device)
        model, ckpt = load_checkpoint(checkpoint, device=torch_device, precision=precision, log=log.info)
        reranker = cls(model, data_config_of(ckpt), dict(ckpt["feature_spec"]), torch_device, batch_size,
                       str(checkpoint))
        log.info("rerank batch: %d windows a forward%s", reranker.batch_size,
                 "" if batch_size is not None else " (chosen for this hardware)")
        return reranker

    def check_index(self, meta: dict) -> None:
        """Refuse an index whose features are not the ones the checkpoint was trained on: its CLIP, each feature
        kind it reads (store.kinds, in the checkpoint's order and widths), its clip length."""
        want, have = self.spec.get("clip_model"), meta.get("clip_model")
        if want and have and want != have:
            raise VmrError(f"the reranker {self.path or ''} was trained on {want} features but the index holds "
                           f"{have}: use a checkpoint trained on this index's CLIP, or --no-rerank")
        kinds.check_kinds(meta, list(self.spec.get("video_kinds") or [kinds.CLIP_KIND]), self.spec.get("video_dims"),
                          f"the reranker {self.path or ''}".rstrip())
        seconds, index_seconds = self.spec.get("clip_seconds"), index_clip_seconds(meta)
        if seconds and abs(float(seconds) - index_seconds) > 1e-6:
            raise VmrError(f"the reranker was trained on {seconds}-s clips, the index uses {index_seconds}-s clips")

    @property
    def video_kinds(self) -> list[str]:
        """The feature kinds the checkpoint reads, in its input order."""
        return list(self.spec.get("video_kinds") or [kinds.CLIP_KIND])

    def with_inputs(self, library, windows: list[Window], coarse_kind: str) -> tuple[list[Window], list[Window]]:
        """(ready, unread): the windows with ``feats`` set to the checkpoint's input, the kinds it reads side by
        side in its order (store.Library.features_many), and the windows of videos that lack one of those kinds
        (left to their coarse moments). A checkpoint that reads only the index's ``coarse_kind`` takes the coarse
        stage's vectors as they are."""
        if self.video_kinds == [coarse_kind]:
            return windows, []
        stored = library.features_many({w.video_id for w in windows}, self.video_kinds)
        ready, unread = [], []
        for window in windows:
            feats = stored.get(window.video_id)
            if feats is None or len(feats) <= window.first_clip:
                unread.append(window)
            else:
                ready.append(replace(window, feats=feats[window.first_clip: window.last_clip]))
        return ready, unread

    def _item(self, window: Window, text: torch.Tensor) -> dict:
        feats = window.feats[: self.data_cfg.v_limit] if self.data_cfg.v_limit else window.feats
        video = video_input(feats, self.data_cfg, self.spec.get("video_dims"))
        return {"video": video, "text": text, "meta": {"duration": len(video) * window.clip_seconds}}

    def moments(self, windows: list[Window], text_tokens: np.ndarray,
                per_window: int = MOMENTS_PER_WINDOW) -> list[Moment]:
        """Localized moments of every window (``per_window`` best each), in absolute video seconds.

        Args: windows with feats [n_i, D] and clip_scores [n_i]; text_tokens np.float32 [L, Dt].
        """
        return self.rerank(windows, text_tokens, None, per_window)[0]

    def estimate_seconds(self, n: int) -> float | None:
        """An upper bound of the seconds a forward of ``n`` windows takes, from the forwards measured so far (None:
        none yet): a forward of m windows that took t bounds n <= m by t (fewer windows are not slower) and n > m by
        t * n / m (the time per window does not grow with the batch). Times are kept per batch size and follow
        the machine's load (exponential mean of the latest forwards)."""
        if not self.forward_seconds:
            return None
        return min(t if n <= m else t * n / m for m, t in self.forward_seconds.items())

    @torch.inference_mode()
    def rerank(self, windows: list[Window], text_tokens: np.ndarray, budget_s: float | None = None,
               per_window: int = MOMENTS_PER_WINDOW) -> tuple[list[Moment], int]:
        """(moments, n): the moments of the first n ``windows``, taken in order, batch by batch.

        budget_s: None = every window; else each forward takes the most windows (up to ``batch_size``) whose
        estimated time (``estimate_seconds``) ends within ``budget_s`` seconds of the call's start, and the call
        stops when not one more fits. At least one window is reranked; before any forward was measured the first
        one is a whole batch.
        """
        text = text_input(text_tokens, self.data_cfg)
        out: list[Moment] = []
        t0 = time.perf_counter()
        done = 0
        while done < len(windows):
            n = min(self.batch_size, len(windows) - done)
            if budget_s is not None and self.forward_seconds:
                left = budget_s - (time.perf_counter() - t0)
                while n > 0 and self.estimate_seconds(n) > left:
                    n -= 1
                if n == 0:
                    if done:
                        break
                    n = 1
            chunk = windows[done: done + n]
            t1 = time.perf_counter()
            out += self._forward(chunk, text, per_window)
            took = time.perf_counter() - t1
            old = self.forward_seconds.get(n)
            self.forward_seconds[n] = took if old is None else 0.5 * (old + took)
            done += n
        return out, done

    def _forward(self, chunk: list[Window], text: torch.Tensor, per_window: int) -> list[Moment]:
        """One batched forward over ``chunk`` -> its windows' moments, window by window."""
        out: list[Moment] = []
        batch = collate([self._item(w, text) for w in chunk])
        inputs = {k: v.to(self.device) for k, v in batch["inputs"].items()}
        # every window has the query's sentence: its text side runs once for the batch (LLMEPET.forward)
        inputs["src_txt"], inputs["src_txt_mask"] = inputs["src_txt"][:1], inputs["src_txt_mask"][:1]
        outputs = self.model(**inputs)
        decoded = decode_outputs(outputs, inputs["src_vid_mask"], batch["meta"])
        for window, pred in zip(chunk, decoded):
            clip_seconds = window.clip_seconds
            saliency = 1.0 / (1.0 + np.exp(-np.asarray(pred["saliency"], dtype=np.float64)))  # [n] in (0, 1)
            relevance = pred.get("relevance")
            rows = clean_windows(pred["windows"], clip_seconds, max_ts=None)[:per_window]
            for st, ed, conf in rows:
                st, ed = window.start + st, window.start + ed
                ed = min(ed, window.end)
                if ed - st < clip_seconds / 2:  # rounding collapsed it: keep one clip
                    ed = min(st + clip_seconds, window.end)
                out.append(Moment(window.video_id, window.path, st, ed, float(conf),
                                  span_coarse_score(window.clip_scores, window.first_clip, st, ed, clip_seconds),
                                  saliency=saliency.tolist(), window=(window.start, window.end),
                                  span_saliency=span_coarse_score(saliency, window.first_clip, st, ed,
                                                                  clip_seconds),
                                  span_relevance=None if relevance is None else span_coarse_score(
                                      np.asarray(relevance), window.first_clip, st, ed, clip_seconds)))
        return out
