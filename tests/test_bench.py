"""Smoke test of the benchmark suite as its users run it (`vmr bench`, a child `python -m bench`), at quick size.

bench/ is a program beside the product: nothing imports it, so it is only ever run here. Benchmarks are never
timed; this checks that the report and its plots are written, and that a section that fails is reported, not
raised. The two cheapest sections (coarse index, rerank: ~10 s) stand for the rest.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_vmr_bench_quick_writes_report_and_plots(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(cli_main, ["bench", "--out", str(out), "--quick", "--section", "coarse",
                                           "--section", "rerank"])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
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
    # only the sections asked for
    assert "## 1. Coarse index" in text and "## 2. Rerank" in text and "## 3." not in text


def test_failing_section_is_reported_not_raised(tmp_path):
    """A section whose child process dies (here: a `faiss` that cannot import) becomes "not available: reason"."""
    fake = tmp_path / "fakemods"
    fake.mkdir()
    (fake / "faiss.py").write_text("raise ImportError('boom: no faiss here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake), str(ROOT),
                                                                     os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "bench", "--out", str(out), "--quick", "--section", "coarse"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (out / "report.md").read_text()
    assert "## 1. Coarse index (FAISS)\n\nnot available: bench.coarse_index failed (exit 1)" in text, text
    assert "boom: no faiss here" in text


def test_unknown_section_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--out", str(tmp_path), "--section", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr
    assert not (tmp_path / "report.md").exists()
