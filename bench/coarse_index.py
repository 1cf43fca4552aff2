"""Coarse-index benchmark: the index type store.faiss_index chooses vs exact flat search, at 1e4..1e6 vectors.

Data (synthetic, CLIP-like; see `clip_like_library`): clip vectors of a video library share a modality mean, a topic,
a video and a scene component plus per-clip noise, with cosines calibrated to ViT-B/32 (unrelated images ~0.5, two
clips of one video ~0.85-0.95, as the public features of shared/data/real_video). Queries are *text-like*: a
different modality mean (the CLIP modality gap) plus the content of one scene plus noise, so they are not drawn
from the base set and their best cosine is ~0.3, as for real text->image queries. Recall@100 against the exact
top-100 is therefore measured on the distribution the store will serve.

Per size: build time, single-query p50/p95 latency (one query per call, after warm-up, median over passes), recall@100
vs exact, index bytes vs raw vectors; flat search is timed on the same machine in the same process as the baseline.
At the largest size an nprobe sweep shows the recall/latency trade-off.
"""
from __future__ import annotations

import gc
import os
import tempfile
import time

import numpy as np

from bench.report import Section, machine_line, percentile_ms

DIM = 512
K = 100
CLIPS_PER_VIDEO = 75  # 150-s videos at 2 s a clip, as QVHighlights
SCENES_PER_VIDEO = 5
# Squared weights of the components of an image vector (sum 1 before noise normalisation):
# modality mean, topic, video, scene, per-clip noise. Unrelated images: cos ~ W_MEAN = 0.5; same video ~0.88.
W_MEAN, W_TOPIC, W_VIDEO, W_SCENE, W_NOISE = 0.50, 0.15, 0.13, 0.10, 0.12
# Text queries: text modality mean, scene content, noise. cos(text mean, image mean) ~ 0.3 (modality gap).
Q_MEAN, Q_CONTENT, Q_NOISE, MEAN_COS = 0.55, 0.10, 0.35, 0.3


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_like_library(n: int, n_queries: int, seed: int = 0, dim: int = DIM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors f32 [n, dim] unit rows, ids int64 [n] (video*2**20 + clip), text-like queries f32 [Q, dim] unit rows)."""
    rng = np.random.default_rng(seed)
    n_videos = max(1, -(-n // CLIPS_PER_VIDEO))
    n_topics = max(8, n_videos // 20)
    g_img = _unit(rng.standard_normal(dim))
    other = _unit(rng.standard_normal(dim) - (rng.standard_normal(dim) @ g_img) * g_img)
    other = _unit(other - (other @ g_img) * g_img)
    g_txt = MEAN_COS * g_img + np.sqrt(1 - MEAN_COS ** 2) * other
    # A video's topic is a random mix of 2 base topics (a continuum, not clean clusters: harder for IVF).
    base = _unit(rng.standard_normal((n_topics, dim)))
    pick = rng.integers(0, n_topics, (n_videos, 2))
    mix = rng.dirichlet([1.0, 1.0], n_videos)
    topics = _unit(np.einsum("vk,vkd->vd", mix, base[pick])).astype(np.float32)
    video_topic = np.arange(n_videos)
    videos = _unit(rng.standard_normal((n_videos, dim))).astype(np.float32)
    scenes = _unit(rng.standard_normal((n_videos * SCENES_PER_VIDEO, dim))).astype(np.float32)

    clip_video = np.arange(n) // CLIPS_PER_VIDEO
    clip_idx = np.arange(n) % CLIPS_PER_VIDEO
    clip_scene = clip_video * SCENES_PER_VIDEO + clip_idx * SCENES_PER_VIDEO // CLIPS_PER_VIDEO
    vectors = np.empty((n, dim), np.float32)
    sq = np.sqrt
    for lo in range(0, n, 65536):  # chunks keep the temporaries small at 1e6 x 512
        hi = min(n, lo + 65536)
        v, s = clip_video[lo:hi], clip_scene[lo:hi]
        noise = _unit(rng.standard_normal((hi - lo, dim), dtype=np.float32))
        x = (sq(W_MEAN) * g_img.astype(np.float32) + sq(W_TOPIC) * topics[video_topic[v]]
             + sq(W_VIDEO) * videos[v] + sq(W_SCENE) * scenes[s] + sq(W_NOISE) * noise)
        vectors[lo:hi] = _unit(x)
    ids = (clip_video.astype(np.int64) << 20) + clip_idx

    target_scene = rng.integers(0, n_videos * SCENES_PER_VIDEO, n_queries)
    target_video = target_scene // SCENES_PER_VIDEO
    content = _unit(sq(W_TOPIC) * topics[video_topic[target_video]] + sq(W_VIDEO) * videos[target_video]
                    + sq(W_SCENE) * scenes[target_scene])
    q_noise = _unit(rng.standard_normal((n_queries, dim)))
    queries = _unit(sq(Q_MEAN) * g_txt + sq(Q_CONTENT) * content + sq(Q_NOISE) * q_noise).astype(np.float32)
    return vectors, ids, queries


def exact_top_k(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Exact top-k ids [Q, k] by brute-force matmul (the ground truth recall is measured against)."""
    k = min(k, len(vectors))
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for lo in range(0, len(vectors), 262144):
        s = queries @ vectors[lo:lo + 262144].T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        best_i = np.concatenate([best_i, ids[lo:lo + 262144][part]], 1)
        keep = np.argsort(-best_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth|."""
    return float(np.mean([len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth)]))


def time_single_queries(index, queries: np.ndarray, k: int = K, passes: int = 3, warmup: int = 5):
    """(wall s [Q], CPU s [Q], ids found [Q, k]): per query, the median over `passes` of its wall-clock and of its
    thread CPU time. CPU time is what one query costs on an idle core; on a shared machine wall time also counts
    the time other processes held the core (the report gives both, with the load average)."""
    import faiss

    from store.faiss_index import search

    # One OpenMP thread while timing: a single query gains nothing from threads, and on a small shared machine
    # idle-spinning OpenMP workers make timings noisy (flat search measured 25 ms at 1 thread vs 72 ms at 2).
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return _time_queries(search, index, queries, k, passes, warmup)
    finally:
        faiss.omp_set_num_threads(threads)


def _time_queries(search, index, queries, k, passes, warmup):
    for q in queries[:warmup]:
        search(index, q[None], k)
    wall = np.empty((passes, len(queries)))
    cpu = np.empty((passes, len(queries)))
    found = None
    for p in range(passes):
        out = []
        for i, q in enumerate(queries):
            t0, c0 = time.perf_counter(), time.thread_time()
            _, got = search(index, q[None], k)
            cpu[p, i], wall[p, i] = time.thread_time() - c0, time.perf_counter() - t0
            out.append(got[0])
        found = np.stack(out)
    return np.median(wall, axis=0), np.median(cpu, axis=0), found


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _index_bytes(index) -> int:
    from store.faiss_index import write_index_atomic

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.faiss")
        write_index_atomic(index, path)
        return os.path.getsize(path)


def measure_size(n: int, n_queries: int, flat_queries: int, passes: int, seed: int = 0, sweep: bool = False,
                 spec: dict | None = None) -> dict:
    """All figures for one library size (see module docstring)."""
    from store import faiss_index as fi

    t0 = time.perf_counter()
    vectors, ids, queries = clip_like_library(n, n_queries, seed)
    gen_s = time.perf_counter() - t0
    truth = exact_top_k(vectors, ids, queries)
    raw = vectors.nbytes
    row = {"n": n, "gen_s": gen_s, "raw_bytes": raw}

    t0 = time.perf_counter()
    flat = fi.build_index(vectors, ids, {"type": "flat", "dim": DIM})
    row["flat_build_s"] = time.perf_counter() - t0
    ft, fc, ffound = time_single_queries(flat, queries[:flat_queries], passes=passes)
    row.update(flat_p50_ms=percentile_ms(ft, 50), flat_p95_ms=percentile_ms(ft, 95),
               flat_cpu_p50_ms=percentile_ms(fc, 50), flat_recall=recall_at_k(ffound, truth[:flat_queries]))
    del flat
    gc.collect()

    spec = spec or fi.choose_index_spec(n, DIM)
    row["spec"] = spec
    gc.collect()
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    index = fi.build_index(vectors, ids, spec)
    row["build_s"] = time.perf_counter() - t0
    row["rss_growth_bytes"] = _rss_bytes() - rss0
    row["type"] = fi.index_type(index)
    row["index_bytes"] = _index_bytes(index)
    it, ic, found = time_single_queries(index, queries, passes=passes)
    row.update(p50_ms=percentile_ms(it, 50), p95_ms=percentile_ms(it, 95), cpu_p50_ms=percentile_ms(ic, 50),
               cpu_p95_ms=percentile_ms(ic, 95), recall=recall_at_k(found, truth), load=load_average())
    row["speedup_p50"] = row["flat_p50_ms"] / row["p50_ms"]
    row["speedup_cpu_p50"] = row["flat_cpu_p50_ms"] / row["cpu_p50_ms"]
    if sweep and row["type"] == "ivf":
        import faiss

        ivf = faiss.extract_index_ivf(index)
        base = ivf.nprobe
        curve = []
        for nprobe in sorted({max(1, base // 4), max(1, base // 2), base, base * 2}):
            ivf.nprobe = nprobe
            st, sc, sf = time_single_queries(index, queries, passes=max(1, passes - 1))
            curve.append({"nprobe": nprobe, "p50_ms": percentile_ms(st, 50), "cpu_p50_ms": percentile_ms(sc, 50),
                          "recall": recall_at_k(sf, truth)})
        ivf.nprobe = base
        row["sweep"] = curve
    del index, vectors
    gc.collect()
    return row


def run(out_dir: str, quick: bool) -> Section:
    """The coarse-index section of the report (figures written under out_dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import faiss

    if quick:  # smoke size; the IVF path still runs, with a small IVF spec forced at the second size
        sizes, n_queries, flat_queries, passes = [2_000, 6_000], 20, 10, 1
        specs = {6_000: {"type": "ivf", "dim": DIM, "metric": "ip", "codec": "fp16", "nlist": 64, "nprobe": 8,
                         "train_points": 6_000}}
    else:
        sizes, n_queries, flat_queries, passes = [10_000, 100_000, 1_000_000], 200, 20, 3
        specs = {}
    rows = [measure_size(n, n_queries, flat_queries, passes, sweep=(n == sizes[-1]), spec=specs.get(n))
            for n in sizes]

    gpu = "GPU" if faiss.get_num_gpus() > 0 else "CPU"
    lines = [
        f"Baseline: exact flat search (faiss IndexFlatIP), same vectors, same process. Machine: {machine_line()}, "
        f"faiss {faiss.__version__} on {gpu}, omp threads {faiss.omp_get_max_threads()}.",
        f"Data: synthetic CLIP-like clip vectors ({DIM}-d, unit, videos of {CLIPS_PER_VIDEO} clips, topic/video/scene "
        f"structure) and {n_queries} text-like queries not drawn from the base set (modality gap). "
        f"Latency: one query per call, {passes} pass(es) after warm-up, median per query, then p50/p95 over queries "
        f"(flat: first {flat_queries} queries), 1 OpenMP thread. Recall@{K} vs the exact top-{K}.",
        "",
        "Wall = elapsed time; CPU = the query thread's CPU time (what it costs on an idle core). The machine is "
        "shared: the 1-min load average during each measurement is given; wall figures above ~2 load are inflated.",
        "",
        "| vectors | chosen index | build s | p50 ms wall | p95 ms wall | p50 ms CPU | recall@100 | flat p50 ms wall "
        "| flat p50 ms CPU | speed-up p50 (wall / CPU) | index file / raw vectors | RSS growth at build / raw | load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["spec"]
        label = (f"ivf-{s.get('codec', 'flat')} (nlist {s['nlist']}, nprobe {s['nprobe']})" if r["type"] == "ivf"
                 else r["type"])
        lines.append(f"| {r['n']:,} | {label} | {r['build_s']:.2f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                     f"{r['cpu_p50_ms']:.2f} | {r['recall']:.3f} | {r['flat_p50_ms']:.2f} | {r['flat_cpu_p50_ms']:.2f} | "
                     f"{r['speedup_p50']:.0f}x / {r['speedup_cpu_p50']:.0f}x | {r['index_bytes'] / r['raw_bytes']:.2f} | "
                     f"{r['rss_growth_bytes'] / r['raw_bytes']:.2f} | "
                     f"{r['load']:.1f} |")
    big = rows[-1]
    if "sweep" in big:
        lines += ["", f"nprobe sweep at {big['n']:,} vectors (nlist {big['spec']['nlist']}):", "",
                  "| nprobe | p50 ms wall | p50 ms CPU | recall@100 |", "|---:|---:|---:|---:|"]
        lines += [f"| {c['nprobe']} | {c['p50_ms']:.2f} | {c['cpu_p50_ms']:.2f} | {c['recall']:.3f} |"
                  for c in big["sweep"]]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ns = [r["n"] for r in rows]
    ax1.loglog(ns, [r["flat_p50_ms"] for r in rows], "o-", label="flat (exact) p50")
    ax1.loglog(ns, [r["p50_ms"] for r in rows], "s-", label="chosen index p50")
    ax1.loglog(ns, [r["p95_ms"] for r in rows], "s--", label="chosen index p95")
    ax1.loglog(ns, [r["cpu_p50_ms"] for r in rows], "^:", label="chosen index p50, CPU time")
    ax1.axhline(10, color="grey", lw=0.8, ls=":", label="10 ms target")
    ax1.set_xlabel("vectors (512-d)")
    ax1.set_ylabel("single-query latency, ms")
    ax1.set_title("Coarse index latency vs flat")
    ax1.legend(fontsize=8)
    if "sweep" in big:
        ax2.plot([c["p50_ms"] for c in big["sweep"]], [c["recall"] for c in big["sweep"]], "o-", label="wall")
        ax2.plot([c["cpu_p50_ms"] for c in big["sweep"]], [c["recall"] for c in big["sweep"]], "^:", label="CPU")
        ax2.legend(fontsize=8)
        for c in big["sweep"]:
            ax2.annotate(f"nprobe {c['nprobe']}", (c["p50_ms"], c["recall"]), fontsize=7)
        ax2.axhline(0.95, color="grey", lw=0.8, ls=":")
        ax2.set_xlabel("p50 ms")
        ax2.set_ylabel("recall@100")
        ax2.set_title(f"IVF recall vs latency, {big['n']:,} vectors")
    else:
        ax2.bar([f"{n:,}" for n in ns], [r["recall"] for r in rows])
        ax2.set_ylabel("recall@100")
        ax2.set_title("recall@100 vs exact")
    fig.suptitle(machine_line(), fontsize=8)
    fig.tight_layout()
    png = os.path.join(out_dir, "coarse_index.png")
    fig.savefig(png, dpi=110)
    plt.close(fig)

    headline = (f"coarse index at {big['n']:,} vectors: {big['type']} p50 {big['p50_ms']:.2f} ms wall / "
                f"{big['cpu_p50_ms']:.2f} ms CPU (flat {big['flat_p50_ms']:.1f} / {big['flat_cpu_p50_ms']:.1f} ms), "
                f"recall@100 {big['recall']:.3f}, build {big['build_s']:.1f} s")
    return Section("Coarse index (FAISS)", "\n".join(lines), [png], headline, data=rows)
