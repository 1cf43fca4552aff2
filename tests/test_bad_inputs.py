"""Every `vmr` command against a catalogue of bad inputs, run as a user would: real processes, real signals.

For each case: the CLI contract's exit code (docs/design.md: 1 fatal, 2 usage, 3 some files failed), at most 3
lines on stderr and no traceback, a message that names the file, and nothing stored before is lost (the index's
counts are unchanged and a search still answers). One small good index is built once (world CLIP, 3 generated
videos); a case that damages an index works on a copy.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS, WORLD_RERANKER
from world.videos import make_video

REPO = Path(__file__).resolve().parents[1]
CLIP_ARGS = ["--clip-model", str(WORLD_CLIP_CONFIG), "--clip-pretrained", str(WORLD_CLIP_WEIGHTS)]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DISABLE_USAGE_STATS": "1", "PYTHONPATH": str(REPO),
       "TQDM_DISABLE": "1"}


def vmr(*args, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def error_lines(stderr: str) -> list[str]:
    """stderr lines a person reads (a progress bar's carriage-return redraws count as one line)."""
    return [line.split("\r")[-1] for line in stderr.splitlines() if line.split("\r")[-1].strip()]


def assert_clean_failure(result, code: int, names: str | None = None) -> None:
    lines = error_lines(result.stderr)
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    assert len(lines) <= 3, lines
    if names is not None and code != 0:
        assert names in result.stderr, (names, result.stderr)


# ---------------------------------------------------------------------------------------------- the good world
class Evil:
    """A pickle whose loading would run code (creates a marker file): it must never be unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def good(tmp_path_factory, ray_session):
    """videos/ (3 clips of generated video), index/ built by the ingest, and a catalogue of bad files.

    Built in this process on the session's Ray (a `vmr index` child would start a Ray of its own); the commands
    under test below still run as child processes.
    """
    from indexer.ingest import run_ingest

    base = tmp_path_factory.mktemp("bad_inputs")
    videos = base / "videos"
    for i in range(3):
        make_video(videos / f"v{i}.mp4", duration=4.0)
    index = base / "index"
    summary = run_ingest(str(videos), str(index), clip_model=str(WORLD_CLIP_CONFIG),
                         clip_pretrained=str(WORLD_CLIP_WEIGHTS), device="cpu", progress=False)
    assert not summary.failed and summary.indexed == 3, summary
    files = base / "files"
    files.mkdir()
    (files / "empty.bin").write_bytes(b"")
    (files / "random.bin").write_bytes(os.urandom(4096))
    (files / "a_folder").mkdir()
    (files / "text.json").write_text("this is not json\n")
    whole = WORLD_RERANKER.read_bytes()
    (files / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    marker = base / "PWNED"
    with open(files / "evil.pt", "wb") as f:
        pickle.dump({"model": Evil(str(marker))}, f, protocol=2)
    with open(files / "evil4.pt", "wb") as f:
        pickle.dump({"state": Evil(str(marker))}, f, protocol=4)
    ann = files / "ann.jsonl"
    ann.write_text(json.dumps({"qid": 1, "query": "a red scene", "vid": "v0", "duration": 4.0,
                               "relevant_windows": [[0, 2]]}) + "\n")
    yield {"base": base, "videos": videos, "index": index, "files": files, "marker": marker, "ann": ann,
           "counts": counts(index)}
    assert not marker.exists(), "a malicious pickle ran its code"


def counts(index) -> dict:
    from store.status import library_status

    info = library_status(index)
    return {k: info[k] for k in ("videos", "indexed", "pending", "clips", "events")} | {"failed": len(info["failed"])}


def search_answers(index) -> bool:
    from retriever.search import SearchEngine

    with SearchEngine(index, rerank=False, device="cpu") as engine:
        return len(engine.search("a red scene", top_k=3).moments) > 0


def copy_index(good, tmp_path, videos: Path | None = None) -> Path:
    """A copy of the good index (its meta root moved to ``videos`` when given: a copy of the video folder)."""
    dest = tmp_path / "index"
    shutil.copytree(good["index"], dest)
    if videos is not None:
        con = duckdb.connect(str(dest / "library.duckdb"))
        con.execute("UPDATE meta SET value = ? WHERE key = 'root'", [json.dumps(str(videos))])
        con.close()
    return dest


# ------------------------------------------------------------------------------ catalogue: (argv, code, names)
def F(good, name):  # noqa: N802 - a bad file of the catalogue
    return good["files"] / name


BAD_WEIGHTS = ["empty.bin", "random.bin", "truncated.pt", "evil.pt", "evil4.pt"]

CASES = {
    # vmr search
    **{f"search --checkpoint {w}": (lambda g, w=w: ["search", "red", "--index", g["index"], "--checkpoint", F(g, w)],
                                    1, w) for w in BAD_WEIGHTS},
    "search --checkpoint missing": (lambda g: ["search", "red", "--index", g["index"], "--checkpoint",
                                               g["files"] / "nope.pt"], 1, "nope.pt"),
    "search --checkpoint folder": (lambda g: ["search", "red", "--index", g["index"], "--checkpoint",
                                              F(g, "a_folder")], 1, "a_folder"),
    "search --index missing": (lambda g: ["search", "red", "--index", g["files"] / "nope"], 1, "nope"),
    "search --index file": (lambda g: ["search", "red", "--index", F(g, "random.bin")], 1, "random.bin"),
    "search --index empty folder": (lambda g: ["search", "red", "--index", F(g, "a_folder")], 1, "a_folder"),
    "search empty query": (lambda g: ["search", " ", "--index", g["index"]], 2, None),
    # vmr status
    "status --index missing": (lambda g: ["status", "--index", g["files"] / "nope"], 1, "nope"),
    "status --index file": (lambda g: ["status", "--index", F(g, "empty.bin")], 1, "empty.bin"),
    # vmr index
    "index DIR missing": (lambda g: ["index", g["files"] / "nope", "--index", g["base"] / "new1"], 2, "nope"),
    "index DIR is a file": (lambda g: ["index", F(g, "random.bin"), "--index", g["base"] / "new2"], 2, "random.bin"),
    "index DIR empty": (lambda g: ["index", F(g, "a_folder"), "--index", g["base"] / "new3", *CLIP_ARGS], 1,
                        "a_folder"),
    "index --index file": (lambda g: ["index", g["videos"], "--index", F(g, "random.bin")], 1, "random.bin"),
    **{f"index --clip-pretrained {w}": (lambda g, w=w: ["index", g["videos"], "--index", g["base"] / f"new_{w}",
                                                        "--clip-model", WORLD_CLIP_CONFIG, "--clip-pretrained",
                                                        F(g, w)], 1, w) for w in BAD_WEIGHTS},
    "index --clip-pretrained folder": (lambda g: ["index", g["videos"], "--index", g["base"] / "new4",
                                                  "--clip-model", WORLD_CLIP_CONFIG, "--clip-pretrained",
                                                  F(g, "a_folder")], 1, "a_folder"),
    "index --clip-model missing": (lambda g: ["index", g["videos"], "--index", g["base"] / "new5", "--clip-model",
                                              g["files"] / "nope.json"], 1, "nope.json"),
    "index --clip-model not json": (lambda g: ["index", g["videos"], "--index", g["base"] / "new6", "--clip-model",
                                               F(g, "text.json")], 1, "text.json"),
    "index --reranker random": (lambda g: ["index", g["videos"], "--index", g["index"], "--reranker",
                                           F(g, "random.bin")], 1, "random.bin"),
    "index --reranker evil": (lambda g: ["index", g["videos"], "--index", g["index"], "--reranker",
                                         F(g, "evil.pt")], 1, "evil.pt"),
    # vmr train
    "train --train missing": (lambda g: ["train", "--train", g["files"] / "nope.jsonl", "--index", g["index"],
                                         "--out", g["base"] / "o.pt"], 2, "nope.jsonl"),
    "train --train folder": (lambda g: ["train", "--train", F(g, "a_folder"), "--index", g["index"], "--out",
                                        g["base"] / "o.pt"], 2, "a_folder"),
    "train --train random": (lambda g: ["train", "--train", F(g, "random.bin"), "--index", g["index"], "--out",
                                        g["base"] / "o.pt", "--llm-layers", "0:0"], 1, "random.bin"),
    "train --train empty": (lambda g: ["train", "--train", F(g, "empty.bin"), "--index", g["index"], "--out",
                                       g["base"] / "o.pt", "--llm-layers", "0:0"], 1, "empty.bin"),
    "train --resume evil": (lambda g: ["train", "--train", g["ann"], "--index", g["index"], "--out",
                                       g["base"] / "o.pt", "--resume", F(g, "evil.pt")], 1, "evil.pt"),
    "train --config random": (lambda g: ["train", "--train", g["ann"], "--index", g["index"], "--out",
                                         g["base"] / "o.pt", "--config", F(g, "random.bin")], 1, "random.bin"),
    "train --llm random without size": (lambda g: ["train", "--train", g["ann"], "--index", g["index"], "--out",
                                                   g["base"] / "o.pt", "--llm", "random"], 2, "llm_dim"),
    "train --index file": (lambda g: ["train", "--train", g["ann"], "--index", F(g, "random.bin"), "--out",
                                      g["base"] / "o.pt"], 2, "random.bin"),
    # vmr predict
    **{f"predict --checkpoint {w}": (lambda g, w=w: ["predict", "--checkpoint", F(g, w), "--index", g["index"],
                                                     "--annotations", g["ann"], "--out", g["base"] / "p.jsonl"],
                                     1, w) for w in ("empty.bin", "random.bin", "evil4.pt")},
    "predict --annotations random": (lambda g: ["predict", "--checkpoint", WORLD_RERANKER, "--index", g["index"],
                                                "--annotations", F(g, "random.bin"), "--out",
                                                g["base"] / "p.jsonl"], 1, "random.bin"),
    "predict --out folder": (lambda g: ["predict", "--checkpoint", WORLD_RERANKER, "--index", g["index"],
                                        "--annotations", g["ann"], "--out", F(g, "a_folder")], 2, "a_folder"),
    # vmr eval
    "eval --submission random": (lambda g: ["eval", "--submission", F(g, "random.bin"), "--gt", g["ann"]], 1,
                                 "random.bin"),
    "eval --gt empty": (lambda g: ["eval", "--submission", g["ann"], "--gt", F(g, "empty.bin")], 1, "empty.bin"),
    # vmr convert-checkpoint
    **{f"convert-checkpoint {w}": (lambda g, w=w: ["convert-checkpoint", F(g, w), g["base"] / "c.pt"], 1, w)
       for w in ("empty.bin", "random.bin", "truncated.pt", "evil.pt")},
    "convert-checkpoint OUT folder": (lambda g: ["convert-checkpoint", WORLD_RERANKER, F(g, "a_folder")], 2,
                                      "a_folder"),
    # vmr labels export, serve, demo
    "labels export --index missing": (lambda g: ["labels", "export", "--index", g["files"] / "nope", "--out",
                                                 g["base"] / "l.jsonl"], 2, "nope"),
    "labels export --out folder": (lambda g: ["labels", "export", "--index", g["index"], "--out",
                                              F(g, "a_folder")], 2, "a_folder"),
    "serve --index file": (lambda g: ["serve", "--index", F(g, "random.bin")], 2, "random.bin"),
    "serve --checkpoint random": (lambda g: ["serve", "--index", g["index"], "--checkpoint", F(g, "random.bin"),
                                             "--port", "1"], 1, "random.bin"),
    "serve --help": (lambda g: ["serve", "--help"], 0, None),
    "demo --help": (lambda g: ["demo", "--help"], 0, None),
}


# The fast subset (-m "not slow") runs one or two cases of each command; the whole suite runs them all.
FAST_CASES = {"search --checkpoint evil.pt", "index DIR missing", "eval --gt empty", "convert-checkpoint evil.pt",
              "demo --help"}
assert FAST_CASES <= set(CASES)


@pytest.mark.parametrize("case", [case if case in FAST_CASES else pytest.param(case, marks=pytest.mark.slow)
                                  for case in sorted(CASES)])
def test_bad_argument(good, case):
    make_argv, code, names = CASES[case]
    result = vmr(*make_argv(good))
    assert_clean_failure(result, code, names)
    if code == 1:  # one `error:` line, the last thing printed
        assert error_lines(result.stderr)[-1].startswith("error: ")
    assert counts(good["index"]) == good["counts"]
    assert not any((good["base"] / name).exists() for name in ("new3", "new4", "new5", "new6")), \
        "a failed first run left an index behind"


# --------------------------------------------------------------------------------- damaged index directories
def _damage(kind: str, index: Path) -> None:
    if kind == "duckdb random bytes":
        (index / "library.duckdb").write_bytes(os.urandom(8192))
    elif kind == "duckdb truncated":
        data = (index / "library.duckdb").read_bytes()
        (index / "library.duckdb").write_bytes(data[: len(data) // 3])
    elif kind == "faiss missing":
        for name in ("clips.faiss", "events.faiss"):
            (index / name).unlink()
    elif kind == "faiss truncated":
        for name in ("clips.faiss", "events.faiss"):
            data = (index / name).read_bytes()
            (index / name).write_bytes(data[: len(data) // 2])
    elif kind == "faiss.json random bytes":
        (index / "faiss.json").write_bytes(os.urandom(64))


@pytest.mark.parametrize("kind", ["duckdb random bytes", pytest.param("duckdb truncated", marks=pytest.mark.slow)])
@pytest.mark.parametrize("command", ["search", *(pytest.param(c, marks=pytest.mark.slow)
                                                 for c in ("status", "labels", "index"))])
def test_corrupt_duckdb(good, tmp_path, kind, command):
    index = copy_index(good, tmp_path)
    _damage(kind, index)
    argv = {"search": ["search", "red", "--index", index], "status": ["status", "--index", index],
            "labels": ["labels", "export", "--index", index, "--out", tmp_path / "l.jsonl"],
            "index": ["index", good["videos"], "--index", index]}[command]
    result = vmr(*argv)
    assert_clean_failure(result, 1, "library.duckdb")
    assert "damaged" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["faiss missing", "faiss truncated", "faiss.json random bytes"])
def test_damaged_faiss_still_answers_and_is_repaired(good, tmp_path, kind):
    """DuckDB is the truth: search answers from it, and `vmr index` rebuilds the FAISS files."""
    index = copy_index(good, tmp_path)
    _damage(kind, index)
    result = vmr("search", "a red scene", "--index", index, "--json")
    assert_clean_failure(result, 0)
    assert json.loads(result.stdout)
    assert counts(index) == good["counts"]
    result = vmr("index", "--rebuild-faiss", good["videos"], "--index", index)
    assert_clean_failure(result, 0)
    assert search_answers(index)


@pytest.mark.slow
def test_read_only_index(good, tmp_path):
    """An index folder the user cannot write: `vmr index` refuses in one line; status and search still read it.
    As root (who writes anywhere) the folder is made immutable (chattr +i) instead of read-only."""
    index = shutil.copytree(good["index"], tmp_path / "index")
    paths = [*index.iterdir(), index]
    if os.geteuid() == 0:
        lock = ["chattr", "+i", *map(str, paths)]
        unlock = ["chattr", "-i", *map(str, paths)]
        if subprocess.run(lock, capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without chattr +i: cannot make a folder read-only")
    else:
        for path in paths:
            os.chmod(path, 0o555 if path.is_dir() else 0o444)
        unlock = None
    try:
        result = vmr("index", good["videos"], "--index", index)
        assert_clean_failure(result, 1, str(index))
        assert "write" in result.stderr
        result = vmr("status", "--index", index, "--json")
        assert_clean_failure(result, 0)
        assert json.loads(result.stdout)["indexed"] == good["counts"]["indexed"]
        result = vmr("search", "a red scene", "--index", index, "--json")
        assert_clean_failure(result, 0)
        assert json.loads(result.stdout)
    finally:
        if unlock:
            subprocess.run(unlock, check=True)
        else:
            for path in paths:
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
    assert counts(index) == good["counts"]


# ----------------------------------------------------------------------------------- ingest runs: real Ray
def _own_world(good, tmp_path, extra: int, seconds: float = 4.0) -> tuple[Path, Path]:
    """A copy of the videos (+ ``extra`` new ones) and of the index pointing at it."""
    videos = tmp_path / "videos"
    shutil.copytree(good["videos"], videos)
    for i in range(extra):
        make_video(videos / f"new{i}.mp4", duration=seconds)
    return videos, copy_index(good, tmp_path, videos)


def _wait_for_pending(index: Path, proc, timeout: float = 120.0) -> None:
    """Until the run has planned its work (new rows 'pending'); Ray starts after that, decoding later still."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            con = duckdb.connect(str(index / "library.duckdb"), read_only=True)
            try:
                if con.execute("SELECT count(*) FROM videos WHERE status = 'pending'").fetchone()[0]:
                    return
            finally:
                con.close()
        except duckdb.Error:
            pass  # the writer holds the file this instant
        time.sleep(0.1)
    raise AssertionError("the ingest never planned its work")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_ingest_keeps_what_was_stored(good, tmp_path, signum):
    """Ctrl-C / SIGTERM mid-run: one line, exit 1; the old videos stay; status says the ingest is incomplete; a
    second `vmr index` meanwhile is refused; the next run finishes the job."""
    # Long new videos (120 clips each at 5 fps): the run is still busy when the signal lands. While the second
    # `vmr index` below is refused, the first is stopped (SIGSTOP): under load that refusal took long enough for
    # the first run to finish, and the signal then found nothing to interrupt (this test used to skip then).
    videos, index = _own_world(good, tmp_path, extra=2, seconds=240.0)
    # Ctrl-C reaches a foreground `vmr index`: its SIGINT is at the default even when this test runs under a shell
    # that started it in the background (which ignores SIGINT, and an ignored signal stays ignored across exec)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "index", str(videos), "--index", str(index)], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_pending(index, proc)
        if signum == signal.SIGINT:
            proc.send_signal(signal.SIGSTOP)  # holds the index lock, cannot progress
            try:
                second = vmr("index", videos, "--index", index)
            finally:
                proc.send_signal(signal.SIGCONT)
            assert_clean_failure(second, 1, "another `vmr index`")
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert proc.returncode != 0, "the ingest finished before the signal landed"
    assert_clean_failure(result, 1, "re-run `vmr index")
    after = counts(index)
    assert after["indexed"] >= good["counts"]["indexed"] and after["videos"] == good["counts"]["videos"] + 2
    status = vmr("status", "--index", index)
    assert status.returncode == 0
    if after["pending"]:
        assert "ingest incomplete" in status.stdout
    assert search_answers(index)
    again = vmr("index", videos, "--index", index)
    assert_clean_failure(again, 0)
    assert counts(index)["indexed"] == good["counts"]["indexed"] + 2


@pytest.mark.slow
def test_files_changing_during_ingest(good, tmp_path):
    """A still image named .mp4, and files deleted or replaced after the run planned them: recorded as failed or
    re-read, exit 3, the other videos indexed, the old ones kept; the next run settles the rest."""
    videos, index = _own_world(good, tmp_path, extra=2)
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(videos / "still.png")
    os.replace(videos / "still.png", videos / "still.mp4")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "index", str(videos), "--index", str(index)], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_pending(index, proc)
        (videos / "new0.mp4").unlink()  # deleted while being indexed
        (videos / "new1.mp4").write_bytes(os.urandom(2048))  # replaced by garbage
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    assert result.returncode == 3, (stdout, stderr[-2000:])
    assert "still.mp4: a still image (png), not a video" in stdout
    after = counts(index)
    assert after["indexed"] == good["counts"]["indexed"] and after["failed"] == 3
    assert search_answers(index)
    again = vmr("index", videos, "--index", index)
    assert again.returncode == 3 and "Traceback" not in again.stderr
    assert counts(index)["videos"] == good["counts"]["videos"] + 2  # new0 gone, new1 + still stay failed
