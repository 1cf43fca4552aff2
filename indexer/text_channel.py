"""The step of an ingest that adds one text channel (speech, on-screen text) to the indexed videos, after the visual
one: the same loop for every text channel, so that each channel module only says how it reads one video.

    videos the channel has not settled --Ray actors of ``step.worker`` (each reads one video at a time:
    ``read(path)``)--> {state, reason, language, seconds, <step.media_key>, segments} --> ONE transaction per
    video (its segments + run row, store.transcripts) --> the text index (store.text_index) synced after each
    commit batch and at the end.

Kill-safe and incremental by construction: a video without a run row of the channel is what the next run reads.
Meta ``channels.<name>`` records what made the channel's text (``step.record``); a run with another model
(another digest) over an index that already holds that channel's text is refused.
"""
from __future__ import annotations

import collections
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from tqdm import tqdm

from store import db, text_index, transcripts
from store.errors import VmrError

ACTOR_QUEUE = 2  # videos in flight per actor
SYNC_SECONDS = 2.0  # the text index follows DuckDB at most this often during a run


@dataclass(frozen=True)
class ChannelStep:
    """One text channel's ingest step.

    name: the channel ("speech" | "ocr"); worker: the actor class, built as ``worker(*args, threads)``, with
    ``read(path) -> result dict`` (module docstring); record: meta ``channels.<name>`` (model, digest, ...);
    remedy: what the refusal of another model tells the user to do, ``{model}`` the recorded one; media_key: the
    result's key of the seconds of media read (summed into the summary); cores_per_actor: cores one actor's model scales to; check: (ray, actor) -> None, raises VmrError for a setting
    the loaded model refuses (run before anything is recorded)."""
    name: str
    worker: type
    args: tuple
    record: dict
    remedy: str
    media_key: str
    cores_per_actor: int = 8
    check: Callable | None = field(default=None, compare=False)


def sha256_of(path: str) -> str:
    """SHA-256 hex digest of a file (a model's weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def record_channel(lib, step: ChannelStep) -> None:
    """Write meta ``channels.<name>``, refusing an index whose text of that channel another model made."""
    with lib.session() as con:
        meta = db.read_meta(con)
        held = (meta.get("channels") or {}).get(step.name)
        if held and held.get("digest") != step.record["digest"] and transcripts.settled(con, step.name):
            raise VmrError(f"index {lib.index_dir} holds {step.name} made by {held.get('model')}; you asked for "
                           f"{step.record['model']}: {step.remedy.format(model=held.get('model'))}, or give a new "
                           "--index")
        if held != step.record:
            db.write_meta(con, {"channels": {**(meta.get("channels") or {}), step.name: step.record}})


def read_videos(lib, root: str, step: ChannelStep, stops, ray, progress: bool = True) -> dict:
    """Read every indexed video ``step``'s channel has not settled; returns {videos, <media_key>, seconds, states
    {state: n}}. ``ray``: an initialised Ray module. Stops (KeyboardInterrupt) at a safe point after a stop signal:
    what was committed stays."""
    with lib.session() as con:
        done = transcripts.settled(con, step.name)
    todo = collections.deque(v for v in lib.videos(status="indexed") if int(v["id"]) not in done)
    summary = {"videos": 0, step.media_key: 0.0, "seconds": 0.0, "states": {}}
    t0 = time.monotonic()
    if not todo:
        record_channel(lib, step)  # refuses another model even when there is nothing new
    else:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_actors = max(1, cpus // step.cores_per_actor)
        actor_cls = ray.remote(num_cpus=min(1, cpus), max_restarts=2, max_task_retries=2)(step.worker)
        actors = [actor_cls.remote(*step.args, max(1, cpus // n_actors)) for _ in range(n_actors)]
        try:
            if step.check is not None:
                step.check(ray, actors[0])  # before the record: a refused setting is never recorded
            record_channel(lib, step)
            _run(lib, root, step, todo, actors, stops, ray, summary, progress)
        finally:
            for actor in actors:
                ray.kill(actor)
    summary["seconds"] = time.monotonic() - t0
    sync_text_index(lib)
    return summary


def _run(lib, root, step, todo, actors, stops, ray, summary, progress) -> None:
    running = {}  # result ref -> (video row, actor index)
    load = [0] * len(actors)
    bar = tqdm(total=len(todo), unit="video", desc=step.name, disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    last_sync = time.monotonic()
    while todo or running:
        stops.check()
        while todo and min(load) < ACTOR_QUEUE:
            i = load.index(min(load))
            video = todo.popleft()
            running[actors[i].read.remote(os.path.join(root, video["path"]))] = (video, i)
            load[i] += 1
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
        for ref in ready:
            video, i = running.pop(ref)
            load[i] -= 1
            try:
                result = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - the actor died on this file even after retries
                result = {"state": "failed", "reason": f"{step.name} worker lost: {' '.join(str(err).split())[-150:]}",
                          "segments": [], "seconds": 0.0}
            _commit(lib, step.name, video, result)
            summary["videos"] += 1
            summary[step.media_key] += result.get(step.media_key) or 0.0
            summary["states"][result["state"]] = summary["states"].get(result["state"], 0) + 1
            bar.update(1)
        if ready and time.monotonic() - last_sync >= SYNC_SECONDS:
            sync_text_index(lib)
            last_sync = time.monotonic()
    bar.close()


def _commit(lib, channel: str, video: dict, result: dict) -> None:
    """One video's text and run row, in one transaction; skipped if the video left or changed meanwhile."""
    with lib.session() as con:
        row = lib.videos_by_id([video["id"]]).get(int(video["id"]))
        if row is None or row["status"] != "indexed":
            return
        run = {k: result.get(k) for k in ("state", "reason", "language", "seconds")}
        transcripts.commit(con, int(video["id"]), channel, run, result["segments"])


def sync_text_index(lib) -> dict:
    """The text index in line with the DuckDB segments (store.text_index); {} without the tantivy package."""
    if not text_index.available():
        return {}
    with lib.session() as con:
        return text_index.TextIndex(lib.index_dir).sync(con)


def run_steps(lib, root: str, steps: list[ChannelStep], stops, ray_address: str | None,
              progress: bool = True) -> dict[str, dict]:
    """The text channels' steps of an ingest, in order: {channel: read_videos' summary}. No step: the text index
    still follows the deletions this run made. Starts Ray unless it runs."""
    if not steps:
        sync_text_index(lib)
        return {}
    from indexer.pipeline import start_ray  # lazy: Ray, only when there is text to read

    ray, started = start_ray(ray_address, stops)
    try:
        return {step.name: read_videos(lib, root, step, stops, ray, progress) for step in steps}
    finally:
        if started:
            ray.shutdown()


__all__ = ["ChannelStep", "sha256_of", "record_channel", "read_videos", "sync_text_index", "run_steps"]
