"""Negative windows (issue 9): a tiny model trained with them ranks the moment's window above an unrelated video's
window, one trained without them does not; the criterion takes batches of negatives; training on an index draws
negatives from other videos (random and coarse-ranked) and from outside the moment; labels' rejected hits become
negatives; a converted authors' checkpoint reranks each window independently of its batch companions."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from providers import ArrayProvider
from shared_data import SHARED_DATA
from test_train import TINY
from model.config import ModelConfig
from model.training.criterion import build_criterion
from model.data.dataset import MomentDataset
from model.net.llmepet import build_model
from model.data.negatives import NegativeSampler
from model.data.sample import DataConfig, collate
from model.training.settings import TrainConfig, negative_ratio, relevance_weight
from model.training.train import Trainer
from retriever.rerank import Reranker
from retriever.windows import Window

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GOLDEN = SHARED_DATA / "authors_golden"


def distinct_world(n=8, held_out=4, n_clips=20, dim=16, seed=0):
    """Videos whose moment carries a prototype of its own (no two videos share one); the last ``held_out`` are
    never trained on: the unrelated videos of the ranking test."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(n + held_out, dim))
    videos, texts, anns = {}, {}, []
    for i in range(n + held_out):
        feats = rng.normal(size=(n_clips, dim)) * 0.5
        s = int(rng.integers(0, n_clips - 6))
        e = s + int(rng.integers(3, 6))
        feats[s:e] += 2 * protos[i]
        videos[f"v{i}"] = feats.astype(np.float32)
        texts[f"q{i}"] = (np.stack([protos[i]] * 2) + rng.normal(size=(2, dim)) * 0.1).astype(np.float32)
        anns.append({"qid": i, "query": f"q{i}", "vid": f"v{i}", "duration": 2 * n_clips,
                     "relevant_windows": [[2 * s, 2 * e]]})
    return ArrayProvider(videos, texts, dim, dim, clip_model="test"), anns[:n], anns[n:]


def _whole_window(provider, vid: str) -> Window:
    feats = provider.videos[vid]
    return Window(0, vid, 2.0 * len(feats), 0, len(feats), 2.0, feats=feats,
                  clip_scores=np.zeros(len(feats), np.float32))


def _train_and_score(neg_ratio: float, tmp_path, score=lambda m: m.confidence, **model_overrides):
    """Train a tiny model (fixed seed); per (query, held-out video): the best moment's ``score`` (default: the
    confidence) in the query's own video and in the unrelated one, through the rerank stage search uses."""
    torch.manual_seed(0)
    provider, anns, held_out = distinct_world()
    cfg = ModelConfig(txt_dim=16, vid_dim=18, input_dropout=0.0, dropout=0.0, vid_has_window_suffix=False,
                      **{**TINY, **model_overrides})
    model = build_model(cfg)
    data_cfg = DataConfig()
    tcfg = TrainConfig(bsz=8, eval_bsz=8, lr=3e-3, lr_drop=60, n_epoch=40, eval_epoch=40, grad_clip=1.0, seed=0,
                       progress=False)
    ds = MomentDataset(anns, provider, data_cfg, seed=0, neg_ratio=neg_ratio)
    Trainer(model, build_criterion(cfg), ds, None, provider, data_cfg, tcfg, "custom", provider.feature_spec(),
            str(tmp_path / f"m{neg_ratio}.pt"), torch.device("cpu")).fit()
    reranker = Reranker(model, data_cfg, provider.feature_spec(), torch.device("cpu"))
    own, other = [], []
    for a in anns:
        text = provider.texts[a["query"]]
        best_own = max(score(m) for m in reranker.moments([_whole_window(provider, a["vid"])], text))
        for h in held_out:
            own.append(best_own)
            other.append(max(score(m) for m in reranker.moments([_whole_window(provider, h["vid"])], text)))
    return np.array(own), np.array(other)


@pytest.mark.slow
def test_negatives_make_the_moment_window_outscore_an_unrelated_video(tmp_path):
    own, other = _train_and_score(1.0, tmp_path)
    assert np.mean(own > other + 0.1) >= 0.9, (own, other)  # by a margin, on (nearly) every pair
    assert own.mean() - other.mean() > 0.3
    # the same model, data and seed without negatives: an unrelated window gets a confident moment too
    own0, other0 = _train_and_score(0.0, tmp_path)
    assert np.mean(own0 > other0 + 0.1) < 0.5, (own0, other0)
    assert own0.mean() - other0.mean() < 0.15


@pytest.mark.slow
def test_relevance_head_scores_the_moment_above_an_unrelated_video(tmp_path):
    """The relevance head (model.net.llmepet.RelevanceHead) trained with negatives: the moment's span relevance beats
    the best span of a never-seen video by a margin; its rules rank by it; a model without the head has none."""
    from retriever.merge import ScoreRule

    own, other = _train_and_score(1.0, tmp_path, score=lambda m: m.span_relevance, relevance_coef=1.0)
    assert np.mean(own > other + 0.2) >= 0.9, (own, other)
    assert own.mean() > 0.5 > other.mean()
    m = Reranker(build_model(ModelConfig(txt_dim=16, vid_dim=18, vid_has_window_suffix=False, **TINY)), DataConfig(),
                 distinct_world()[0].feature_spec(), torch.device("cpu"))
    provider = distinct_world()[0]
    plain = m.moments([_whole_window(provider, "v0")], provider.texts["q0"])
    assert plain and all(x.span_relevance is None for x in plain)
    with pytest.raises(ValueError, match="relevance head"):
        ScoreRule("relevance").score(plain[0])


def test_criterion_takes_negative_windows_alone_and_mixed():
    torch.manual_seed(0)
    provider, anns, _ = distinct_world()
    ds = MomentDataset(anns, provider, DataConfig(), seed=0, neg_ratio=1.0)
    assert len(ds) == 2 * len(anns)
    cfg = ModelConfig(txt_dim=16, vid_dim=18, vid_has_window_suffix=False, **TINY)
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    for items in ([ds[i] for i in range(len(ds))], [ds[i] for i in range(len(anns), len(ds))]):
        batch = collate(items)
        outputs = model(**batch["inputs"], targets=batch["targets"], vid=[m["vid"] for m in batch["meta"]])
        losses = criterion(outputs, batch["targets"])
        total = criterion.total(losses)
        assert torch.isfinite(total), losses
        total.backward()
    # negatives only: nothing to regress, every query background
    assert float(losses["loss_span"].detach()) == 0.0 and float(losses["loss_label"].detach()) > 0
    assert bool(batch["targets"]["negative"].all())


def test_index_training_negatives_come_from_other_videos_and_outside_the_moment(tmp_path):
    """`vmr train --index`: the dataset's negative items, drawn over an epoch, come from every source: other
    videos at random, other videos the coarse stage ranks high, the query's own video away from its moment."""
    import world
    from retriever.provider import IndexFeatureProvider
    from world.generator import build_world
    from world.synthetic import write_library
    from model.inference.features import ClipEncoder

    videos, rows = build_world(tmp_path, n_videos=8, seed=3, long_videos=1, write=False)
    encoder = ClipEncoder.load(str(world.WORLD_CLIP_CONFIG), str(world.WORLD_CLIP_WEIGHTS), device="cpu")
    write_library(tmp_path / "index", videos, encoder, seed=3)
    provider = IndexFeatureProvider(tmp_path / "index", encoder=encoder)
    ratio, why = negative_ratio(TrainConfig(), "custom", public_features=False)
    assert ratio == 1.0 and "default" in why
    # the relevance head comes with the negatives unless set; public presets (no negatives) get none
    assert relevance_weight({}, ratio)[0] == 1.0 and relevance_weight({}, 0.0)[0] == 0.0
    assert relevance_weight({"relevance_coef": 0.0}, ratio) == (0.0, "set by relevance_coef")
    assert negative_ratio(TrainConfig(), "qvhighlights", public_features=True)[0] == 0.0
    ds = MomentDataset(rows, provider, DataConfig(), seed=0, neg_ratio=ratio)
    # built once: features and every query's hard windows are in memory, so an epoch opens no DuckDB connection
    # (per-item opens, ~40 ms each, made the world reranker's epochs 5x slower)
    import store.db

    def no_connect(*args, **kwargs):
        raise AssertionError("an epoch read the index")

    real_connect, store.db.connect = store.db.connect, no_connect
    try:
        negatives = [ds[i] for i in range(len(rows), len(ds))]
        positives = [ds[i] for i in range(len(rows))]
    finally:
        store.db.connect = real_connect
    assert len(positives) == len(rows)
    assert set(ds.negatives._hard_cache) == {r["query"] for r in rows}
    assert len(negatives) == len(rows)
    seen = set()
    clip = DataConfig().clip_length
    for item in negatives:
        meta = item["meta"]
        ann = rows[meta["ann_index"]]
        seen.add(meta["negative"])
        assert meta["vid"] == ann["vid"] and meta["query"] == ann["query"]
        assert len(item["labels"]["spans"]) == 0 and not item["labels"]["saliency_all"].any()
        a, b = meta["window"]
        assert len(item["video"]) == b - a and b - a <= DataConfig().max_v_l
        if meta["negative"] in ("other", "hard"):
            assert meta["window_vid"] != ann["vid"]
            assert provider.library.resolve_vid(meta["window_vid"]) != provider.library.resolve_vid(ann["vid"])
        else:  # the query's own video, clear of every relevant window
            assert meta["window_vid"] == ann["vid"]
            for st, ed in ann["relevant_windows"]:
                assert b * clip <= st or a * clip >= ed, (meta, ann["relevant_windows"])
    assert {"other", "hard", "same"} <= seen, seen
    # hard negatives are the coarse stage's best windows of other videos for the query
    hard = ds.negatives.hard_windows(rows[0])
    assert hard and all(provider.library.resolve_vid(v) != provider.library.resolve_vid(rows[0]["vid"])
                        for v, _, _ in hard)


def test_rejected_hits_from_labels_become_negative_windows():
    provider, anns, _ = distinct_world(n=2, held_out=0, n_clips=60)
    ann = dict(anns[0], relevant_windows=[[20.0, 30.0]], negative_windows=[[80.0, 90.0]])
    sampler = NegativeSampler([ann], provider, lambda v: len(provider.videos[v]), v_limit=20, clip_length=2.0,
                              sources=["labels"])
    import random

    for seed in range(5):
        source, vid, a, b = sampler.sample(ann, random.Random(seed))
        assert source == "labels" and vid == ann["vid"]
        assert a * 2.0 <= 80.0 and b * 2.0 >= 90.0  # holds the rejected hit
        assert a * 2.0 >= 32.0  # clear of the relevant window (one clip of margin)
    assert sampler.sample(dict(ann, negative_windows=[]), random.Random(0)) is None


@pytest.mark.skipif(not (GOLDEN / "ref_ckpt.pth").is_file(), reason="authors_golden/ not present")
def test_converted_checkpoint_reranks_each_window_whatever_its_companions(tmp_path):
    """compat 'authors' attends across the batch (the cross-sample T2V mask reads other samples' padding):
    search runs such a checkpoint one window at a time, so a window's moments do not depend on its companions."""
    from click.testing import CliRunner
    from cli import main
    from model.data.providers import PublicFeatureDir

    out = tmp_path / "converted.pt"
    res = CliRunner().invoke(main, ["convert-checkpoint", str(GOLDEN / "ref_ckpt.pth"), str(out)])
    assert res.exit_code == 0, res.output
    reranker = Reranker.load(str(out), device="cpu")
    assert reranker.batch_size == 1
    features = PublicFeatureDir(str(GOLDEN / "features"))
    anns = [json.loads(line) for line in open(GOLDEN / "ann.jsonl")]
    text = features.text_features_for_qid(anns[0]["qid"])

    def window(i, n):
        feats = features.video_features(anns[i]["vid"])[:n]
        return Window(i, anns[i]["vid"], 2.0 * len(feats), 0, len(feats), 2.0, feats=feats,
                      clip_scores=np.zeros(len(feats), np.float32))

    def key(moments):
        return [(m.video_id, m.start, m.end, round(m.confidence, 6), round(m.span_saliency, 6)) for m in moments]

    target = window(0, 60)
    alone = key(reranker.moments([target], text))
    companions = [[target, window(1, 75)], [window(2, 20), target, window(3, 45)], [target] + [window(4, 75)] * 5]
    for batch in companions:
        assert key([m for m in reranker.moments(batch, text) if m.video_id == 0]) == alone


def test_authors_compat_with_llm_blocks_would_mix_batch_companions_but_search_does_not():
    """The golden checkpoint has no LLM blocks; with them, compat 'authors' mixes the samples of a batch at each
    time step. Reranking one window at a time keeps a window's answer its own; batched, it changes."""
    torch.manual_seed(0)
    provider, anns, _ = distinct_world(n=4, held_out=0)
    cfg = ModelConfig(txt_dim=16, vid_dim=18, vid_has_window_suffix=False, compat="authors", **TINY)
    reranker = Reranker(build_model(cfg), DataConfig(), provider.feature_spec(), torch.device("cpu"))
    assert reranker.batch_size == 1
    text = provider.texts[anns[0]["query"]]
    windows = [_whole_window(provider, a["vid"]) for a in anns]
    for i, w in enumerate(windows):
        w.video_id = i

    def key(moments):
        return [(m.start, m.end, round(m.confidence, 5)) for m in moments if m.video_id == 0]

    alone = key(reranker.moments(windows[:1], text))
    assert key(reranker.moments(windows, text)) == alone
    assert key(reranker.moments(windows[:1] + windows[2:], text)) == alone
    reranker.batch_size = 8  # what a 'vmr' checkpoint does
    assert key(reranker.moments(windows, text)) != alone


def test_train_on_index_labels_uses_rejected_hits_as_negatives(tmp_path, monkeypatch):
    """`vmr train --index IDX --labels`: labels stored in the index (accepted moments, rejected hits, written by
    store.labels as `vmr serve` does) train the model; the rejected hits are drawn as negative windows and the
    checkpoint records the source."""
    from click.testing import CliRunner

    import world
    from cli import main
    from model.inference.checkpoint import read_checkpoint
    from model.inference.features import ClipEncoder
    from model.data.negatives import _gaps, _relevant_clips
    from store.labels import add_label, write_connection
    from store.library import Library
    from world.generator import build_world
    from world.synthetic import write_library

    videos, rows = build_world(tmp_path, n_videos=6, seed=5, long_videos=0, write=False)
    encoder = ClipEncoder.load(str(world.WORLD_CLIP_CONFIG), str(world.WORLD_CLIP_WEIGHTS), device="cpu")
    index = tmp_path / "index"
    write_library(index, videos, encoder, seed=5)
    with Library(index) as lib:
        ids = {r["vid"]: lib.resolve_vid(r["vid"]) for r in rows}
    rejected = 0
    con = write_connection(index)
    try:
        for r in rows[:8]:
            (st, ed), = [w[:2] for w in r["relevant_windows"][:1]]
            add_label(con, ids[r["vid"]], r["query"], st, ed, "accept")
            n = int(r["duration"] // 2)
            gap = max(_gaps(n, _relevant_clips(r, 2.0)), key=lambda g: g[1] - g[0])
            if gap[1] - gap[0] >= 4:  # a hit the person rejected: clear of the moment
                add_label(con, ids[r["vid"]], r["query"], 2.0 * gap[0], 2.0 * (gap[0] + 3), "reject")
                rejected += 1
    finally:
        con.close()
    assert rejected >= 3
    drawn = []
    sample = NegativeSampler.sample

    def spy(self, ann, rng):
        got = sample(self, ann, rng)
        drawn.append((got, ann))
        return got

    monkeypatch.setattr(NegativeSampler, "sample", spy)
    out = tmp_path / "labels.pt"
    res = CliRunner().invoke(main, [
        "train", "--index", str(index), "--labels", "--out", str(out), "--dataset", "custom", "--device", "cpu",
        "--config", str(world.WORLD_DIR / "world_reranker.json"), "--set", "n_epoch=2", "--set", "eval_epoch=1",
        "--set", "bsz=4", "--set", "neg_sources=labels", "--set", "progress=false"])
    assert res.exit_code == 0, res.output
    assert "labels: 8 training records" in res.output and "from labels" in res.output
    exported = [json.loads(line) for line in open(f"{out}.labels.jsonl")]
    assert sum(bool(r["negative_windows"]) for r in exported) == rejected
    used = [(got, ann) for got, ann in drawn if got is not None]
    assert len(used) == 2 * rejected  # each epoch: one negative per record that has a rejected hit
    for (source, vid, a, b), ann in used:
        assert source == "labels" and vid == ann["vid"]
        (rs, re_), = ann["negative_windows"]
        assert a * 2.0 <= rs < re_ <= b * 2.0  # the window holds the rejected hit
        for st, ed in ann["relevant_windows"]:
            assert b * 2.0 <= st or a * 2.0 >= ed  # and none of the moment
    assert read_checkpoint(str(out))["model_config"]["extra"]["negatives"]["sources"] == ["labels"]
