"""The `vmr serve` page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

`vmr serve` runs as a child process over a test-world index (h264 mp4, which Chromium plays). The browser types a
query, clicks the first hit and checks the player starts within 1 s of the hit's start and pauses by its end;
j moves to the next hit; a hit whose file is outside the indexed folder shows why instead of a broken
thumbnail; a label accepted and a moment marked in the page come out of `vmr labels export`; Ctrl-C
(SIGINT) stops the server cleanly. Screenshots go to tests/artifacts/ (or $VMR_TEST_ARTIFACTS).

Skipped only when Chromium or Playwright is missing AND $CI is not set; under CI they must be there.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_server_api import build_index, free_port
from world import WORLD_RERANKER

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(os.environ.get("VMR_TEST_ARTIFACTS") or Path(__file__).resolve().parent / "artifacts")


def _browser_missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


_MISSING = _browser_missing()
pytestmark = [
    pytest.mark.skipif(bool(_MISSING) and not os.environ.get("CI"), reason=f"no browser: {_MISSING}"),
    pytest.mark.skipif(not WORLD_RERANKER.is_file(), reason="world reranker not trained"),
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_session):
    """(base URL, index dir, annotation rows, server process) of `vmr serve` on a fresh test-world index."""
    assert not _MISSING, f"CI is set but the browser test cannot run: {_MISSING}"
    root = tmp_path_factory.mktemp("page_world")
    index, rows = build_index(root, n_videos=3, seed=21)
    port = free_port()
    log = open(root / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--index", str(index), "--checkpoint",
                             str(WORLD_RERANKER), "--device", "cpu", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(base + "/api/status", timeout=5) as res:
                if res.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None, (root / "serve.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "vmr serve did not come up"
        time.sleep(0.3)
    try:
        yield base, index, rows, proc, root / "serve.log"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture()
def page(served, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 800})
        errors = []
        pg.on("pageerror", lambda err: errors.append(str(err)))
        yield pg
        browser.close()
        assert not errors, errors


def shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"page_{name}.png"))


def player(pg, prop: str):
    return pg.evaluate(f"document.getElementById('player').{prop}")


def test_a_hit_whose_file_is_not_served_says_so(served, page):
    """escape.mp4 (a link to a copy kept outside the indexed folder) is found with its original, and its hit shows
    'file not served: outside the indexed folder' instead of a broken thumbnail; selecting it loads no file."""
    base, index, rows, proc, log = served
    last = sorted(p.name for p in (index.parent / "videos").glob("world*.mp4"))[-1]
    row = next(r for r in rows if f"{r['vid']}.mp4" == last)
    page.goto(base + "/")
    page.fill("#q", row["query"])
    page.press("#q", "Enter")
    page.wait_for_selector(".hit.unplayable")
    page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete)", timeout=20_000)
    shot(page, "not_served")
    escape = page.locator(".hit.unplayable").first
    assert "escape.mp4" in escape.inner_text()
    assert escape.locator(".no-thumb").inner_text() == "file not served: outside the indexed folder"
    assert escape.locator("img").count() == 0
    assert page.evaluate("[...document.querySelectorAll('.hit img')].filter(i => !i.naturalWidth).length") == 0
    escape.click()
    assert "outside the indexed folder" in page.locator("#now-playing").inner_text()
    assert not page.evaluate("document.getElementById('player').getAttribute('src')")


@pytest.mark.slow
def test_search_watch_label_in_the_browser(served, page):
    base, index, rows, proc, log = served
    row = rows[0]
    page.goto(base + "/")
    page.wait_for_function("document.getElementById('status').textContent.includes('videos')")
    page.fill("#q", row["query"])
    page.press("#q", "Enter")
    page.wait_for_selector(".hit")
    shot(page, "results")
    hit = page.locator(".hit").first
    start, end = float(hit.get_attribute("data-start")), float(hit.get_attribute("data-end"))
    assert row["vid"] in hit.inner_text()

    hit.click()
    page.wait_for_function("!document.getElementById('player').paused && document.getElementById('player').currentTime > 0",
                           timeout=20_000)
    assert abs(player(page, "currentTime") - start) < 1.0
    page.evaluate("document.getElementById('player').playbackRate = 4")  # the same stop rule, 4x sooner
    page.wait_for_function("document.getElementById('player').paused", timeout=int((end - start) * 1000 + 20_000))
    stopped = player(page, "currentTime")
    assert end - 1.0 <= stopped <= end + 0.3, (start, end, stopped)
    shot(page, "stopped_at_end")

    page.locator("#accept").click()  # label the hit (its window as found)
    page.wait_for_function("document.getElementById('label-state').textContent.startsWith('saved')")
    assert "accepted" in (hit.get_attribute("class") or "")

    # next hits (j): each is selected in turn; an unplayable one (escape.mp4, a copy of a world video outside the
    # indexed folder, scores as its original) says so; the first playable one plays from its start
    hits = page.locator(".hit")
    k = next(i for i in range(1, hits.count()) if "unplayable" not in (hits.nth(i).get_attribute("class") or ""))
    for i in range(1, k + 1):
        page.keyboard.press("j")
        page.wait_for_function(f"document.querySelectorAll('.hit')[{i}].classList.contains('selected')")
        if i < k:
            assert "outside the indexed folder" in page.locator("#now-playing").inner_text()
    second = hits.nth(k)
    s2 = float(second.get_attribute("data-start"))
    page.wait_for_function(f"Math.abs(document.getElementById('player').currentTime - {s2}) < 1.0", timeout=20_000)

    page.keyboard.press("m")  # mark a moment for another sentence while watching
    page.fill("#mark-query", "a moment marked in the browser")
    page.evaluate(f"document.getElementById('player').currentTime = {s2 + 2}")
    page.locator("#mark-start").click()
    page.evaluate(f"document.getElementById('player').currentTime = {s2 + 6}")
    page.locator("#mark-end").click()
    page.locator("#mark-save").click()
    page.wait_for_function("document.getElementById('mark-state').textContent.startsWith('saved')")
    shot(page, "labelled")

    proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
    assert proc.wait(timeout=30) == 0
    assert "Finished server process" in log.read_text()

    out = index.parent / "ann.jsonl"
    res = subprocess.run([sys.executable, "-m", "cli", "labels", "export", "--index", str(index), "--out", str(out)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert res.returncode == 0, res.stderr
    records = {r["query"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records[row["query"]]["relevant_windows"] == [[start, end]]
    assert records[row["query"]]["vid"] == f"{row['vid']}.mp4"
    marked = records["a moment marked in the browser"]["relevant_windows"]
    assert len(marked) == 1 and abs(marked[0][0] - (s2 + 2)) < 0.6 and abs(marked[0][1] - (s2 + 6)) < 0.6
    if os.environ.get("VMR_TEST_ARTIFACTS") is None:
        shutil.copy(out, ARTIFACTS / "page_labels.jsonl")
