"""Smoke test of the benchmark suite (quick size): the report and its plots are produced, failures are reported.

Benchmarks are never timed here; this only checks that `run_suite(out, quick=True)` works end to end.
"""
from __future__ import annotations

import os
import re

import pytest

from bench import suite
from bench.report import Section, coerce_section


@pytest.fixture
def fake_sections(tmp_path, monkeypatch):
    """The real coarse-index and rerank sections plus one broken and one missing section module."""
    pkg = tmp_path / "fakemods"
    pkg.mkdir()
    (pkg / "vmr_bench_broken.py").write_text("def run(out_dir, quick):\n    raise RuntimeError('boom: no data here')\n")
    monkeypatch.setenv("PYTHONPATH", f"{pkg}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setattr(suite, "SECTIONS", [
        ("coarse", "Coarse index (FAISS)", "bench.coarse_index"),
        ("broken", "Broken piece", "vmr_bench_broken"),
        ("missing", "Missing piece", "vmr_bench_not_written"),
        ("rerank", "Rerank", "bench.rerank"),
    ])


def test_quick_suite_writes_report_and_plots(tmp_path, fake_sections):
    out = tmp_path / "report"
    path = suite.run_suite(str(out), quick=True)
    assert path == str(out / "report.md")
    text = open(path).read()
    # the machine and the baselines are named
    assert "Machine:" in text and "cores" in text and "Baseline: exact flat search" in text
    assert "Baseline: the authors' implementation" in text
    # figures exist and are referenced
    pngs = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", text)
    assert {"coarse_index.png", "rerank.png"} <= set(pngs)
    for png in pngs:
        assert (out / png).stat().st_size > 1000
    # coarse-index table: flat row and an IVF row with a recall figure
    assert re.search(r"\| 2,000 \| flat \|", text)
    ivf = re.search(r"\| 6,000 \| ivf-fp16 \(nlist 64, nprobe 8\) \|[^\n]*", text)
    assert ivf, text
    recall = float(ivf.group(0).split("|")[7])
    assert 0.5 < recall <= 1.0
    # a failing and a missing section are reported, not raised
    assert "## 2. Broken piece\n\nnot available: vmr_bench_broken failed" in text and "boom: no data here" in text
    assert "## 3. Missing piece\n\nnot available: vmr_bench_not_written is not written yet" in text


def test_coerce_section_accepts_other_helpers_results(tmp_path):
    s = coerce_section("X", {"markdown": "| a |", "figures": ["x.png"], "headline": "fast", "clips_per_s": 3.5}, str(tmp_path))
    assert isinstance(s, Section) and s.figures == ["x.png"] and s.headline == "fast" and s.markdown == "| a |"
    bare = coerce_section("Z", {"clips_per_s": 3.5, "rows": [1, 2]}, str(tmp_path))
    assert "| clips_per_s | 3.5 |" in bare.markdown and "\"rows\"" in bare.markdown
    assert coerce_section("Y", "plain text", str(tmp_path)).markdown == "plain text"
