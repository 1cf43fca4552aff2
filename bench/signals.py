"""Stop-signal stress: `vmr index` stopped by SIGINT or SIGTERM at random delays after it planned its work.

    python -m bench.signals [--runs 10] [--seed 0] [--max-delay 5] [--load 1] [--out bench/results]

For each signal, ``--runs`` runs: a copy of a small indexed library gains two long new videos; `vmr index` starts
(as a user runs it: a child process, its SIGINT at the default); once its new rows are 'pending' (it planned), the
signal lands after a uniform random delay in [0, max-delay] s, while ``--load`` busy-loop processes compete for
the cores. A run is clean when it exits 1, prints the one-line "interrupted: ..." message and nothing else on
stderr (no traceback, no "Exception ignored"), and the next `vmr index` resumes it to exactly the content of a
run that was never stopped (every video row, clip and event; vectors to 1e-5, CLIP runs in other batches) with
its FAISS files current. Writes OUT/signals.json (one row a run) and OUT/signals.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS
from world.videos import make_video

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DISABLE_USAGE_STATS": "1", "PYTHONPATH": str(ROOT),
       "TQDM_DISABLE": "1"}
CLIP_ARGS = ["--clip-model", str(WORLD_CLIP_CONFIG), "--clip-pretrained", str(WORLD_CLIP_WEIGHTS)]
LONG_SECONDS = 240.0  # the new videos: the run is still busy seconds after Ray starts


def vmr(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def make_world(base: Path) -> tuple[Path, Path]:
    """videos/ (3 short videos indexed into index/, then 2 long new ones) and that index."""
    videos, index = base / "videos", base / "index"
    for i in range(3):
        make_video(videos / f"v{i}.mp4", duration=4.0)
    done = vmr("index", videos, "--index", index, *CLIP_ARGS)
    if done.returncode != 0:
        raise SystemExit(f"building the library failed: {done.stderr[-2000:]}")
    for i in range(2):
        make_video(videos / f"new{i}.mp4", duration=LONG_SECONDS)
    return videos, index


def copy_world(videos: Path, index: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of the folder and the index, the index's root moved to the copy (as the tests' copy_index)."""
    shutil.copytree(videos, dest / "videos", copy_function=shutil.copy2)
    shutil.copytree(index, dest / "index")
    con = duckdb.connect(str(dest / "index" / "library.duckdb"))
    try:
        con.execute("UPDATE meta SET value = ? WHERE key = 'root'", [json.dumps(str(dest / "videos"))])
    finally:
        con.close()
    return dest / "videos", dest / "index"


def content(index: Path) -> dict:
    """What an index holds, for comparing two indexes of the same folder (ids, rows, vectors)."""
    con = duckdb.connect(str(index / "library.duckdb"), read_only=True)
    try:
        out = {"videos": con.execute("SELECT id, path, status, n_clips, n_events, round(duration, 3) FROM videos "
                                     "ORDER BY id").fetchall()}
        for table in ("clips", "events"):
            rows = con.execute(f"SELECT * FROM {table} ORDER BY video_id, idx").fetchall()
            out[table] = [row[:-1] for row in rows]
            out[table + "_vectors"] = np.array([row[-1] for row in rows], dtype=np.float32)
        generation = json.loads(con.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
    finally:
        con.close()
    with open(index / "faiss.json", encoding="utf-8") as f:
        state = json.load(f)
    out["faiss_current"] = (state.get("generation") == generation and state.get("n_clips") == len(out["clips"])
                            and state.get("n_events") == len(out["events"]))
    return out


def same_content(a: dict, b: dict) -> bool:
    return (a["videos"] == b["videos"] and a["clips"] == b["clips"] and a["events"] == b["events"]
            and all(a[k].shape == b[k].shape and np.allclose(a[k], b[k], atol=1e-5)
                    for k in ("clips_vectors", "events_vectors")))


def wait_for_planning(index: Path, proc, timeout: float = 180.0) -> bool:
    """Until the run's new rows are 'pending'; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            con = duckdb.connect(str(index / "library.duckdb"), read_only=True)
            try:
                if con.execute("SELECT count(*) FROM videos WHERE status = 'pending'").fetchone()[0]:
                    return True
            finally:
                con.close()
        except duckdb.Error:
            pass  # the writer holds the file this instant
        time.sleep(0.05)
    return False


def one_run(videos: Path, index: Path, signum: int, delay: float, clean: dict) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "cli", "index", str(videos), "--index", str(index)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    planned = wait_for_planning(index, proc)
    time.sleep(delay)
    landed_running = proc.poll() is None
    if landed_running:
        proc.send_signal(signum)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    lines = [line for line in stderr.splitlines() if line.strip()]
    resumed = vmr("index", videos, "--index", index)
    after = content(index)
    row = {"signal": signal.Signals(signum).name, "delay_s": round(delay, 3), "planned": planned,
           "landed_while_running": landed_running, "exit": proc.returncode, "stderr_lines": len(lines),
           "message": lines[-1][:200] if lines else "",
           "traceback": any(m in stdout + stderr for m in ("Traceback", "Exception ignored")),
           "resume_exit": resumed.returncode, "same_as_clean": same_content(after, clean),
           "faiss_current": after["faiss_current"]}
    row["clean"] = (row["exit"] == 1 and len(lines) == 1 and lines[0].startswith("error: interrupted:")
                    and not row["traceback"] and row["resume_exit"] == 0 and row["same_as_clean"]
                    and row["faiss_current"])
    if not row["clean"]:
        row["stderr_tail"] = lines[-12:]  # what to read first when a run is not clean
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.signals", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs per signal (SIGINT, SIGTERM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=5.0, help="seconds after planning, at most")
    parser.add_argument("--load", type=int, default=1, help="busy-loop processes beside each run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    trials = [(s, rng.uniform(0.0, args.max_delay)) for s in (signal.SIGINT, signal.SIGTERM)
              for _ in range(args.runs)]
    rng.shuffle(trials)
    rows, t0 = [], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmr-signals-") as tmp:
        videos, index = make_world(Path(tmp) / "world")
        ref_videos, ref_index = copy_world(videos, index, Path(tmp) / "clean")
        first = vmr("index", ref_videos, "--index", ref_index)
        if first.returncode != 0:
            raise SystemExit(f"the clean run failed: {first.stderr[-2000:]}")
        clean = content(ref_index)
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
        try:
            for i, (signum, delay) in enumerate(trials):
                run_videos, run_index = copy_world(videos, index, Path(tmp) / f"run{i}")
                row = one_run(run_videos, run_index, signum, delay, clean)
                row["load_1min"] = round(os.getloadavg()[0], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_results(rows, len(trials), args, t0)  # after every run: a bench stopped early keeps its rows
                shutil.rmtree(Path(tmp) / f"run{i}", ignore_errors=True)
        finally:
            for burner in burners:
                burner.kill()
    clean_runs = sum(r["clean"] for r in rows)
    print(f"{clean_runs} of {len(rows)} runs clean -> {os.path.join(args.out, 'signals.md')}")
    return 0 if clean_runs == len(rows) else 1


def write_results(rows: list[dict], planned: int, args, t0: float) -> None:
    os.makedirs(args.out, exist_ok=True)
    machine = {"cpu_count": os.cpu_count(), "processor": _cpu_name(), "python": platform.python_version(),
               "load_processes": args.load, "minutes": round((time.monotonic() - t0) / 60, 1)}
    with open(os.path.join(args.out, "signals.json"), "w", encoding="utf-8") as f:
        json.dump({"machine": machine, "args": vars(args), "planned_runs": planned, "runs": rows}, f, indent=1)
    with open(os.path.join(args.out, "signals.md"), "w", encoding="utf-8") as f:
        f.write(report(rows, planned, machine, args))


def report(rows: list[dict], planned: int, machine: dict, args) -> str:
    lines = ["# Stop signals during `vmr index`", "",
             f"`python -m bench.signals --runs {args.runs} --seed {args.seed} --max-delay {args.max_delay} "
             f"--load {args.load}`: {machine['cpu_count']} CPUs ({machine['processor']}), {args.load} busy-loop "
             f"process(es) beside each run, {machine['minutes']} min in all.", "",
             f"**{sum(r['clean'] for r in rows)} of {len(rows)} runs clean** (exit 1, the one-line message only, no "
             "traceback, resumed to the never-stopped run's content with FAISS current)"
             + (f"; {len(rows)} of the {planned} planned runs done when the bench was stopped." if len(rows) < planned
                else "."), "",
             "| signal | delay after planning (s) | exit | stderr lines | traceback | resumed = clean run | "
             "FAISS current | load (1 min) |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["signal"], r["delay_s"])):
        lines.append(f"| {r['signal']} | {r['delay_s']:.2f} | {r['exit']} | {r['stderr_lines']} | "
                     f"{'yes' if r['traceback'] else 'no'} | {'yes' if r['same_as_clean'] else 'NO'} | "
                     f"{'yes' if r['faiss_current'] else 'NO'} | {r['load_1min']} |")
    messages = sorted({r["message"].split(";")[0] for r in rows})
    lines += ["", "Messages seen (up to the first ';'):", ""] + [f"- `{m}`" for m in messages]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
