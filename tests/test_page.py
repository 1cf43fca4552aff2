"""The `vmr serve` page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

`vmr serve` runs as a child process over a test-world index (h264 mp4, which Chromium plays). The browser types a
query, clicks the first hit and checks the player starts within 1 s of the hit's start and pauses by its end;
j moves to the next hit; a hit whose file is outside the indexed folder shows why instead of a broken
thumbnail; a label accepted and a moment marked in the page come out of `vmr labels export`; Ctrl-C
(SIGINT) stops the server cleanly. Labels bound to what the person saw: Enter + `a` during a search and after a
failed one label nothing under the new sentence; two tabs on one hit (409 shown, one label); Space after a click
on Reject plays/pauses only; delete, undo and the Labels panel. /docs renders with the network blocked; a server
with tokens asks for one once. The address holds the search and the selected hit, and a fresh tab opened on it
restores both; "Download clip" saves an mp4 of the moment's length. Screenshots go to tests/artifacts/ (or $VMR_TEST_ARTIFACTS).

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
import urllib.parse
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
    pytest.mark.slow,  # a server child, a Chromium and a fresh index: the whole suite runs the page, the fast subset does not
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


def run_search(pg, query: str) -> None:
    pg.fill("#q", query)
    pg.press("#q", "Enter")
    pg.wait_for_function("document.getElementById('results-info').textContent.includes('moments for')")


def stored_labels(base: str, query: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/api/labels?query={urllib.parse.quote(query)}", timeout=30) as res:
        return json.loads(res.read())["labels"]


def label_state(pg) -> str:
    return pg.locator("#label-state").inner_text()


def test_a_label_goes_to_the_sentence_its_hit_was_found_for(served, page):
    """Search, type a new sentence, Enter and at once `a`: the old hits are gone while the new search runs, so
    nothing is labelled under the new sentence; once its hits are shown, `a` labels one of THEM, and the label holds
    the sentence shown beside Accept. A search that fails (server unreachable) lists no hits to label."""
    base, index, rows, proc, log = served
    old, new = rows[1]["query"], rows[2]["query"]
    page.goto(base + "/")
    run_search(page, old)
    held = []
    page.route("**/api/search?*", lambda route: held.append(route))  # the next search waits until released
    page.fill("#q", new)
    page.press("#q", "Enter")
    page.keyboard.press("a")
    while not held:
        page.wait_for_timeout(20)
    assert page.locator(".hit").count() == 0 and page.locator("#label-panel").is_hidden()
    held[0].continue_()
    page.unroute("**/api/search?*")
    page.wait_for_function("document.getElementById('results-info').textContent.includes('moments for')")
    assert stored_labels(base, new) == [] and stored_labels(base, old) == []
    assert page.locator("#label-query").inner_text() == f"“{new}”"
    hit = page.locator(".hit").first
    window = [float(hit.get_attribute("data-start")), float(hit.get_attribute("data-end"))]
    page.keyboard.press("a")
    page.wait_for_function("document.getElementById('label-state').textContent.startsWith('labelled accept')")
    label, = stored_labels(base, new)
    assert [label["orig_start"], label["orig_end"]] == window and label["search_id"]

    page.route("**/api/search?*", lambda route: route.abort())  # the server down for the next search
    page.fill("#q", old)
    page.press("#q", "Enter")
    page.wait_for_function("document.getElementById('results-info').textContent.startsWith('search failed')")
    page.keyboard.press("a")
    assert page.locator(".hit").count() == 0
    assert "cannot reach the vmr server" in page.locator("#results-info").inner_text()
    page.unroute("**/api/search?*")
    page.locator("#retry").click()
    page.wait_for_function("document.getElementById('results-info').textContent.includes('moments for')")
    assert stored_labels(base, old) == [] and len(stored_labels(base, new)) == 1
    shot(page, "bound_label")


def test_two_tabs_labelling_one_hit(served, page):
    """Tab A accepts a hit; tab B, opened before, rejects it: B's write is refused (409) and B shows the stored
    accept; B's second press changes that one label. Never two labels for one hit."""
    base, index, rows, proc, log = served
    query = rows[3]["query"]
    other = page.context.browser.new_page(viewport={"width": 1280, "height": 800})
    for pg in (page, other):
        pg.goto(base + "/")
        run_search(pg, query)
    page.keyboard.press("a")
    page.wait_for_function("document.getElementById('label-state').textContent.startsWith('labelled accept')")
    other.keyboard.press("x")
    other.wait_for_function("document.getElementById('label-state').textContent.startsWith('not saved')")
    assert "already holds label" in label_state(other) and "labelled accept" not in label_state(other)
    assert "accepted" in (other.locator(".hit").first.get_attribute("class") or "")
    label, = stored_labels(base, query)
    assert label["verdict"] == "accept"
    other.keyboard.press("x")  # seen now: apply it
    other.wait_for_function("document.getElementById('label-state').textContent.startsWith('labelled reject')")
    again, = stored_labels(base, query)
    assert again["id"] == label["id"] and again["verdict"] == "reject" and again["version"] == 2
    page.keyboard.press("x")  # tab A still holds version 1: refused, and A now shows B's reject
    page.wait_for_function("document.getElementById('label-state').textContent.startsWith('not saved')")
    assert "since you saw it" in label_state(page)
    assert "rejected" in (page.locator(".hit").first.get_attribute("class") or "")
    other.close()


def test_space_after_a_click_plays_and_labels_undo(served, page):
    """After a click on Reject, `j` then Space pauses the video and labels nothing; Delete removes the label, `u`
    brings it back; the Labels panel lists it and its filters hide it."""
    base, index, rows, proc, log = served
    query = rows[4]["query"]
    page.goto(base + "/")
    run_search(page, query)
    page.locator("#reject").click()
    page.wait_for_function("document.getElementById('label-state').textContent.startsWith('labelled reject')")
    page.keyboard.press("j")
    page.wait_for_function("!document.getElementById('player').paused", timeout=20_000)
    page.keyboard.press(" ")
    page.wait_for_function("document.getElementById('player').paused")
    page.wait_for_load_state("networkidle")
    label, = stored_labels(base, query)
    assert label["verdict"] == "reject" and "rejected" not in (page.locator(".hit").nth(1).get_attribute("class") or "")
    page.keyboard.press("k")
    page.keyboard.press("Delete")
    page.wait_for_function("document.getElementById('label-state').textContent.startsWith('not labelled')")
    assert stored_labels(base, query) == []
    page.keyboard.press("u")
    page.wait_for_function("document.getElementById('label-state').textContent.startsWith('undone')")
    assert [lab["id"] for lab in stored_labels(base, query)] == [label["id"]]
    page.locator("#labels-panel summary").click()
    row = page.locator(f"#labels-table tr[data-id='{label['id']}']")
    row.wait_for()
    assert query in row.inner_text() and "reject" in row.inner_text()
    page.select_option("#lf-verdict", "accept")
    assert row.count() == 0
    page.select_option("#lf-verdict", "")
    page.fill("#lf-text", query.upper())
    assert page.locator(f"#labels-table tr[data-id='{label['id']}']").count() == 1
    shot(page, "labels_panel")


def test_api_docs_render_offline(served, page):
    """/docs with every request that leaves localhost aborted (no internet): Swagger UI renders the API from files
    the server itself serves, and asks nothing of any other host."""
    base, index, rows, proc, log = served
    foreign = []

    def only_local(route):
        host = urllib.parse.urlsplit(route.request.url).hostname
        if host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(base + "/docs")
    page.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=30_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/api/search" in paths and "/api/labels/{label_id}" in paths
    assert "vmr" in page.locator(".swagger-ui .info .title").inner_text()
    assert foreign == []
    shot(page, "docs_offline")


def test_the_page_asks_for_the_access_token_once(served, page):
    """A server with tokens (as `vmr serve --host 0.0.0.0` makes): the page asks for the token, refuses a wrong
    one, and after the right one searches; a reload does not ask again (the cookie); the printed ?token= link logs
    a fresh browser in and leaves the token out of the address bar."""
    from server.app import create_app
    from tests.test_server_api import running_server

    base, index, rows, proc, log = served
    app = create_app(str(index), checkpoint=str(WORLD_RERANKER), device="cpu", tokens={"page-token-123": "ana"})
    with running_server(app) as port:
        local = f"http://127.0.0.1:{port}"
        page.goto(local + "/")
        page.wait_for_selector("#login:not([hidden])")
        page.fill("#token", "not-the-token")
        page.press("#token", "Enter")
        page.wait_for_function("document.getElementById('login-state').textContent.includes('not this server')")
        page.fill("#token", "page-token-123")
        page.press("#token", "Enter")
        page.wait_for_function("document.getElementById('login').hidden")
        assert page.locator("#user").inner_text() == "· ana"
        run_search(page, rows[0]["query"])
        assert page.locator(".hit").count() > 0
        page.reload()
        page.wait_for_function("document.getElementById('status').textContent.includes('videos')")
        assert page.locator("#login").is_hidden()
        fresh = page.context.browser.new_page()
        fresh.goto(local + "/?token=page-token-123&q=" + urllib.parse.quote(rows[0]["query"]))
        fresh.wait_for_function("document.getElementById('results-info').textContent.includes('moments for')")
        assert "token" not in fresh.url and fresh.locator("#login").is_hidden()
        fresh.close()


def own_video_rows(index, rows) -> list[dict]:
    """Annotation rows of the world videos whose first hit is served (not the last one's: escape.mp4 copies it)."""
    last = sorted(p.name for p in (index.parent / "videos").glob("world*.mp4"))[-1]
    return [r for r in rows if f"{r['vid']}.mp4" != last]


def address(pg) -> dict:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(pg.url).query))


def test_the_address_holds_the_search_and_the_hit(served, page):
    """The URL follows the search and the selected hit (?q=...&hit=VIDEO:START-END); opening it in a fresh tab runs
    the search, selects that hit (not the first) and seeks the player to its start."""
    base, index, rows, proc, log = served
    query = own_video_rows(index, rows)[0]["query"]
    page.goto(base + "/")
    run_search(page, query)
    assert address(page)["q"] == query
    hits = page.locator(".hit")  # the first playable hit after the first (escape.mp4 is found but not served)
    k = next(i for i in range(1, hits.count()) if "unplayable" not in (hits.nth(i).get_attribute("class") or ""))
    for _ in range(k):
        page.keyboard.press("j")
    page.wait_for_function(f"document.querySelectorAll('.hit')[{k}].classList.contains('selected')")
    second = hits.nth(k)
    start, end = float(second.get_attribute("data-start")), float(second.get_attribute("data-end"))
    shared = address(page)
    assert shared["q"] == query and shared["hit"].split(":")[1] == f"{second.get_attribute('data-start')}-" \
                                                                   f"{second.get_attribute('data-end')}"
    link = page.url
    fresh = page.context.browser.new_page(viewport={"width": 1280, "height": 800})
    fresh.goto(link)
    fresh.wait_for_function("document.querySelectorAll('.hit.selected').length === 1")
    assert fresh.locator("#q").input_value() == query
    selected = fresh.locator(".hit.selected")
    assert selected.get_attribute("data-index") == str(k)
    assert (float(selected.get_attribute("data-start")), float(selected.get_attribute("data-end"))) == (start, end)
    fresh.wait_for_function(f"Math.abs(document.getElementById('player').currentTime - {start}) < 0.6",
                            timeout=20_000)
    assert address(fresh) == shared
    other = own_video_rows(index, rows)[1]["query"]
    run_search(fresh, other)  # a new search: the address follows it and its selected (first) hit
    first = fresh.locator(".hit").first
    assert address(fresh) == {"q": other, "hit": f"{first.get_attribute('data-video')}:"
                                                 f"{first.get_attribute('data-start')}-{first.get_attribute('data-end')}"}
    fresh.close()


def test_download_clip_is_the_moment(served, page, tmp_path):
    """'Download clip' (d) saves the selected moment as an mp4 that decodes to its length (± 0.5 s)."""
    import av

    base, index, rows, proc, log = served
    page.goto(base + "/")
    run_search(page, own_video_rows(index, rows)[2]["query"])
    hit = page.locator(".hit.selected")
    start, end = float(hit.get_attribute("data-start")), float(hit.get_attribute("data-end"))
    with page.expect_download(timeout=60_000) as info:
        page.keyboard.press("d")
    download = info.value
    assert download.suggested_filename.endswith(f"_{start:.1f}-{end:.1f}.mp4")
    out = tmp_path / "clip.mp4"
    download.save_as(str(out))
    with av.open(str(out)) as clip:
        frames = list(clip.decode(clip.streams.video[0]))
    gap = frames[1].time - frames[0].time
    assert abs(frames[-1].time + gap - frames[0].time - (end - start)) <= 0.5


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
    page.wait_for_function("document.getElementById('label-state').textContent.startsWith('labelled accept')")
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
    assert "for “a moment marked in the browser”" in page.locator("#mark-state").inner_text()
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

