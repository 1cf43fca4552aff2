"""The benchmark report: one Section per figure, written as markdown (report.md) next to its PNG plots.

Every section names its baseline and the machine it ran on; sections that could not run say why.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
from functools import lru_cache

import numpy as np


@dataclasses.dataclass
class Section:
    """One figure of the report. markdown: body text/tables; figures: PNG paths; headline: one summary line."""

    title: str
    markdown: str
    figures: list = dataclasses.field(default_factory=list)
    headline: str = ""
    available: bool = True
    seconds: float = 0.0
    data: object = None


def save_figure(fig, out_dir: str, name: str) -> str:
    """Write a matplotlib figure as out_dir/name, titled with the machine it was measured on; returns its path."""
    import matplotlib.pyplot as plt

    fig.suptitle(machine_line(), fontsize=8)
    for ax in fig.axes:
        mark_missing_bars(ax)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mark_missing_bars(ax) -> None:
    """Write "n/a" where a bar chart has a bar of no height (a value that was not measured), so that an empty
    slot does not read as a zero."""
    from matplotlib.patches import Rectangle

    bottom = ax.get_ylim()[0]
    for bar in [p for p in ax.patches if isinstance(p, Rectangle)]:
        height = bar.get_height()
        if height is None or not np.isfinite(height) or height == 0:
            ax.annotate("n/a", (bar.get_x() + bar.get_width() / 2, bottom), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, color="0.4")


def headline_of(section: "Section") -> str:
    """The section's headline; a section that gave none is summed up by the first sentence of its text."""
    if section.headline:
        return section.headline
    for line in section.markdown.splitlines():
        text = line.strip().lstrip("#").strip()
        if text and not text.startswith(("|", "!", "```", "_(")):
            return f"{section.title}: {text.split('. ')[0][:200]}"
    return f"{section.title}: (no summary; see its section)"


def not_available(title: str, reason: str) -> Section:
    """A section that could not be measured, with the one-line reason."""
    reason = " ".join(str(reason).split()) or "unknown error"
    return Section(title, f"not available: {reason}", [], f"{title}: not available", available=False)


def coerce_section(title: str, result, out_dir: str, describe=None) -> Section:
    """A Section from whatever another helper's `run(out_dir, quick)` returned.

    Accepted: a Section; a str (markdown); a dict with any of markdown/text/report, figures/pngs, headline/summary;
    a dict of figures without markdown (rendered with the module's `describe(result)` when it has one, else as a
    table of its scalar values plus its nested values as JSON; extra keys beside a markdown are not shown); None.
    """
    if isinstance(result, Section):
        return result
    if isinstance(result, str):
        return Section(title, result, [], "")
    if isinstance(result, dict):
        text_keys = {"markdown", "text", "report", "figures", "pngs", "headline", "summary"}
        md = result.get("markdown") or result.get("text") or result.get("report") or ""
        figs = list(result.get("figures") or result.get("pngs") or [])
        head = str(result.get("headline") or result.get("summary") or "")
        rest = {k: v for k, v in result.items() if k not in text_keys}
        if not md and describe is not None:
            md = str(describe(result))
        elif not md and rest:  # a bare dict of figures
            scalars = {k: v for k, v in rest.items() if isinstance(v, (int, float, str, bool)) or v is None}
            nested = {k: v for k, v in rest.items() if k not in scalars}
            if scalars:
                md += "\n\n| figure | value |\n|---|---:|\n" + "\n".join(f"| {k} | {v} |" for k, v in scalars.items())
            if nested:
                md += "\n\n```json\n" + json.dumps(nested, indent=1, default=str)[:8000] + "\n```"
        return Section(title, md.strip(), figs, head)
    if result is None:
        return Section(title, "(the section returned nothing)", [], "")
    return Section(title, f"```\n{result!r}\n```", [], "")


@lru_cache(maxsize=1)
def machine_line() -> str:
    """'AMD EPYC, 2 cores, 23 GiB RAM, Linux, no GPU' — the machine every figure names."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
        ram_s = f", {ram:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        ram_s = ""
    return f"{cpu}, {cores} cores{ram_s}, {platform.system()}, {gpu_line()}"


@lru_cache(maxsize=1)
def gpu_line() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return "GPU " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # torch missing or broken: the report still names the CPU
        pass
    return "no GPU"


def percentile_ms(seconds, q: float) -> float:
    return float(np.percentile(np.asarray(seconds, dtype=float), q) * 1e3)


def write_report(sections: list[Section], out_dir: str, quick: bool, total_s: float) -> str:
    """Write out_dir/report.md (figures referenced by relative path); returns its path."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# vmr benchmark report{' (quick smoke size)' if quick else ''}", "",
           f"Machine (every section and plot): {machine_line()}. Generated {now} in {total_s:.0f} s.", "",
           "## Headlines", ""]
    out += [f"- {headline_of(s)}" for s in sections]
    for i, s in enumerate(sections, 1):
        out += ["", f"## {i}. {s.title}", ""]
        if s.available:
            out.append(f"_(section ran in {s.seconds:.1f} s)_")
            out.append("")
        out.append(s.markdown)
        for png in s.figures:
            rel = os.path.relpath(png, out_dir) if os.path.isabs(png) or os.path.exists(png) else png
            out += ["", f"![{s.title}]({rel})"]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    return path
