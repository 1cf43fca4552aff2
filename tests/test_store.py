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
        v1, v2, v3 = ids.values()
        assert [v & 0xFFFFFF for v in (v1, v2, v3)] == [1, 2, 3]  # numbered in the order given (the indexer sorts)
        ff = lib.open_faiss()
        c1 = _commit(lib, v1, 5, rng, ff)
        c2 = _commit(lib, v2, 3, rng, ff)
        lib.commit_failed(v3, {"size": 0, "mtime": 1.0}, "empty file\n(0 bytes)")
        lib.save_faiss(ff)
        with pytest.raises(VmrError, match="holds m:random"):
            lib.prepare("other:model", DIM, "/videos", clip_seconds=2.0)
        with pytest.raises(VmrError, match="holds 2.0-s clips"):
            lib.prepare("m:random", DIM, "/videos", clip_seconds=1.0)
    with Library(idx) as ro:
        assert ro.meta()["clip_model"] == "m:random" and ro.meta()["faiss"]["n_clips"] == 8
        assert ro.meta()["clip_seconds"] == 2.0
        np.testing.assert_array_equal(ro.clip_embeddings(v1), c1)
        assert ro.clips(v2)[-1] == {"idx": 2, "start": 4.0, "end": 6.0}
        assert ro.events(v1) == [{"idx": 0, "start": 0.0, "end": 10.0}]
        assert ro.resolve_vid("a/c.mp4") == v2 and ro.resolve_vid("c") == v2
        # the batched readers a search uses give what the per-video ones give
        many = ro.clip_embeddings_many([v2, v1, v3, 99])
        np.testing.assert_array_equal(many[v1], c1)
        np.testing.assert_array_equal(many[v2], c2)
        assert len(many[v3]) == 0 and len(many[99]) == 0
        assert ro.events_many([v1, v2]) == {v1: ro.events(v1), v2: ro.events(v2)}
        rows = ro.videos_by_id([v3, v1, 99])
        assert sorted(rows) == [v1, v3] and rows[v1]["path"] == "b.mp4" and rows[v3]["status"] == "failed"
        with pytest.raises(VmrError):
            ro.resolve_vid("x")  # failed, not indexed
        hits = ro.search_clips(c2[1], 3)
        assert hits[0][:2] == (v2, 1) and hits[0][2] == pytest.approx(1.0, abs=1e-5)
        all_vecs = np.concatenate([c1, c2])
        assert [round(h[2], 5) for h in hits] == [round(s, 5) for s in sorted(all_vecs @ c2[1], reverse=True)[:3]]
        assert ro.videos(status="failed")[0]["error"] == "empty file (0 bytes)"  # one line
        with pytest.raises(VmrError, match="read-only"):
            ro.delete_videos([v1])
    info = library_status(idx)
    assert (info["videos"], info["indexed"], info["clips"], info["events"]) == (3, 2, 8, 2)
    assert info["failed"] == [{"path": "x.mkv", "error": "empty file (0 bytes)"}] and info["faiss_current"]
    assert "clips 8" in describe_status(info)

    with Library(idx, read_only=False) as lib:
        ff = lib.open_faiss()
        lib.delete_videos([v1])
        ff.remove(v1, (5, 1))
        lib.save_faiss(ff)
        assert _faiss_ids(ff.indexes["clips"]) == set(vectors.vector_ids(v2, 3).tolist())
    with Library(idx) as ro:
        assert all(h[0] == v2 for h in ro.search_clips(c1[0], 5))


def test_stale_faiss_is_rebuilt_and_readers_filter(tmp_path):
    """A crash after a DuckDB commit but before the FAISS save: the next writer rebuilds, readers stay exact."""
    rng = np.random.default_rng(1)
    idx = tmp_path / "idx"
    with Library(idx, read_only=False) as lib:
        lib.prepare("m:random", DIM, "/v", clip_seconds=2.0)
        va, vb = lib.add_pending([("a.mp4", 1, 1.0), ("b.mp4", 1, 1.0)]).values()
        ff = lib.open_faiss()
        a = _commit(lib, va, 4, rng, ff)
        lib.save_faiss(ff)
        b = _commit(lib, vb, 4, rng)  # committed, FAISS file not updated ("killed" here)
        lib.delete_videos([va])
    with Library(idx) as ro:
        assert not library_status(idx)["faiss_current"]
        assert all(h[0] != va for h in ro.search_clips(a[0], 4))  # stale ids are dropped by the exact re-score
    with Library(idx, read_only=False) as lib:
        ff = lib.open_faiss()
        assert _faiss_ids(ff.indexes["clips"]) == set(vectors.vector_ids(vb, 4).tolist())
        lib.save_faiss(ff)
    with Library(idx) as ro:
        assert ro.search_clips(b[2], 1)[0][:2] == (vb, 2)


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
        (v1,) = lib.add_pending([("a.mp4", 1, 1.0)]).values()
        _commit(lib, v1, 5, np.random.default_rng(0))
        with lib.session() as con:  # as an index written before kinds were recorded
            con.execute("DELETE FROM meta WHERE key IN ('feature_kinds', 'coarse_kind')")
        old = lib.meta()
        assert "feature_kinds" not in old and kinds.feature_kinds(old)["clip"]["dim"] == DIM
        assert kinds.coarse_kind(old) == "clip"
        before = lib.clip_embeddings(v1)
        migrated = lib.prepare("m:random", DIM, "/videos", clip_seconds=2.0)
        assert migrated["feature_kinds"]["clip"]["dim"] == DIM and lib.meta()["coarse_kind"] == "clip"
        np.testing.assert_array_equal(lib.clip_embeddings(v1), before)
        assert lib.counts()["clips"] == 5
    kinds.check_kinds(migrated, ["clip"], [DIM], "the reranker r.pt")
    with pytest.raises(VmrError) as missing:
        kinds.check_kinds(migrated, ["slowfast", "clip"], [2304, DIM], "the reranker r.pt")
    assert "'slowfast'" in str(missing.value) and "holds: clip" in str(missing.value)
    assert "\n" not in str(missing.value)
    with pytest.raises(VmrError, match=f"reads 2048-d 'clip' features, this index holds {DIM}-d"):
        kinds.check_kinds(migrated, ["clip"], [2048], "the reranker r.pt")


def test_video_ids_unique_across_libraries_and_stable_per_folder(tmp_path):
    """Two libraries of different folders give their videos different ids; two indexes of one folder the same
    ones; 43-bit ids survive FAISS (hits name the right video) and an index from before library ids keeps 1, 2."""
    from store import ids

    def build(name, root):
        with Library(tmp_path / name, read_only=False) as lib:
            lib.prepare("m:random", DIM, root, clip_seconds=2.0)
            given = lib.add_pending([("a.mp4", 1, 1.0), ("b.mp4", 1, 1.0)])
            ff = lib.open_faiss()
            vecs = {vid: _commit(lib, vid, 3, np.random.default_rng(vid % 97), ff) for vid in given.values()}
            lib.save_faiss(ff)
        return given, vecs

    first, vecs = build("one", "/videos/news")
    again, _ = build("two", "/videos/news")
    other, _ = build("three", "/videos/sport")
    assert first == again and not set(first.values()) & set(other.values())
    assert {ids.library_of(v) for v in first.values()} == {ids.library_id_of("/videos/news")}
    assert max(first.values()) > 2 ** 31  # past DuckDB INTEGER and int32: BIGINT columns, int64 FAISS ids
    vb = first["b.mp4"]
    with Library(tmp_path / "one") as ro:
        assert ro.search_clips(vecs[vb][2], 1)[0][:2] == (vb, 2)
        assert ro.resolve_vid("b") == vb and ro.videos_by_id([vb])[vb]["path"] == "b.mp4"
    with Library(tmp_path / "old", read_only=False) as lib:
        lib.prepare("m:random", DIM, "/videos/old", clip_seconds=2.0)
        with lib.session() as con:  # as an index written before ids carried a library id
            con.execute("DELETE FROM meta WHERE key = 'library_id'")
        assert list(lib.add_pending([("a.mp4", 1, 1.0), ("b.mp4", 1, 1.0)]).values()) == [1, 2]
    with pytest.raises(VmrError, match="split the folder"):
        ids.video_id(5, 2 ** ids.LOCAL_BITS)


def test_feature_kinds_stored_side_by_side(tmp_path):
    """A second kind (f16, its own width and model) is stored per video beside the coarse one; readers get the
    kinds they name in their order, over the clips all cover; a re-indexed video loses its stale kinds; a record
    that contradicts the held one is refused; status counts the videos holding each kind."""
    rng = np.random.default_rng(3)
    record = {"dim": 6, "dtype": "float16", "model": "slowfast_r50", "weights": "sha256:ab", "precision": "fp32",
              "frames": "30 fps, 32 a clip"}
    idx = tmp_path / "idx"
    with Library(idx, read_only=False) as lib:
        lib.prepare("m:random", DIM, "/videos", clip_seconds=2.0)
        va, vb = lib.add_pending([("a.mp4", 1, 1.0), ("b.mp4", 1, 1.0)]).values()
        clips_a = _commit(lib, va, 4, rng)
        _commit(lib, vb, 3, rng)
        slow_a = rng.standard_normal((5, 6)).astype(np.float32)  # a row more than the clips (padded recipe)
        lib.commit_features(va, "slowfast", slow_a, record)
        with pytest.raises(VmrError, match="holds 'slowfast' features made by slowfast_r50"):
            lib.commit_features(vb, "slowfast", slow_a, {**record, "weights": "sha256:cd"})
        with pytest.raises(VmrError, match="coarse kind"):
            lib.commit_features(va, "clip", clips_a, record)
    with Library(idx) as ro:
        assert ro.meta()["feature_kinds"]["slowfast"] == record
        got = ro.features_many([va, vb], ["slowfast", "clip"])
        assert list(got) == [va]  # b lacks slowfast
        np.testing.assert_allclose(got[va][:, :6], slow_a[:4], atol=2e-3)  # stored f16, first 4 rows
        np.testing.assert_array_equal(got[va][:, 6:], clips_a)
        assert ro.features_many([va, vb], ["clip"])[vb].shape == (3, DIM)
        assert ro.kinds_by_video() == {va: ["clip", "slowfast"], vb: ["clip"]}
    info = library_status(idx)
    assert info["feature_kinds"]["slowfast"]["videos"] == 1 and info["feature_kinds"]["clip"]["videos"] == 2
    assert "features 'slowfast': 6-d float16 by slowfast_r50, 1 of 2 videos" in describe_status(info)
    with Library(idx, read_only=False) as lib:
        _commit(lib, va, 4, rng)  # the file changed: its old slowfast vectors describe other content
        assert lib.kinds_by_video()[va] == ["clip"]


def test_index_without_features_table_reads_and_migrates(tmp_path):
    """An index made before the features table existed: readers see only its coarse kind, the next ingest's
    prepare adds the table, its rows untouched."""
    idx = tmp_path / "idx"
    with Library(idx, read_only=False) as lib:
        lib.prepare("m:random", DIM, "/videos", clip_seconds=2.0)
        (va,) = lib.add_pending([("a.mp4", 1, 1.0)]).values()
        clips = _commit(lib, va, 3, np.random.default_rng(0))
        with lib.session() as con:
            con.execute("DROP TABLE features")
    with Library(idx) as ro:
        assert ro.features_many([va], ["slowfast"]) == {} and ro.kinds_by_video() == {va: ["clip"]}
    with Library(idx, read_only=False) as lib:
        lib.prepare("m:random", DIM, "/videos", clip_seconds=2.0)
        np.testing.assert_array_equal(lib.clip_embeddings(va), clips)
        lib.commit_features(va, "slowfast", np.ones((3, 2), np.float32), {
            "dim": 2, "dtype": "float32", "model": "m", "weights": "w", "precision": "fp32", "frames": "f"})
        assert lib.kinds_by_video()[va] == ["clip", "slowfast"]
