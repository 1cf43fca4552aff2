"""The benchmark suite behind `vmr bench` / `python -m bench`: runs each section, writes DIR/report.md + PNGs.

Sections (each a module with `run(out_dir, quick)`; owners in parentheses):
  1 ingest        bench.ingest        (INGEST)  end-to-end ingest vs the CLIP encoder alone, peak RSS
    ingest_rtf    bench.ingest_rtf    (BENCH)   real-time factor at 240p/480p/1080p vs the plainest loop
  2 coarse        bench.coarse_index  (BENCH)   the store's FAISS index vs exact flat search, 1e4..1e6 vectors
  3 model         bench.model         (MODEL)   the model's own forward/training figures
  4 rerank        bench.rerank        (BENCH)   windows/s by LLM block shape, fp32/bf16, vs the authors' code
  5 search        bench.search        (SEARCH)  end-to-end library search vs the exhaustive baseline
Each section runs in its own Python process (a crash, a leaked Ray instance or memory of one section cannot take
down the others or the caller); a section that fails or is missing is reported as "not available: reason".
"""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import tempfile
import time

from bench.report import Section, coerce_section, not_available, write_report

# key, title, module
SECTIONS = [
    ("ingest", "Ingest: pipeline vs the CLIP encoder alone, peak RSS (INGEST)", "bench.ingest"),
    ("ingest_rtf", "Ingest: real-time factor by resolution vs the plainest loop", "bench.ingest_rtf"),
    ("coarse", "Coarse index (FAISS)", "bench.coarse_index"),
    ("model", "Rerank: the model's forward (MODEL)", "bench.model"),
    ("rerank", "Rerank: LLMEPET by LLM block shape, fp32/bf16, vs the authors' code", "bench.rerank"),
    ("search", "Library search", "bench.search"),
]
# Per-section wall-clock limits (s). Quick mode is the smoke size (~2-3 min for the whole suite on 2 busy cores,
# most of it Ray and torch start-up). Full: search writes a 10^4-video library (~6 min) and times the exhaustive
# baseline (~1 min a query), so it gets longer. Whole full suite: ~40 min here.
TIMEOUT_QUICK, TIMEOUT_FULL = 240, 900
TIMEOUT_FULL_SECTION = {"search": 2400}


def run_section(module: str, title: str, out_dir: str, quick: bool) -> Section:
    """Run one section in this process (what the child process does)."""
    import importlib

    t0 = time.perf_counter()
    before = _pngs(out_dir)
    mod = importlib.import_module(module)
    section = coerce_section(title, mod.run(out_dir, quick), out_dir, describe=getattr(mod, "describe", None))
    section.seconds = time.perf_counter() - t0
    if not section.title:
        section.title = title
    # plots the section wrote but did not list (other helpers' conventions) still reach the report
    listed = {os.path.abspath(os.path.join(out_dir, f)) for f in section.figures}
    section.figures += sorted(p for p in _pngs(out_dir) - before if p not in listed)
    return section


def _pngs(out_dir: str) -> set[str]:
    found = set()
    for base, _, files in os.walk(out_dir):
        found |= {os.path.abspath(os.path.join(base, f)) for f in files if f.endswith(".png")}
    return found


def _run_child(key: str, title: str, module: str, out_dir: str, quick: bool, timeout: float) -> Section:
    import importlib.util

    try:
        if importlib.util.find_spec(module) is None:
            return not_available(title, f"{module} is not written yet (module not found)")
    except (ImportError, ValueError) as err:
        return not_available(title, f"{module}: {err}")
    fd, result = tempfile.mkstemp(prefix=f"bench_{key}_", suffix=".pkl")
    os.close(fd)
    cmd = [sys.executable, "-m", "bench", "--child-module", module, "--child-title", title, "--out", out_dir,
           "--result", result]
    if quick:
        cmd.append("--quick")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 and os.path.getsize(result) > 0:
            with open(result, "rb") as f:
                section = pickle.load(f)
            section.seconds = section.seconds or time.perf_counter() - t0
            return section
        reason = _failure_reason(proc.stderr or proc.stdout or "", proc.returncode)
        return not_available(title, f"{module} failed (exit {proc.returncode}): {reason[:300]}")
    except subprocess.TimeoutExpired:
        return not_available(title, f"{module} did not finish within {timeout:.0f} s")
    finally:
        if os.path.exists(result):
            os.unlink(result)


def _failure_reason(output: str, returncode: int) -> str:
    """The most telling line of a failed child's output: its last exception line, else its last line."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b", ln) or "Error:" in ln]
    if returncode < 0:
        return f"killed by signal {-returncode}" + (f"; last error: {errors[-1]}" if errors else "")
    return errors[-1] if errors else (lines[-1] if lines else f"exit code {returncode}")


def run_suite(out_dir: str, quick: bool = False, sections: list[str] | None = None, timeout: float | None = None) -> str:
    """Run the sections (default: all), write out_dir/report.md with the PNGs beside it; returns the report path.

    quick: the smoke sizes (~2-3 min for the whole suite on 2 cores). Never raises for a failing section: it is reported instead.
    """
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    keys = [k for k, _, _ in SECTIONS]
    unknown = set(sections or []) - set(keys)
    if unknown:
        from store.errors import VmrError

        raise VmrError(f"unknown bench section(s) {', '.join(sorted(unknown))}; known: {', '.join(keys)}")
    t0 = time.perf_counter()
    chosen = [(k, t, m) for k, t, m in SECTIONS if not sections or k in sections]
    # Run order: the sections named in env VMR_BENCH_FIRST (comma-separated keys) first; report order
    # stays SECTIONS'. Lets a long suite measure the settled pieces first and the others as late as possible.
    first = [k for k in os.environ.get("VMR_BENCH_FIRST", "").split(",") if k]
    order = sorted(chosen, key=lambda kt: (kt[0] not in first, first.index(kt[0]) if kt[0] in first else 0))
    done = {}
    for key, title, module in order:
        print(f"[bench] {key}: {module} ...", file=sys.stderr, flush=True)
        limit = timeout or (TIMEOUT_QUICK if quick else TIMEOUT_FULL_SECTION.get(key, TIMEOUT_FULL))
        section = _run_child(key, title, module, out_dir, quick, limit)
        print(f"[bench] {key}: {section.headline or section.markdown[:120]} ({section.seconds:.0f} s)",
              file=sys.stderr, flush=True)
        done[key] = section
    path = write_report([done[k] for k, _, _ in chosen], out_dir, quick, time.perf_counter() - t0)
    print(f"[bench] report: {path}", file=sys.stderr, flush=True)
    return path
