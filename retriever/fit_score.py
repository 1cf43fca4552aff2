"""Fit a checkpoint's ranking rule (retriever.merge.ScoreRule) on validation queries, and store it in the checkpoint.

After `vmr train --index ... --val ...` each validation query is searched on the index once (coarse candidates,
then the new reranker over them) and every candidate rule re-ranks the same moments, measured by the mean of
VCMR R@1 and R@5 at IoU 0.5 and 0.7. In two steps, so that what ranks is the model's own score: first the model
score (MODEL_SCORES; the relevance ones only for a model with the relevance head) that ranks best ALONE (coarse
weight 0); then, for that score, the coarse weight in COARSE_WEIGHTS that ranks best with it (ties: the smaller
weight, so 0 when the coarse term adds nothing). Test queries are never used: the caller hands validation
annotations only.
"""
from __future__ import annotations

from retriever.merge import MODEL_SCORES, RELEVANCE_SCORES, ScoreRule
from retriever.search import SearchEngine, rank_moments
from retriever.vcmr import vcmr_recall

COARSE_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
KS, IOUS = (1, 5), (0.5, 0.7)


def rule_metrics(per_query: list[tuple[list, int, list]], rule: ScoreRule) -> dict:
    """VCMR R@k (%) of ``rule`` over (reranked moments, gt video id, gt windows) per query."""
    return vcmr_recall(((rank_moments(list(moments), max(KS), rule), gt_video, windows)
                        for moments, gt_video, windows in per_query), KS, IOUS)


def rerank_queries(engine, annotations: list[dict]) -> list[tuple[list, int, list]]:
    """(reranked moments, gt video id, gt windows) of each annotation, searched once on the engine's index."""
    out = []
    with engine.library.session():
        for ann in annotations:
            pooled, tokens = engine.encode_query(ann["query"])
            windows = engine.candidates(pooled)
            out.append((engine.reranker.moments(windows, tokens), engine.library.resolve_vid(ann["vid"]),
                        ann["relevant_windows"]))
    return out


def fit_rule(per_query: list[tuple[list, int, list]]) -> tuple[ScoreRule, dict]:
    """The best rule (module docstring: the model score alone first, then its coarse weight) and the figures of
    every candidate ({"model/w": metrics})."""
    has_relevance = all(m.span_relevance is not None for moments, _, _ in per_query for m in moments)
    scores = [s for s in MODEL_SCORES if has_relevance or s not in RELEVANCE_SCORES]
    table = {f"{model}/{w:g}": rule_metrics(per_query, ScoreRule(model, w))
             for w in COARSE_WEIGHTS for model in scores}

    def mean(key: str) -> float:
        return sum(table[key].values()) / len(table[key])

    model = max(scores, key=lambda s: mean(f"{s}/0") + 1e-9 * (len(scores) - scores.index(s)))  # ties: list order
    weight = max(COARSE_WEIGHTS, key=lambda w: mean(f"{model}/{w:g}") - 1e-9 * w)  # ties: the smaller weight
    return ScoreRule(model, weight), table


def fit_checkpoint(index_dir, checkpoint: str, annotations: list[dict], device: str = "auto") -> dict:
    """Fit the rule for ``checkpoint`` on ``annotations`` (validation queries of ``index_dir``) and store it in
    the checkpoint (model_config.extra["score_rule"]). Returns what was stored."""
    return fit_checkpoint_sets(checkpoint, [(index_dir, annotations)], device)


def fit_checkpoint_sets(checkpoint: str, query_sets, device: str = "auto") -> dict:
    """``fit_checkpoint`` on several (index dir, validation annotations) pairs pooled into one fit."""
    # lazy: torch, for fitting a checkpoint; rule_metrics needs none
    from model.inference.checkpoint import read_checkpoint, write_checkpoint

    per_query = []
    for index_dir, annotations in query_sets:
        with SearchEngine(index_dir, checkpoint=checkpoint, device=device) as engine:
            per_query += rerank_queries(engine, annotations)
    rule, table = fit_rule(per_query)
    chosen = table[f"{rule.model}/{rule.coarse_weight:g}"]
    own = table[f"{rule.model}/0"]
    stored = {**rule.to_dict(), "fit_on_queries": len(per_query), "val": chosen, "val_model_only": own}
    ckpt = read_checkpoint(checkpoint)
    ckpt["model_config"].setdefault("extra", {})["score_rule"] = stored
    write_checkpoint(ckpt, checkpoint)
    return stored


def describe_fit(stored: dict) -> str:
    v = stored["val"]
    return (f"ranking rule fit on {stored['fit_on_queries']} validation queries: {stored['model']} + "
            f"{stored['coarse_weight']:g} x coarse cosine (VCMR R1@0.5 {v['VCMR_R1@0.5']:.1f}, R1@0.7 "
            f"{v['VCMR_R1@0.7']:.1f}, R5@0.5 {v['VCMR_R5@0.5']:.1f}); stored in the checkpoint")
