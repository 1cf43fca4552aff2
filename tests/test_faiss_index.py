"""store.faiss_index: real FAISS indexes on small CLIP-like data (world.vectors, as the coarse-index bench)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from store import faiss_index as fi
from store.errors import VmrError
from world.vectors import clip_like_library, exact_top_k, recall_at_k


@pytest.fixture(scope="module")
def library():
    """6,000 clip vectors (80 videos) and 30 text-like queries."""
    return clip_like_library(6_000, 30, seed=1)


def _ivf_spec(n, codec="fp16"):
    return {"type": "ivf", "dim": 512, "metric": "ip", "codec": codec, "nlist": 64, "nprobe": 16, "train_points": n}


def test_choose_index_spec_flat_then_ivf_and_json():
    small = fi.choose_index_spec(1_000, 512)
    assert small["type"] == "flat"
    big = fi.choose_index_spec(1_000_000, 512)
    assert big["type"] == "ivf" and big["nprobe"] < big["nlist"] and big["nlist"] >= 256
    assert fi.choose_index_spec(fi.FLAT_MAX_VECTORS, 512)["type"] == "ivf"
    assert json.loads(json.dumps(big)) == big
    with pytest.raises(VmrError):
        fi.choose_index_spec(10, 0)


def test_flat_is_exact_and_returns_caller_ids(library):
    vectors, ids, queries = library
    index = fi.build_index(vectors, ids)
    assert fi.is_exact(index) and fi.index_type(index) == "flat" and index.ntotal == len(ids)
    scores, found = fi.search(index, queries, 10)
    assert scores.dtype == np.float32 and found.dtype == np.int64 and found.shape == (30, 10)
    np.testing.assert_array_equal(found, exact_top_k(vectors, ids, queries, 10))
    row = {int(i): r for r, i in enumerate(ids)}
    np.testing.assert_allclose(scores[0], vectors[[row[int(i)] for i in found[0]]] @ queries[0], rtol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


@pytest.mark.parametrize("codec", ["fp16", "flat", "sq8"])
def test_ivf_is_approximate_with_high_recall(library, codec):
    vectors, ids, queries = library
    index = fi.build_index(vectors, ids, _ivf_spec(len(ids), codec))
    assert not fi.is_exact(index) and fi.index_type(index) == "ivf"
    scores, found = fi.search(index, queries, 100)
    assert recall_at_k(found, exact_top_k(vectors, ids, queries, 100)) >= 0.9
    assert set(found.ravel()) <= set(ids.tolist())
    row = {int(i): r for r, i in enumerate(ids)}
    exact = vectors[[row[int(i)] for i in found[0]]] @ queries[0]
    assert np.abs(scores[0] - exact).max() < (2e-2 if codec == "sq8" else 2e-3)  # codes approximate the scores


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_add_remove_write_read_roundtrip(tmp_path, library, kind):
    vectors, ids, queries = library
    spec = {"type": "flat", "dim": 512} if kind == "flat" else _ivf_spec(4_000)
    index = fi.build_index(vectors[:4_000], ids[:4_000], spec)
    fi.add_vectors(index, vectors[4_000:], ids[4_000:])
    assert index.ntotal == len(ids)
    gone = ids[ids >> 20 == 3]  # every clip of video 3
    assert fi.remove_ids(index, gone) == len(gone)
    assert index.ntotal == len(ids) - len(gone)
    path = tmp_path / "sub" / "clips.faiss"
    fi.write_index_atomic(index, path)
    assert path.is_file() and not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]
    back = fi.read_index(path)
    assert back.ntotal == index.ntotal and fi.is_exact(back) == (kind == "flat")
    _, found = fi.search(back, queries, 50)
    assert not np.isin(found, gone).any()
    np.testing.assert_array_equal(found, fi.search(index, queries, 50)[1])  # nprobe survives the file
    fi.write_index_atomic(back, path)  # overwrite in place
    assert fi.read_index(path).ntotal == index.ntotal


def test_hnsw_cannot_remove(library):
    vectors, ids, queries = library
    index = fi.build_index(vectors[:500], ids[:500], {"type": "hnsw", "dim": 512, "M": 8})
    assert fi.index_type(index) == "hnsw" and not fi.is_exact(index)
    assert fi.search(index, queries[:2], 5)[1].shape == (2, 5)
    with pytest.raises(NotImplementedError):
        fi.remove_ids(index, ids[:3])


def test_missing_hits_are_minus_one_and_empty_index(library):
    vectors, ids, queries = library
    index = fi.build_index(vectors[:5], ids[:5])
    scores, found = fi.search(index, queries[0], 8)  # 1-d query accepted
    assert found.shape == (1, 8) and (found[0, 5:] == -1).all() and np.isneginf(scores[0, 5:]).all()
    empty = fi.build_index(np.zeros((0, 512), np.float32), np.zeros(0, np.int64))
    assert (fi.search(empty, queries[:2], 3)[1] == -1).all()


def test_bad_input_is_a_one_line_vmr_error(tmp_path, library):
    vectors, ids, _ = library
    with pytest.raises(VmrError, match="normalised"):
        fi.build_index(vectors[:10] * 2, ids[:10])
    with pytest.raises(VmrError, match="duplicate"):
        fi.build_index(vectors[:2], np.array([7, 7]))
    with pytest.raises(VmrError, match="ids"):
        fi.build_index(vectors[:2], np.array([1]))
    with pytest.raises(VmrError, match="codec"):
        fi.build_index(vectors, ids, _ivf_spec(len(ids), "pq"))
    with pytest.raises(VmrError, match="needs at least"):
        fi.build_index(vectors[:10], ids[:10], _ivf_spec(10))
    index = fi.build_index(vectors[:10], ids[:10])
    with pytest.raises(VmrError, match="queries"):
        fi.search(index, np.ones((1, 3), np.float32), 1)
    with pytest.raises(VmrError):
        fi.add_vectors(index, vectors[:2, :100], ids[:2])
    with pytest.raises(VmrError, match="not found"):
        fi.read_index(tmp_path / "nope.faiss")
    junk = tmp_path / "junk.faiss"
    junk.write_bytes(b"not an index")
    with pytest.raises(VmrError) as err:
        fi.read_index(junk)
    assert "\n" not in str(err.value)
