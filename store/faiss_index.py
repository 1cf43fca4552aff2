"""FAISS coarse index over clip/event vectors: choose a type by size, build, update, persist, search.

The vectors are L2-normalised CLIP embeddings and the metric is inner product (= cosine). Every index carries the
caller's int64 ids (video_id * 2**20 + clip_idx), so a search result maps straight back to DuckDB rows.

Index types (chosen by `choose_index_spec`; the type of each file is recorded in faiss.json, store/vectors.py):
  flat  exact search (IndexIDMap over IndexFlatIP). Used below FLAT_MAX_VECTORS, where a brute-force scan of one
        query is already a few milliseconds.
  ivf   IndexIVFScalarQuantizer with fp16 codes (inner-product coarse quantizer, native ids). Approximate: a
        query scans `nprobe` of `nlist` inverted lists. The scan is memory-bound, so fp16 codes halve both RAM
        (~0.5x the raw vectors) and query time versus IVF-Flat at the same recall (scores off by ~1e-3 at most);
        callers re-score the hits exactly from DuckDB anyway, so recall is what matters here (measured by
        bench/coarse_index.py). spec["codec"]: "fp16" (default), "flat" (float32 codes) or "sq8" (8-bit, 0.25x).
  hnsw  IndexIDMap over IndexHNSWFlat. Offered for completeness (`spec={"type": "hnsw"}`); never chosen by
        default because building it at 10**6 vectors on a 2-core machine takes far longer than IVF, it needs
        ~1.15x the raw RAM, cannot remove ids, and has no GPU implementation.

GPU: when faiss sees a GPU (faiss.get_num_gpus() > 0) flat and IVF indexes are built/trained and searched there;
files on disk always hold the CPU form (write_index_atomic converts), read_index moves them back to the GPU.

store/ imports no torch: numpy + faiss only.
"""
from __future__ import annotations

import os
import tempfile

import faiss
import numpy as np

from store.errors import VmrError

# Below this many vectors a flat scan of one 512-d query costs ~< 8 ms on one core: exact search, no training.
FLAT_MAX_VECTORS = 50_000
# IVF: nlist ~= IVF_LISTS_PER_SQRT * sqrt(N) rounded to a power of two, nprobe = nlist / 16. Measured at 1e6
# CLIP-like vectors with text-like (out-of-distribution) queries (bench/coarse_index.py), one core:
# 2048 lists, nprobe 64 / 128 / 192: recall@100 0.92 / 0.95 / 0.97, fp16 codes 3.9 / 8.1 / 11.5 ms CPU a query
# (float32 codes: 12.6 ms at nprobe 128; 8-bit codes: 8.5 ms, recall 0.953). 1024 lists need 2x the scan for
# 0.95; 4096 lists would scan less but cost ~2x the k-means and assignment time at build.
IVF_LISTS_PER_SQRT = 2.0
IVF_MIN_LISTS, IVF_MAX_LISTS = 256, 8192
IVF_PROBE_FRACTION = 1.0 / 16  # e.g. 128 of 2048 lists at 1e6 vectors
IVF_MIN_PROBES = 16
IVF_TRAIN_POINTS_PER_LIST = 40  # k-means sample size per centroid (faiss warns below 39)
IVF_KMEANS_ITERATIONS = 12  # faiss' default is 25; 12 gave the same recall at half the training time
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 256
NORM_TOLERANCE = 1e-2
MISSING_ID = -1
_SQ_CODECS = {"fp16": faiss.ScalarQuantizer.QT_fp16, "sq8": faiss.ScalarQuantizer.QT_8bit}


def gpu_available() -> bool:
    """True when this faiss build sees at least one GPU."""
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:  # a CPU-only faiss build has no get_num_gpus
        return False


def choose_index_spec(n_vectors: int, dim: int) -> dict:
    """The index type and parameters for a library of `n_vectors` vectors of `dim` dims (JSON-serialisable)."""
    n_vectors, dim = int(n_vectors), int(dim)
    if dim <= 0:
        raise VmrError(f"index dimension must be positive, got {dim}")
    if n_vectors < FLAT_MAX_VECTORS:
        return {"type": "flat", "dim": dim, "metric": "ip"}
    target = IVF_LISTS_PER_SQRT * np.sqrt(n_vectors)
    nlist = int(2 ** round(np.log2(target)))
    nlist = int(min(max(nlist, IVF_MIN_LISTS), IVF_MAX_LISTS))
    nprobe = int(max(IVF_MIN_PROBES, nlist * IVF_PROBE_FRACTION))
    return {"type": "ivf", "dim": dim, "metric": "ip", "codec": "fp16", "nlist": nlist, "nprobe": nprobe,
            "train_points": int(min(n_vectors, nlist * IVF_TRAIN_POINTS_PER_LIST)), "niter": IVF_KMEANS_ITERATIONS}


def build_index(vectors: np.ndarray, ids: np.ndarray, spec: dict | None = None, seed: int = 0) -> faiss.Index:
    """An index over `vectors` f32 [N, D] (L2-normalised) carrying `ids` int64 [N] (unique).

    spec: from choose_index_spec (default: chosen from N, D). An IVF spec needs at least `nlist` vectors to train.
    """
    vectors, ids = _check_vectors(vectors), _check_ids(ids)
    if len(vectors) != len(ids):
        raise VmrError(f"{len(vectors)} vectors but {len(ids)} ids")
    if len(np.unique(ids)) != len(ids):
        raise VmrError("duplicate ids given to build_index")
    n, dim = vectors.shape
    spec = dict(spec) if spec is not None else choose_index_spec(n, dim)
    if spec.get("dim", dim) != dim:
        raise VmrError(f"index spec is for {spec['dim']}-d vectors, got {dim}-d")
    kind = spec.get("type")
    if kind == "flat":
        index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
        index = _to_gpu(index)
    elif kind == "ivf":
        index = _build_ivf(vectors, spec, seed)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, int(spec.get("M", HNSW_M)), faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = int(spec.get("ef_construction", HNSW_EF_CONSTRUCTION))
        hnsw.hnsw.efSearch = int(spec.get("ef_search", HNSW_EF_SEARCH))
        index = faiss.IndexIDMap(hnsw)
    else:
        raise VmrError(f"unknown FAISS index type {kind!r} (expected flat, ivf or hnsw)")
    if n:
        index.add_with_ids(vectors, ids)
    return index


def _build_ivf(vectors: np.ndarray, spec: dict, seed: int) -> faiss.Index:
    n, dim = vectors.shape
    nlist = int(spec["nlist"])
    if n < nlist:
        raise VmrError(f"an IVF index with {nlist} lists needs at least {nlist} vectors to train, got {n}")
    quantizer = faiss.IndexFlatIP(dim)
    codec = spec.get("codec", "flat")  # specs written before codecs existed meant float32 codes
    if codec == "flat":
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a reference
    elif codec in _SQ_CODECS:
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, _SQ_CODECS[codec], faiss.METRIC_INNER_PRODUCT)
    else:
        raise VmrError(f"unknown IVF codec {codec!r} (expected flat, fp16 or sq8)")
    ivf.nprobe = int(spec.get("nprobe", IVF_MIN_PROBES))
    # k-means on a random sample: cost ~ train_points * nlist * dim * iterations.
    n_train = int(min(n, spec.get("train_points", nlist * IVF_TRAIN_POINTS_PER_LIST)))
    rng = np.random.default_rng(seed)
    sample = vectors if n_train >= n else vectors[np.sort(rng.choice(n, n_train, replace=False))]
    ivf.cp.seed = seed
    ivf.cp.niter = int(spec.get("niter", IVF_KMEANS_ITERATIONS))
    ivf.cp.spherical = True  # centroids stay on the unit sphere, as the data: better IP assignment
    # k-means on the GPU when there is one (the local variable keeps the GPU index alive: the C++ field does not)
    gpu_kmeans = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim)) if gpu_available() else None
    if gpu_kmeans is not None:
        ivf.clustering_index = gpu_kmeans
    try:
        ivf.train(sample)
    finally:
        if gpu_kmeans is not None:
            ivf.clustering_index = None
    return _to_gpu(ivf)


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Add `vectors` f32 [N, D] with `ids` int64 [N] to `index` (ids must not be in it yet: remove them first)."""
    vectors, ids = _check_vectors(vectors, index.d), _check_ids(ids)
    if len(vectors) != len(ids):
        raise VmrError(f"{len(vectors)} vectors but {len(ids)} ids")
    if len(ids):
        index.add_with_ids(vectors, ids)


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove `ids` from `index`; returns how many were removed.

    Raises NotImplementedError where the index type cannot remove (HNSW, GPU indexes): the caller rebuilds.
    """
    ids = _check_ids(ids)
    if _is_gpu(index):
        raise NotImplementedError("a GPU FAISS index cannot remove ids; rebuild it")
    if isinstance(_inner(index), faiss.IndexHNSW):
        raise NotImplementedError("an HNSW FAISS index cannot remove ids; rebuild it")
    if not len(ids):
        return 0
    return int(index.remove_ids(ids))


def write_index_atomic(index: faiss.Index, path: str | os.PathLike) -> None:
    """Write `index` to `path` via a temp file in the same directory + os.replace (readers never see half a file)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    cpu = faiss.index_gpu_to_cpu(index) if _is_gpu(index) else index
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        faiss.write_index(cpu, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_index(path: str | os.PathLike, gpu: bool | None = None) -> faiss.Index:
    """Read an index written by write_index_atomic (moved to the GPU when one is present, unless gpu=False)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VmrError(f"FAISS index file not found: {path}")
    try:
        index = faiss.read_index(path)
    except RuntimeError as err:
        raise VmrError(f"cannot read FAISS index {path}: {str(err).splitlines()[0] if str(err) else err}") from None
    return _to_gpu(index) if gpu is None or gpu else index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of `queries` f32 [Q, D] (or [D]) -> (scores f32 [Q, k], ids int64 [Q, k]); missing hits: id -1."""
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise VmrError(f"queries must be [Q, {index.d}], got {list(queries.shape)}")
    k = int(k)
    if k <= 0:
        raise VmrError(f"k must be positive, got {k}")
    if _is_gpu(index) and k > 2048:  # GPU k-selection limit
        k_eff = 2048
    else:
        k_eff = k
    if index.ntotal == 0:
        return (np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), MISSING_ID, np.int64))
    scores, ids = index.search(np.ascontiguousarray(queries), k_eff)
    if k_eff < k:
        pad = k - k_eff
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=MISSING_ID)
    scores = scores.astype(np.float32, copy=False)
    ids = ids.astype(np.int64, copy=False)
    scores[ids == MISSING_ID] = -np.inf  # faiss pads with -3.4e38 for IP; make "missing" unambiguous
    return scores, ids


def is_exact(index: faiss.Index) -> bool:
    """True when search returns the exact top-k (flat); False for approximate types (callers re-score)."""
    inner = _inner(index)
    return isinstance(inner, faiss.IndexFlat) or (hasattr(faiss, "GpuIndexFlat") and isinstance(inner, faiss.GpuIndexFlat))


def index_type(index: faiss.Index) -> str:
    """'flat', 'ivf' or 'hnsw' (the `type` of the spec the index was built from)."""
    inner = _inner(index)
    if is_exact(index):
        return "flat"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVF) or (hasattr(faiss, "GpuIndexIVF") and isinstance(inner, faiss.GpuIndexIVF)):
        return "ivf"
    return type(inner).__name__


# --- helpers -----------------------------------------------------------------------------------------------------

def _inner(index: faiss.Index) -> faiss.Index:
    """The index under an IndexIDMap wrapper, downcast to its concrete class."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.downcast_index(index.index)
    return index


def _is_gpu(index: faiss.Index) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(_inner(index), faiss.GpuIndex)


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """The GPU clone of a flat/IVF index when a GPU is present; otherwise (or for HNSW) the index itself."""
    if not gpu_available() or _is_gpu(index) or isinstance(_inner(index), faiss.IndexHNSW):
        return index
    return faiss.index_cpu_to_all_gpus(index)


def _check_vectors(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim):
        want = f"[N, {dim}]" if dim is not None else "[N, D]"
        raise VmrError(f"vectors must be {want}, got {list(vectors.shape)}")
    if len(vectors):
        if not np.isfinite(vectors).all():
            raise VmrError("vectors contain NaN or inf")
        norms = np.linalg.norm(vectors, axis=1)
        if np.abs(norms - 1.0).max() > NORM_TOLERANCE:
            raise VmrError("vectors must be L2-normalised (inner product = cosine); "
                           f"got norms in [{norms.min():.3g}, {norms.max():.3g}]")
    return vectors


def _check_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.ascontiguousarray(ids)
    if ids.ndim != 1 or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
        raise VmrError(f"ids must be a 1-d integer array, got {ids.dtype} {list(ids.shape)}")
    ids = ids.astype(np.int64, copy=False)
    if len(ids) and ids.min() < 0:
        raise VmrError("ids must be non-negative")
    return ids
