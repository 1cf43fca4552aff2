"""`vmr index` / `vmr status` end to end on generated videos, with the session's local Ray and a tiny CLIP.

The tiny CLIP's random weights are saved as a local checkpoint file, so the CLI runs exactly as a user's would
(`--clip-pretrained PATH`), never with random weights of its own.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from shared_data import SHARED_DATA
from click.testing import CliRunner

from cli import main as cli_main
from indexer.ingest import run_ingest
from store import vectors
from store.errors import VmrError
from store.ids import LOCAL_BITS
from store.library import Library
from store.status import library_status
from world import CLIP_TINY_CONFIG, videos

ROOT = Path(__file__).resolve().parents[1]
TINY = str(CLIP_TINY_CONFIG)
REAL_VIDEO = SHARED_DATA / "real_video" / "charades.mp4"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from model.inference.features import ClipEncoder

    path = tmp_path_factory.mktemp("ckpt") / "clip_tiny.pt"
    torch.save(ClipEncoder.load(TINY, None, device="cpu", allow_random=True).model.state_dict(), path)
    return str(path)


def _index(video_dir, index_dir, checkpoint, *extra):
    result = CliRunner().invoke(cli_main, ["index", str(video_dir), "--index", str(index_dir), "--clip-model", TINY,
                                           "--clip-pretrained", checkpoint, *extra])
    return result


def _snapshot(index_dir) -> dict:
    """Everything an index holds, keyed by path: id, status, clips, clip vectors, events; plus FAISS id sets."""
    import faiss

    with Library(index_dir) as lib:
        out = {}
        for v in lib.videos():
            out[v["path"]] = {"id": v["id"], "status": v["status"], "error": v["error"], "n_clips": v["n_clips"],
                              "clips": lib.clips(v["id"]), "events": lib.events(v["id"]),
                              "emb": lib.clip_embeddings(v["id"])}
    faiss_ids = {}
    for table in vectors.TABLES:
        index = faiss.read_index(vectors.index_file(index_dir, table))
        faiss_ids[table] = sorted(faiss.vector_to_array(faiss.downcast_index(index).id_map).tolist())
    return {"videos": out, "faiss": faiss_ids}


def _assert_same_index(a: dict, b: dict) -> None:
    """Equal ids, rows, clips and events; vectors equal up to float noise of different CLIP batchings."""
    assert a["faiss"] == b["faiss"]
    assert sorted(a["videos"]) == sorted(b["videos"])
    for path, row in a["videos"].items():
        other = b["videos"][path]
        assert {k: v for k, v in row.items() if k != "emb"} == {k: v for k, v in other.items() if k != "emb"}, path
        np.testing.assert_allclose(row["emb"], other["emb"], atol=1e-5)


def _assert_faiss_matches_duckdb(index_dir):
    snap = _snapshot(index_dir)
    clip_ids = sorted(v["id"] * 2 ** 20 + c["idx"] for v in snap["videos"].values() for c in v["clips"])
    event_ids = sorted(v["id"] * 2 ** 20 + e["idx"] for v in snap["videos"].values() for e in v["events"])
    assert snap["faiss"]["clips"] == clip_ids
    assert snap["faiss"]["events"] == event_ids
    assert library_status(index_dir)["faiss_current"]
    return snap


@pytest.fixture(scope="module")
def first_run(ray_session, tmp_path_factory, checkpoint):
    lib = videos.make_library(tmp_path_factory.mktemp("videos"), long_hours=0.5)  # + a 900-clip video (8 segments)
    index_dir = tmp_path_factory.mktemp("index") / "lib"
    result = _index(lib.root, index_dir, checkpoint)
    return lib, index_dir, result


def test_index_exit_code_summary_and_failures(first_run):
    lib, index_dir, result = first_run
    assert result.exit_code == 3, result.output  # finished, some files failed
    assert f"indexed {len(lib.good)}," in result.output and "failed 6" in result.output
    status = library_status(index_dir)
    assert status["indexed"] == len(lib.good) and status["videos"] == len(lib.good) + len(lib.bad)
    reasons = {f["path"]: f["error"] for f in status["failed"]}
    assert reasons["bad/zero.mp4"] == "empty file (0 bytes)"
    assert reasons["bad/audio only.mp4"].startswith("no video stream")
    assert reasons["bad/broken.mkv"].startswith("broken symlink")
    assert "not a readable video" in reasons["bad/truncated.mp4"]
    assert "not a readable video" in reasons["bad/text.mp4"]
    assert "bad/unreadable.webm" in reasons
    assert all("\n" not in r for r in reasons.values())
    assert status["clip_model"] == "clip_tiny:clip_tiny.pt" and status["embed_dim"] == 32


def test_cpu_clip_actor_uses_the_cores(first_run):
    """Ray sets OMP_NUM_THREADS=1 in a fractional-CPU actor; the CLIP actor must still use the node's cores."""
    import ray

    from indexer.pipeline import ACTOR_CACHE

    actors, _ = next(iter(ACTOR_CACHE.values()))
    described = ray.get(actors[0].describe.remote())
    assert described["device"] == "cpu"
    assert described["torch_threads"] == min(2, os.cpu_count())  # the test cluster has 2 CPUs


def test_cluster_shape_keeps_the_measured_choices():
    """CPU: one CLIP actor per 8 CPUs on half a CPU with explicit torch threads, decode tasks on a whole CPU (where
    there are two); GPU: one actor per GPU. The CLIP choice travels as one value, with the actors' device."""
    from indexer.pipeline import cluster_shape
    from indexer.workers import CLIPChoice

    clip = CLIPChoice("clip_tiny.json", None, "auto", allow_random=True)
    two = cluster_shape(clip, cpus=2, gpus=0)
    assert (two.n_actors, two.actor_options, two.threads, two.decode_cpus) == (1, {"num_cpus": 0.5}, 2, 1)
    assert two.clip == CLIPChoice("clip_tiny.json", None, "cpu", allow_random=True)
    assert cluster_shape(clip, cpus=1, gpus=0).decode_cpus == 0.5
    big = cluster_shape(clip, cpus=32, gpus=0)
    assert (big.n_actors, big.threads) == (4, 8)
    gpu = cluster_shape(clip, cpus=16, gpus=2)
    assert gpu.n_actors == 2 and gpu.actor_options["num_gpus"] == 1 and gpu.clip.device == "cuda"
    assert cluster_shape(CLIPChoice("m", None, "cpu"), cpus=16, gpus=2).clip.device == "cpu"
    with pytest.raises(VmrError, match="no GPU"):
        cluster_shape(CLIPChoice("m", None, "cuda"), cpus=4, gpus=0)


def test_rows_timestamps_events_and_faiss(first_run):
    lib, index_dir, _ = first_run
    snap = _assert_faiss_matches_duckdb(index_dir)
    with Library(index_dir) as store:
        for name, spec in lib.good.items():
            rel = spec.path.relative_to(lib.root).as_posix()
            row = snap["videos"][rel]
            assert row["status"] == "indexed", name
            assert row["n_clips"] == len(row["clips"]) == max(1, int(np.floor(row["clips"][-1]["end"] / 2 + 0.5)))
            assert [c["start"] for c in row["clips"]] == [2.0 * i for i in range(row["n_clips"])]
            assert row["clips"][-1]["end"] == pytest.approx(spec.duration, abs=0.25)
            events = row["events"]
            assert events[0]["start"] == 0.0 and events[-1]["end"] == row["clips"][-1]["end"]
            assert all(a["end"] == b["start"] for a, b in zip(events, events[1:]))
            emb = store.clip_embeddings(row["id"])
            np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
            ev = store.event_embeddings(row["id"])
            np.testing.assert_allclose(np.linalg.norm(ev, axis=1), 1.0, atol=1e-5)
        # search finds a clip by its own vector
        row = snap["videos"]["h264.mp4"]
        query = store.clip_embeddings(row["id"])[2]
        assert (row["id"], 2) in [h[:2] for h in store.search_clips(query, 3)]
    ids = [v["id"] for _, v in sorted(snap["videos"].items())]
    numbers = [v & ((1 << LOCAL_BITS) - 1) for v in ids]  # below the library id (store.ids)
    assert sorted(numbers) == list(range(1, len(ids) + 1)) and ids == sorted(ids)  # numbered in path order


def test_status_cli_json(first_run):
    _, index_dir, _ = first_run
    result = CliRunner().invoke(cli_main, ["status", "--index", str(index_dir), "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert {"videos", "indexed", "failed", "clips", "events", "clip_model"} <= set(info)
    text = CliRunner().invoke(cli_main, ["status", "--index", str(index_dir)]).output
    assert "failed:" in text and "bad/zero.mp4: empty file" in text


def test_incremental_rerun(ray_session, tmp_path, checkpoint):
    lib = videos.make_library(tmp_path / "v", bad=False)
    index_dir = tmp_path / "idx"
    first = run_ingest(lib.root, index_dir, TINY, checkpoint, progress=False)
    assert first.indexed == len(lib.good) and not first.failed
    before = _snapshot(index_dir)
    again = run_ingest(lib.root, index_dir, TINY, checkpoint, progress=False)
    assert (again.indexed, again.unchanged, again.removed) == (0, len(lib.good), 0)
    _assert_same_index(_snapshot(index_dir), before)
    # touch (same content, new mtime) -> unchanged; rewrite -> re-indexed under the same id; delete; add.
    os.utime(lib.good["mov"].path, (time.time() + 5, time.time() + 5))
    videos.make_video(lib.good["h264"].path, duration=12.0, scene_seconds=3.0)
    lib.good["vp9"].path.unlink()
    videos.make_video(lib.root / "zz new.mp4", duration=4.0)
    third = run_ingest(lib.root, index_dir, TINY, checkpoint, progress=False)
    assert (third.indexed, third.removed, third.unchanged) == (2, 1, len(lib.good) - 2)
    after = _assert_faiss_matches_duckdb(index_dir)
    assert after["videos"]["h264.mp4"]["id"] == before["videos"]["h264.mp4"]["id"]
    assert after["videos"]["h264.mp4"]["n_clips"] == 6
    assert "sub/vp9.webm" not in after["videos"]
    assert after["videos"]["zz new.mp4"]["id"] == max(v["id"] for v in before["videos"].values()) + 1
    assert after["videos"]["clip.mov"]["clips"] == before["videos"]["clip.mov"]["clips"]
    # --rebuild-faiss reproduces the same FAISS ids from DuckDB
    rebuilt = _index(lib.root, index_dir, checkpoint, "--rebuild-faiss")
    assert rebuilt.exit_code == 0 and "rebuilt FAISS" in rebuilt.output
    assert _snapshot(index_dir)["faiss"] == after["faiss"]


def test_model_mismatch_is_refused(first_run, checkpoint):
    lib, index_dir, _ = first_run
    result = _index(lib.root, index_dir, checkpoint + ".missing")
    assert result.exit_code == 1 and "neither a checkpoint file" in result.output


def test_real_video_15_clips(ray_session, tmp_path, checkpoint):
    if not REAL_VIDEO.is_file():
        pytest.skip("shared real video not present")
    (tmp_path / "v").mkdir()
    os.symlink(REAL_VIDEO, tmp_path / "v" / "charades.mp4")
    summary = run_ingest(tmp_path / "v", tmp_path / "idx", TINY, checkpoint, progress=False)
    assert summary.indexed == 1
    with Library(tmp_path / "idx") as store:
        vid = store.resolve_vid("charades")
        clips = store.clips(vid)
        assert len(clips) == 15 and clips[0]["start"] == 0.0 and clips[-1]["start"] == 28.0
        assert clips[-1]["end"] == pytest.approx(30.70, abs=0.01)
        assert store.events(vid)[-1]["end"] == pytest.approx(30.70, abs=0.01)


@pytest.mark.slow
def test_kill_9_then_rerun_equals_clean_index_and_reader_never_blocks(first_run, tmp_path, checkpoint):
    """An ingest in another process (joined to this Ray) is read while it writes, killed -9, then resumed."""
    import ray

    lib, clean, _ = first_run
    expected = _snapshot(clean)

    index_dir = tmp_path / "idx"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "cli", "index", str(lib.root), "--index", str(index_dir), "--clip-model", TINY,
           "--clip-pretrained", checkpoint, "--ray-address", address]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rng = random.Random(os.getpid())
    phase = rng.choice(["setup", "commits"])
    kill_at = None
    reads, last_indexed = 0, 0
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (index_dir / "library.duckdb").is_file():
            if kill_at is None and phase == "setup":  # while it plans / starts its CLIP actor
                kill_at = time.monotonic() + rng.uniform(0.0, 3.0)
            try:
                status = library_status(index_dir)  # a reader while the writer works: must not fail
            except Exception as err:  # noqa: BLE001
                if "not a finished vmr index" in str(err):
                    continue
                raise
            reads += 1
            assert status["indexed"] >= last_indexed  # never a half-written video, never going back
            last_indexed = status["indexed"]
            if kill_at is None and phase == "commits" and status["indexed"] > 0:  # among the commits
                kill_at = time.monotonic() + rng.uniform(0.0, 1.0)
            if kill_at is not None and time.monotonic() >= kill_at:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert reads > 0
    print(f"kill phase {phase}: exit {proc.returncode}, {last_indexed} videos committed when killed")
    # Resume: same ids, nothing duplicated, nothing lost, FAISS consistent; equal to the clean index.
    summary = run_ingest(lib.root, index_dir, TINY, checkpoint, progress=False)
    assert summary.indexed + summary.unchanged + len(summary.failed) >= len(lib.good)
    resumed = _assert_faiss_matches_duckdb(index_dir)
    _assert_same_index(resumed, expected)


def test_stop_signals_are_noted_and_raise_only_at_a_safe_point():
    """indexer.stop_signals: SIGTERM/SIGINT inside the block run no raising handler (code running when they land
    carries on), check() stops with KeyboardInterrupt; a handler a library swapped in is replaced at check(); Ray's
    request for a SIGTERM handler of its own is declined while ray.init runs; the old handlers come back after."""
    import ray
    import ray._private.utils as ray_utils

    from indexer.stop_signals import STOP_SIGNALS, ray_keeps_our_handlers, recording_stop_signals

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with recording_stop_signals() as stops:
        stops.check()  # nothing arrived: no stop
        os.kill(os.getpid(), signal.SIGTERM)
        total = sum(range(100_000))  # the handler runs at some bytecode of this: it must not raise here
        assert total == 4999950000 and stops.arrived == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            stops.check()
        with ray_keeps_our_handlers(ray, stops):
            ray_utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))
        assert signal.getsignal(signal.SIGTERM) == stops.note
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a library's own, raising handler
        with pytest.raises(KeyboardInterrupt):
            stops.check()
        assert signal.getsignal(signal.SIGINT) == stops.note
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stops.arrived == [signal.SIGTERM, signal.SIGINT]
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    assert ray_utils.set_sigterm_handler.__name__ == "set_sigterm_handler"
    flag = ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    with recording_stop_signals() as stops, ray_keeps_our_handlers(ray, stops):
        assert ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER is True  # no native handler
    assert ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER == flag



SIGTERM_INSIDE_RAY_INIT = """
import os, signal, sys, time
import ray
from indexer.stop_signals import ray_keeps_our_handlers, recording_stop_signals
with recording_stop_signals() as stops:
    with ray_keeps_our_handlers(ray, stops):
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
        # still inside the block: the driver's core worker is built, our handlers are not yet set again
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print("noted", stops.arrived, flush=True)
    ray.shutdown()
"""


def test_sigterm_once_the_core_worker_runs_is_only_noted():
    """ray_keeps_our_handlers: the driver's core worker is built without Ray's native failure handler, so a
    SIGTERM between its start and ray.init's return reaches our handler: noted, no stack on stderr, no abort."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SIGTERM_INSIDE_RAY_INIT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"noted [{int(signal.SIGTERM)}]" in proc.stdout
    assert "SIGTERM received" not in proc.stderr and "logging.cc" not in proc.stderr, proc.stderr[-2000:]
