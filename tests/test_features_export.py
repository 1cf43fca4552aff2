"""`vmr features export` and the authors' SlowFast + CLIP checkpoints on a user's library, end to end.

One library of generated videos is indexed the normal way (`run_ingest`, the session's Ray) with a tiny random
CLIP of the public features' width (512); each video then gets SlowFast-shaped vectors (2304-d, fp16, a row more
than its clips, as the extractor's padding gives) through ``Library.commit_features``, as the ingest stores that
kind. A copy taken before holds CLIP only. The reranker is a paper-shape authors' checkpoint (SlowFast 2304 + CLIP
512 + TEF; small blocks otherwise, one random 256-d LLaMA block) laid out as their train.py saves it ({"model",
"opt": argparse.Namespace, "epoch"}, their parameter names), converted with `vmr convert-checkpoint`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from tests.test_convert import authors_opt, authors_state
from world.videos import make_video

SLOWFAST_DIM, CLIP_DIM, TEXT_WIDTH = 2304, 512, 32
TINY_CLIP_512 = {"embed_dim": CLIP_DIM,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 2, "layers": 1}}
VIDEOS = {"alpha.mp4": 8.0, "beta.mp4": 12.0, "sub/gamma.mp4": 6.0}
QUERY = "a red circle on the left"
SLOWFAST_RECORD = {"dim": SLOWFAST_DIM, "dtype": "float16", "model": "slowfast_r50 (test vectors)", "weights": "none",
                   "precision": "fp32", "frames": "random rows, one more than the clips"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def library(tmp_path_factory, ray_session):
    """(root, index with clip + slowfast, index with clip only, {video id: stored slowfast f16 [n + 1, 2304]})."""
    from indexer.ingest import run_ingest
    from model.inference.features import ClipEncoder
    from store.library import Library

    root = tmp_path_factory.mktemp("sfexport")
    config = root / "clip512.json"
    config.write_text(json.dumps(TINY_CLIP_512))
    torch.manual_seed(0)
    torch.save(ClipEncoder.load(str(config), None, device="cpu", allow_random=True).model.state_dict(),
               root / "clip512.pt")
    for i, (path, duration) in enumerate(VIDEOS.items()):
        (root / "videos" / path).parent.mkdir(parents=True, exist_ok=True)
        make_video(root / "videos" / path, duration=duration, scene_seconds=2.0 + i)
    summary = run_ingest(str(root / "videos"), str(root / "clip_only"), clip_model=str(config),
                         clip_pretrained=str(root / "clip512.pt"), device="cpu", progress=False)
    assert not summary.failed
    shutil.copytree(root / "clip_only", root / "index")
    rng = np.random.default_rng(0)
    slowfast = {}
    with Library(root / "index", read_only=False) as lib:
        for video in lib.videos(status="indexed"):
            rows = 5 * rng.standard_normal((video["n_clips"] + 1, SLOWFAST_DIM))
            slowfast[video["id"]] = rows.astype(np.float16)
            lib.commit_features(video["id"], "slowfast", slowfast[video["id"]], SLOWFAST_RECORD)
    return root, root / "index", root / "clip_only", slowfast


@pytest.fixture(scope="module")
def exported(library):
    """The index exported with the annotations of one query per video (vids as the index names them)."""
    root, index, _, _ = library
    ann = root / "ann.jsonl"
    ann.write_text("".join(json.dumps({"qid": i, "query": QUERY, "vid": path, "duration": duration,
                                       "relevant_windows": [[0, 4]]}) + "\n"
                           for i, (path, duration) in enumerate(VIDEOS.items())))
    before = hashlib.sha256((index / "library.duckdb").read_bytes()).hexdigest()
    result = invoke("features", "export", "--index", index, "--kinds", "slowfast,clip", "--out", root / "public",
                    "--annotations", ann, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "wrote slowfast, clip features of 3 videos and text features of 3 queries" in result.stdout
    assert hashlib.sha256((index / "library.duckdb").read_bytes()).hexdigest() == before  # nothing changed
    return root / "public"


@pytest.fixture(scope="module")
def converted(library):
    """A paper-shape authors' checkpoint reading [slowfast 2304 | clip 512], converted for the index's CLIP."""
    from model.config import ModelConfig
    from model.net.llmepet import LLMEPET
    from store.library import Library

    root, index, _, _ = library
    cfg = ModelConfig(llm="", llm_dim=256, llm_heads=2, llm_kv_heads=2, llm_ffn_dim=64, llm_layers="14:15",
                      hidden_dim=32, nheads=4, dim_feedforward=48, num_dummies=3, total_prompts=4, num_prompts=2,
                      num_queries=5, enc_layers=2, dec_layers=2, t2v_layers=2, txt_dim=TEXT_WIDTH,
                      vid_dim=SLOWFAST_DIM + CLIP_DIM + 2, max_q_l=32, compat="authors")
    torch.manual_seed(0)
    model = LLMEPET(cfg).eval()
    with torch.no_grad():
        for p in model.llm.blocks.parameters():
            p.normal_(0, 0.05)
    opt = argparse.Namespace(**{**vars(authors_opt()), "max_q_l": 32, "v_feat_dirs": [
        "features/qvhighlights/slowfast_features", "features/qvhighlights/clip_features"]})
    torch.save({"model": authors_state(model), "opt": opt, "epoch": 0}, root / "theirs.ckpt")
    with Library(index) as lib:
        clip_model = lib.meta()["clip_model"]
    result = invoke("convert-checkpoint", root / "theirs.ckpt", root / "converted.pt", "--clip-model", clip_model)
    assert result.exit_code == 0, result.output
    return root / "converted.pt"


def test_export_writes_the_public_layout_as_stored(library, exported):
    from store.library import Library

    _, index, _, slowfast = library
    rows = [json.loads(line) for line in (exported / "videos.jsonl").read_text().splitlines()]
    assert [r["vid"] for r in rows] == ["alpha", "beta", "gamma"]
    assert [r["path"] for r in rows] == list(VIDEOS)
    with Library(index) as lib:
        for row in rows:
            video = lib.video(row["video_id"])
            assert (row["duration"], row["n_clips"]) == (video["duration"], video["n_clips"])
            assert row["rows"] == {"slowfast": video["n_clips"] + 1, "clip": video["n_clips"]}
            with np.load(exported / "slowfast_features" / f"{row['vid']}.npz") as z:
                assert z.files == ["features"] and z["features"].dtype == np.float32
                np.testing.assert_array_equal(z["features"], slowfast[row["video_id"]].astype(np.float32))
            with np.load(exported / "clip_features" / f"{row['vid']}.npz") as z:
                np.testing.assert_array_equal(z["features"], lib.clip_embeddings(row["video_id"]))
    spec = json.loads((exported / "feature_spec.json").read_text())
    assert spec["video_kinds"] == ["slowfast", "clip"] and spec["video_dims"] == [SLOWFAST_DIM, CLIP_DIM]
    anns = [json.loads(line) for line in (exported / "ann.jsonl").read_text().splitlines()]
    assert [a["vid"] for a in anns] == ["alpha", "beta", "gamma"]  # the index's names -> the exported ones
    with np.load(exported / "clip_text_features" / "qid2.npz") as z:
        assert z["last_hidden_state"].shape[1] == TEXT_WIDTH


def test_export_refuses_a_missing_kind_a_full_folder_and_a_shared_name(library, exported, tmp_path):
    root, index, clip_only, _ = library
    line = one_error_line(invoke("features", "export", "--index", clip_only, "--kinds", "slowfast,clip", "--out",
                                 tmp_path / "x"))
    assert "'slowfast'" in line and "`vmr index DIR --index IDX --features clip,slowfast`" in line
    assert not (tmp_path / "x").exists()
    line = one_error_line(invoke("features", "export", "--index", index, "--kinds", "clip,audio", "--out",
                                 tmp_path / "x"))
    assert "--kinds audio" in line and "holds: slowfast, clip" in line

    copy = tmp_path / "again"
    shutil.copytree(exported, copy)
    line = one_error_line(invoke("features", "export", "--index", index, "--out", copy))
    assert str(copy) in line and "--overwrite" in line
    # --overwrite: the export replaces the folder's feature files (a stray one of an earlier export goes)
    (copy / "clip_features" / "gone.npz").write_bytes(b"old")
    result = invoke("features", "export", "--index", index, "--kinds", "clip", "--out", copy, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (copy / "clip_features").iterdir()) == ["alpha.npz", "beta.npz", "gamma.npz"]
    assert not list((copy / "slowfast_features").iterdir()) and not list((copy / "clip_text_features").iterdir())

    from retriever.public_features import public_names
    from store.errors import VmrError

    with pytest.raises(VmrError, match="a/clip.mp4 and b/clip.mkv are both named 'clip'"):
        public_names([{"id": 1, "path": "a/clip.mp4"}, {"id": 2, "path": "b/clip.mkv"}])


def test_search_input_equals_what_predict_reads_from_the_export(library, exported, converted):
    """On each video, the reranker's input for a window (retriever side: with_inputs + the sample) is what
    `vmr predict --features` builds from the exported files for that window: the checkpoint's kinds in its
    order and widths, each L2-normalised, the TEF of the window; and the query's tokens alike."""
    from model.data.dataset import MomentDataset
    from model.data.sample import text_input
    from model.inference.checkpoint import data_config_of, read_checkpoint
    from model.inference.predict import make_provider
    from retriever.search import SearchEngine

    _, index, _, _ = library
    data_cfg = data_config_of(read_checkpoint(str(converted)))
    provider = make_provider(str(exported), data_cfg, None)
    assert provider.feature_spec()["video_kinds"] == ["slowfast", "clip"]
    assert provider.feature_spec()["video_dims"] == [SLOWFAST_DIM, CLIP_DIM]
    anns = {a["vid"]: a for a in map(json.loads, (exported / "ann.jsonl").read_text().splitlines())}
    with SearchEngine(index, checkpoint=str(converted), device="cpu", precision="fp32") as engine:
        reranker = engine.reranker
        assert reranker.video_kinds == ["slowfast", "clip"] and reranker.spec["video_dims"] == [2304, 512]
        pooled, tokens = engine.encode_query(QUERY)
        windows = engine.candidates(pooled)
        ready, unread = reranker.with_inputs(engine.library, windows, "clip")
        assert not unread and {w.path for w in ready} == set(VIDEOS)
        text = text_input(tokens, reranker.data_cfg)
        for window in ready:
            ours = reranker._item(window, text)
            vid = window.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            theirs = MomentDataset([anns[vid]], provider, data_cfg, load_labels=False,
                                   windows=[(0, window.first_clip, window.last_clip)])[0]
            assert ours["video"].shape == (window.last_clip - window.first_clip, SLOWFAST_DIM + CLIP_DIM + 2)
            torch.testing.assert_close(ours["video"], theirs["video"], rtol=0, atol=0)
            norms = ours["video"][:, :SLOWFAST_DIM].norm(dim=1)
            torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)
            torch.testing.assert_close(ours["text"], theirs["text"], rtol=0, atol=1e-6)


def test_authors_checkpoint_reranks_every_hit_and_needs_slowfast(library, converted):
    _, index, clip_only, _ = library
    result = invoke("search", QUERY, "--index", index, "--checkpoint", converted, "--json", "--rerank-budget", "0",
                    "--device", "cpu", "--precision", "fp32", "--top-k", "5")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert hits and all(h["reranked"] and h["confidence"] is not None for h in hits)
    line = one_error_line(invoke("search", QUERY, "--index", clip_only, "--checkpoint", converted, "--device", "cpu"))
    assert "'slowfast'" in line and "`vmr index DIR --index IDX --features clip,slowfast`" in line


def test_train_and_predict_on_exported_features(exported, tmp_path):
    """`vmr train --features` takes the export as it takes the public release; the checkpoint reads its kinds."""
    from model.inference.checkpoint import read_checkpoint

    tiny = dict(hidden_dim=16, nheads=2, dim_feedforward=32, enc_layers=1, dec_layers=1, t2v_layers=1,
                dummy_layers=1, moment_layers=1, sent_layers=1, num_dummies=2, total_prompts=2, num_queries=3,
                bsz=3, eval_bsz=3, n_epoch=1, eval_epoch=1, progress=False)
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    ann = exported / "ann.jsonl"
    result = invoke("train", "--train", ann, "--val", ann, "--features", exported, "--dataset", "custom",
                    "--llm-layers", "0:0", "--config", tmp_path / "tiny.json", "--out", tmp_path / "r.pt",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    spec = read_checkpoint(str(tmp_path / "r.pt"))["feature_spec"]
    assert spec["video_kinds"] == ["slowfast", "clip"] and spec["video_dims"] == [SLOWFAST_DIM, CLIP_DIM]
    assert spec["clip_model"] == json.loads((exported / "feature_spec.json").read_text())["clip_model"]
    result = invoke("predict", "--checkpoint", tmp_path / "r.pt", "--features", exported, "--annotations", ann,
                    "--out", tmp_path / "pred.jsonl", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "pred.jsonl").read_text().splitlines()) == 3
