"""store.Library on a real DuckDB file + real FAISS files, written directly (no Ray, no model)."""
from __future__ import annotations

import numpy as np
import pytest

from store import vectors
from store.errors import VmrError
from store.library import Library
from store.status import describe_status, library_status

DIM = 8


def _unit(rng, n):
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _commit(lib, vid, n, rng, faiss_files=None, old=(0, 0)):
    clips = _unit(rng, n)
    spans = np.stack([np.arange(n) * 2.0, np.arange(n) * 2.0 + 2], 1)
    ev = clips[:1]
    lib.commit_video(vid, {"size": 1, "mtime": 1.0, "content_hash": "h", "duration": 2.0 * n}, spans, clips,
                     np.array([[0.0, 2.0 * n]]), np.array([[0, n - 1]]), ev)
    if faiss_files is not None:
        faiss_files.replace(vid, old, clips, ev)
    return clips


def _faiss_ids(index):
    import faiss

    return set(faiss.vector_to_array(faiss.downcast_index(index).id_map).tolist())


def test_write_read_search_delete(tmp_path):
    rng = np.random.default_rng(0)
    idx = tmp_path / "idx"
    with Library(idx, read_only=False) as lib:
        lib.prepare("m:random", DIM, "/videos", clip_seconds=2.0)
        ids = lib.add_pending([("b.mp4", 1, 1.0), ("a/c.mp4", 1, 1.0), ("x.mkv", 1, 1.0)])
        assert list(ids.values()) == [1, 2, 3]  # in the order given (the indexer gives them sorted)
        ff = lib.open_faiss()
        c1 = _commit(lib, 1, 5, rng, ff)
        c2 = _commit(lib, 2, 3, rng, ff)
        lib.commit_failed(3, {"size": 0, "mtime": 1.0}, "empty file\n(0 bytes)")
        lib.save_faiss(ff)
        with pytest.raises(VmrError, match="holds m:random"):
            lib.prepare("other:model", DIM, "/videos", clip_seconds=2.0)
        with pytest.raises(VmrError, match="holds 2.0-s clips"):
            lib.prepare("m:random", DIM, "/videos", clip_seconds=1.0)
    with Library(idx) as ro:
        assert ro.meta()["clip_model"] == "m:random" and ro.meta()["faiss"]["n_clips"] == 8
        assert ro.meta()["clip_seconds"] == 2.0
        np.testing.assert_array_equal(ro.clip_embeddings(1), c1)
        assert ro.clips(2)[-1] == {"idx": 2, "start": 4.0, "end": 6.0}
        assert ro.events(1) == [{"idx": 0, "start": 0.0, "end": 10.0}]
        assert ro.resolve_vid("a/c.mp4") == 2 and ro.resolve_vid("c") == 2
        # the batched readers a search uses give what the per-video ones give
        many = ro.clip_embeddings_many([2, 1, 3, 99])
        np.testing.assert_array_equal(many[1], c1)
        np.testing.assert_array_equal(many[2], c2)
        assert len(many[3]) == 0 and len(many[99]) == 0
        assert ro.events_many([1, 2]) == {1: ro.events(1), 2: ro.events(2)}
        rows = ro.videos_by_id([3, 1, 99])
        assert sorted(rows) == [1, 3] and rows[1]["path"] == "b.mp4" and rows[3]["status"] == "failed"
        with pytest.raises(VmrError):
            ro.resolve_vid("x")  # failed, not indexed
        hits = ro.search_clips(c2[1], 3)
        assert hits[0][:2] == (2, 1) and hits[0][2] == pytest.approx(1.0, abs=1e-5)
        all_vecs = np.concatenate([c1, c2])
        assert [round(h[2], 5) for h in hits] == [round(s, 5) for s in sorted(all_vecs @ c2[1], reverse=True)[:3]]
        assert ro.videos(status="failed")[0]["error"] == "empty file (0 bytes)"  # one line
        with pytest.raises(VmrError, match="read-only"):
            ro.delete_videos([1])
    info = library_status(idx)
    assert (info["videos"], info["indexed"], info["clips"], info["events"]) == (3, 2, 8, 2)
    assert info["failed"] == [{"path": "x.mkv", "error": "empty file (0 bytes)"}] and info["faiss_current"]
    assert "clips 8" in describe_status(info)

    with Library(idx, read_only=False) as lib:
        ff = lib.open_faiss()
        lib.delete_videos([1])
        ff.remove(1, (5, 1))
        lib.save_faiss(ff)
        assert _faiss_ids(ff.indexes["clips"]) == set(vectors.vector_ids(2, 3).tolist())
    with Library(idx) as ro:
        assert all(h[0] == 2 for h in ro.search_clips(c1[0], 5))


def test_stale_faiss_is_rebuilt_and_readers_filter(tmp_path):
    """A crash after a DuckDB commit but before the FAISS save: the next writer rebuilds, readers stay exact."""
    rng = np.random.default_rng(1)
    idx = tmp_path / "idx"
    with Library(idx, read_only=False) as lib:
        lib.prepare("m:random", DIM, "/v", clip_seconds=2.0)
        lib.add_pending([("a.mp4", 1, 1.0), ("b.mp4", 1, 1.0)])
        ff = lib.open_faiss()
        a = _commit(lib, 1, 4, rng, ff)
        lib.save_faiss(ff)
        b = _commit(lib, 2, 4, rng)  # committed, FAISS file not updated ("killed" here)
        lib.delete_videos([1])
    with Library(idx) as ro:
        assert not library_status(idx)["faiss_current"]
        assert all(h[0] != 1 for h in ro.search_clips(a[0], 4))  # stale ids are dropped by the exact re-score
    with Library(idx, read_only=False) as lib:
        ff = lib.open_faiss()
        assert _faiss_ids(ff.indexes["clips"]) == set(vectors.vector_ids(2, 4).tolist())
        lib.save_faiss(ff)
    with Library(idx) as ro:
        assert ro.search_clips(b[2], 1)[0][:2] == (2, 2)


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(VmrError, match="no vmr index"):
        Library(tmp_path / "nothing")
    with pytest.raises(VmrError, match="no vmr index"):
        library_status(tmp_path / "nothing")


def test_feature_kinds_recorded_migrated_and_checked(tmp_path):
    """A new index records its 'clip' kind (dims, dtype, the model that made it) and its coarse kind; an index
    written before kinds were recorded reads as holding 'clip' and gains the record on its next ingest, rows
    untouched; a reader of a kind the index lacks, or of another width, is refused in one line naming it."""
    from store import kinds

    source = {"model": "m", "pretrained": "/w/m.pt", "precision": "bf16"}
    with Library(tmp_path / "new", read_only=False) as lib:
        meta = lib.prepare("m:random", DIM, "/videos", clip_seconds=2.0, clip_source=source)
    assert meta["coarse_kind"] == "clip"
    assert meta["feature_kinds"] == {"clip": {"dim": DIM, "dtype": "float32", "model": "m:random",
                                              "weights": "/w/m.pt", "precision": "bf16", "frames": kinds.CLIP_FRAMES}}
    with Library(tmp_path / "old", read_only=False) as lib:
        lib.prepare("m:random", DIM, "/videos", clip_seconds=2.0)
        _commit(lib, 1, 5, np.random.default_rng(0))
        with lib.session() as con:  # as an index written before kinds were recorded
            con.execute("DELETE FROM meta WHERE key IN ('feature_kinds', 'coarse_kind')")
        old = lib.meta()
        assert "feature_kinds" not in old and kinds.feature_kinds(old)["clip"]["dim"] == DIM
        assert kinds.coarse_kind(old) == "clip"
        before = lib.clip_embeddings(1)
        migrated = lib.prepare("m:random", DIM, "/videos", clip_seconds=2.0)
        assert migrated["feature_kinds"]["clip"]["dim"] == DIM and lib.meta()["coarse_kind"] == "clip"
        np.testing.assert_array_equal(lib.clip_embeddings(1), before)
        assert lib.counts()["clips"] == 5
    kinds.check_kinds(migrated, ["clip"], [DIM], "the reranker r.pt")
    with pytest.raises(VmrError) as missing:
        kinds.check_kinds(migrated, ["slowfast", "clip"], [2304, DIM], "the reranker r.pt")
    assert "'slowfast'" in str(missing.value) and "holds: clip" in str(missing.value)
    assert "\n" not in str(missing.value)
    with pytest.raises(VmrError, match=f"reads 2048-d 'clip' features, this index holds {DIM}-d"):
        kinds.check_kinds(migrated, ["clip"], [2048], "the reranker r.pt")
