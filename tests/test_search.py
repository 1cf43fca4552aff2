"""Library search end to end on the test world: real videos, real ingest (Ray), the world CLIP and reranker."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_RERANKER
from world.generator import build_world
from store.errors import VmrError

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not WORLD_RERANKER.is_file(), reason="world reranker not trained")]


@pytest.fixture(scope="module")
def world_index(tmp_path_factory, ray_session):
    from indexer.ingest import run_ingest

    root = tmp_path_factory.mktemp("search_world")
    videos, rows = build_world(root, n_videos=6, seed=5, long_videos=1, long_duration=600)
    summary = run_ingest(str(root / "videos"), str(root / "index"), clip_model=str(WORLD_CLIP_CONFIG),
                         clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", progress=False)
    assert not summary.failed
    return root, videos, rows


@pytest.fixture(scope="module")
def engine(world_index):
    from retriever.search import SearchEngine

    with SearchEngine(world_index[0] / "index", checkpoint=str(WORLD_RERANKER), device="cpu") as eng:
        yield eng


@pytest.fixture(scope="module")
def metrics(engine, world_index):
    from world.corpus import engine_metrics

    rows = world_index[2]
    return {mode: engine_metrics(engine, rows, mode) for mode in ("coarse", "rerank")}


def test_right_video_in_coarse_top_k(metrics):
    assert metrics["coarse"]["video_R@5"] >= 90.0
    assert metrics["coarse"]["video_R@1"] >= 60.0


def test_rerank_improves_vcmr_r1_over_coarse(metrics):
    coarse, rerank = metrics["coarse"], metrics["rerank"]
    assert rerank["VCMR_R1@0.7"] > coarse["VCMR_R1@0.7"]
    assert rerank["VCMR_R1@0.5"] >= coarse["VCMR_R1@0.5"]


def test_search_result_carries_stage_timings_and_window_videos(engine, world_index):
    row = world_index[2][0]
    result = engine.search(row["query"], top_k=3)
    assert set(result.timings) >= {"text_encode", "coarse", "windows", "rerank", "merge", "total"}
    assert all(v >= 0 for v in result.timings.values()) and result.timings["rerank"] > 0
    assert result.timings["total"] >= sum(v for k, v in result.timings.items() if k != "total") * 0.99
    assert result.moments and {m["video_id"] for m in result.moments} <= set(result.window_videos)
    assert engine.search(row["query"], top_k=3, rerank=False).timings["rerank"] == 0.0


def test_rerank_time_budget(engine, world_index):
    """The default budget reranks every candidate window of the world reranker (cheap windows: nothing changes);
    a budget smaller than one window reranks one, the best coarse window, and fills top_k with the other windows'
    coarse moments ranked below every reranked one."""
    from retriever.search import RERANK_BUDGET_S

    query = world_index[2][1]["query"]
    assert engine.rerank_budget_s == RERANK_BUDGET_S
    default = engine.search(query, top_k=10)
    assert default.rerank_depth["reranked"] == default.rerank_depth["windows"] > 1
    assert default.rerank_depth["budget_s"] == RERANK_BUDGET_S and default.rerank_depth["batch_s"] > 0
    engine.rerank_budget_s = None
    try:
        unlimited = engine.search(query, top_k=10)
        engine.rerank_budget_s = 1e-9
        tight = engine.search(query, top_k=10)
    finally:
        engine.rerank_budget_s = RERANK_BUDGET_S
    assert unlimited.moments == default.moments
    assert tight.rerank_depth["reranked"] == 1
    flags = [m["reranked"] for m in tight.moments]
    assert len(flags) == 10 and flags[0] and not flags[-1] and flags == sorted(flags, reverse=True)
    best = engine.candidates(engine.encode_query(query)[0])[0]
    assert all(m["video_id"] == best.video_id and best.start - 1e-3 <= m["start"] <= m["end"] <= best.end + 1e-3
               for m in tight.moments if m["reranked"])


def test_rerank_time_estimate_is_an_upper_bound_from_measured_forwards():
    from retriever.rerank import Reranker

    reranker = Reranker.__new__(Reranker)
    reranker.forward_seconds = {}
    assert reranker.estimate_seconds(4) is None
    reranker.forward_seconds = {4: 2.0, 1: 1.2}  # a forward streams the weights once: 4 windows cost < 4 x 1
    assert [reranker.estimate_seconds(n) for n in (1, 2, 3, 4, 8)] == [1.2, 2.0, 2.0, 2.0, 4.0]


@pytest.mark.slow
def test_bench_pruned_baseline_equals_full_baseline(world_index, tmp_path):
    """The benchmark's pruned exhaustive baseline returns exactly the full one's top-10 while reranking fewer
    windows (checked by bench itself, as a separate program: tests never import bench)."""
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(r) + "\n" for r in world_index[2][:4]))
    proc = subprocess.run([sys.executable, "-m", "bench.baselines", str(world_index[0] / "index"),
                           "--checkpoint", str(WORLD_RERANKER), "--queries", str(queries), "--limit", "4"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "identical on 4 queries" in proc.stdout


def test_moments_in_10_minute_video_found_past_150s(engine, world_index):
    rows = [r for r in world_index[2] if "long" in r["vid"]]
    assert rows
    found = 0
    for row in rows:
        st, ed = row["relevant_windows"][0]
        for r in engine.search(row["query"], top_k=5).moments:
            inter = min(r["end"], ed) - max(r["start"], st)
            if "long" in r["path"] and r["start"] >= 150 and inter / (max(r["end"], ed) - min(r["start"], st)) >= 0.5:
                found += 1
                break
    assert found >= len(rows) - 1 and found >= 1


def test_json_output_fields_and_cli(world_index):
    from cli import main

    res = CliRunner().invoke(main, ["search", world_index[2][0]["query"], "--index", str(world_index[0] / "index"),
                                    "--checkpoint", str(WORLD_RERANKER), "--top-k", "3", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert 1 <= len(out) <= 3
    for r in out:
        assert {"path", "video_id", "start", "end", "score", "coarse_score", "saliency"} <= set(r)
        assert isinstance(r["start"], float) and r["start"] < r["end"] and r["reranked"] is True
    assert [r["score"] for r in out] == sorted((r["score"] for r in out), reverse=True)
    table = CliRunner().invoke(main, ["search", "a red circle", "--index", str(world_index[0] / "index"),
                                      "--no-rerank"])
    assert table.exit_code == 0 and "not reranked" in table.output
    empty = CliRunner().invoke(main, ["search", "   ", "--index", str(world_index[0] / "index")])
    assert empty.exit_code == 2 and "empty" in empty.output


def test_bad_queries_and_indexes(world_index, tmp_path, caplog):
    from retriever.search import search_library

    index = world_index[0] / "index"
    with pytest.raises(VmrError, match="empty"):
        search_library(" \n", index, checkpoint=str(WORLD_RERANKER))
    with caplog.at_level(logging.WARNING, logger="vmr.search"):
        out = search_library("a red circle appears on the left " * 10, index, checkpoint=str(WORLD_RERANKER),
                             device="cpu").moments
    assert out and any("CLIP reads only the first" in m for m in caplog.messages)
    assert search_library("ein rotes Quadrat ☺ 日本語 🚀", index, top_k=2, checkpoint=str(WORLD_RERANKER),
                          device="cpu").moments
    with pytest.raises(VmrError, match="no index"):
        search_library("a red circle", tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(index, corrupt)
    (corrupt / "library.duckdb").write_bytes(b"not a database" * 100)
    with pytest.raises(VmrError) as err:
        search_library("a red circle", corrupt)
    assert "\n" not in str(err.value)


def test_checkpoint_with_other_clip_is_refused(world_index, tmp_path):
    from retriever.search import search_library

    ckpt = torch.load(WORLD_RERANKER, map_location="cpu", weights_only=True)
    ckpt["feature_spec"]["clip_model"] = "ViT-B-32:openai"
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(VmrError, match="ViT-B-32:openai.*world_clip"):
        search_library("a red circle", world_index[0] / "index", checkpoint=str(other), device="cpu")


def test_no_checkpoint_falls_back_to_coarse_flagged(world_index, caplog):
    from retriever.search import search_library

    with caplog.at_level(logging.WARNING, logger="vmr.search"):
        out = search_library(world_index[2][0]["query"], world_index[0] / "index", top_k=3, checkpoint=None).moments
    assert out and all(r["reranked"] is False and r["confidence"] is None for r in out)
    assert any("coarse moments only" in m for m in caplog.messages)


@pytest.mark.slow
def test_query_during_ingest(world_index, tmp_path, ray_session):
    """A search against an index that a separate `vmr index` process is writing answers (or says the index is
    not ready yet) and never crashes; after the ingest it finds the right video. The ingest joins this session's
    Ray cluster (--ray-address), so it reuses its CLIP actor instead of starting a second Ray."""
    from retriever.search import search_library
    from store.library import wait_for_index

    src = world_index[0] / "videos"
    videos = tmp_path / "videos"
    videos.mkdir()
    for p in sorted(src.iterdir())[:2]:
        shutil.copy(p, videos / p.name)
    index = tmp_path / "index"
    proc = subprocess.Popen([sys.executable, "-m", "cli", "index", str(videos), "--index", str(index),
                             "--clip-model", str(WORLD_CLIP_CONFIG), "--clip-pretrained", str(WORLD_CLIP_WEIGHTS),
                             "--device", "cpu", "--workers", "1",
                             "--ray-address", ray_session.get_runtime_context().gcs_address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_index(index, timeout=120)
        answered = 0
        while proc.poll() is None:
            try:
                out = search_library("a red circle appears on the left", index, top_k=3, checkpoint=None).moments
                assert isinstance(out, list)
                answered += 1
            except VmrError as err:  # not finished being created yet: a clean one-line error
                assert "\n" not in str(err)
            time.sleep(0.2)
        assert proc.returncode == 0, proc.stdout.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert answered >= 1
    row = next(r for r in world_index[2] if (videos / f"{r['vid']}.mp4").exists())
    out = search_library(row["query"], index, top_k=5, checkpoint=str(WORLD_RERANKER), device="cpu").moments
    assert any(r["path"] == f"{row['vid']}.mp4" for r in out)
