"""Coarse-index benchmark: the index type store.faiss_index chooses vs exact flat search, at 1e4..1e6 vectors.

Data (synthetic, CLIP-like; see world/vectors.py): clip vectors of a library of videos with text-like queries, so
recall@100 against the exact top-100 is measured on the distribution the store will serve.

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

from bench.report import Section, machine_line, percentile_ms, save_figure
from world.vectors import CLIPS_PER_VIDEO, DIM, K, clip_like_library, exact_top_k, recall_at_k


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
    png = save_figure(fig, out_dir, "coarse_index.png")

    headline = (f"coarse index at {big['n']:,} vectors: {big['type']} p50 {big['p50_ms']:.2f} ms wall / "
                f"{big['cpu_p50_ms']:.2f} ms CPU (flat {big['flat_p50_ms']:.1f} / {big['flat_cpu_p50_ms']:.1f} ms), "
                f"recall@100 {big['recall']:.3f}, build {big['build_s']:.1f} s")
    return Section("Coarse index (FAISS)", "\n".join(lines), [png], headline, data=rows)
