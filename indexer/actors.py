"""The model actors of an ingest run (CLIP, SlowFast): starting them, and the queue of frames each kind's actors take.

Both kinds go the same way: decoded frames wait in a Stage's queue by object reference, a batch goes to the least
loaded actor, at most ACTOR_QUEUE calls an actor, and a failed call ends the run in one line.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os

import numpy as np

from store.errors import VmrError

ACTOR_QUEUE = 2  # model calls in flight per actor


class Stage:
    """The actors of one model (CLIP or SlowFast) and the frames queued for them.

    Items are (video, first_clip, frames ref, count); ``embed`` sends up to ``batch`` counted units to the least
    loaded actor (a smaller batch when an actor idles or nothing more is decoding); ``done(ref)`` returns the
    [(video, first_clip, vectors)] of a finished call.
    """

    def __init__(self, name: str, actors: list, batch: int):
        self.name, self.actors, self.batch = name, actors, batch
        self.queue = collections.deque()
        self.running = {}  # result ref -> (actor index, [(video, first_clip)])
        self.load = [0] * len(actors)

    def embed(self, decoding: bool) -> None:
        queued = sum(n for *_, n in self.queue)
        while self.queue and (queued >= self.batch or min(self.load) == 0 or not decoding):
            actor = int(np.argmin(self.load))
            if self.load[actor] >= ACTOR_QUEUE:
                break
            batch, count = [], 0
            while self.queue and count < self.batch:
                item = self.queue.popleft()
                batch.append(item)
                count += item[3]
            queued -= count
            ref = self.actors[actor].embed.remote(*[item[2] for item in batch])
            self.running[ref] = (actor, [(item[0], item[1]) for item in batch])
            self.load[actor] += 1

    def done(self, ray, ref) -> list:
        actor, items = self.running.pop(ref)
        self.load[actor] -= 1
        try:
            results = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - Ray already restarted the actor and retried: give up in one line
            raise VmrError(f"{self.name} worker failed: {first_line(err)}") from None
        return [(video, first, vecs) for (video, first), vecs in zip(items, results)]


def file_stamp(path: str | None) -> list:
    """Size and mtime of a weights file: a replaced file is a new model (actors are reused by their tag)."""
    try:
        st = os.stat(path)
        return [st.st_size, st.st_mtime]
    except (OSError, TypeError):
        return []


def launch_actors(ray, worker_cls, name: str, n: int, options: dict, args: tuple, tag: list) -> tuple[list, list]:
    """Start (or join: named actors) ``n`` actors of ``worker_cls(*args)``; returns (actors, what each loaded)."""
    actor_cls = ray.remote(max_restarts=4, max_task_retries=4, **options)(worker_cls)
    # Named actors: another ingest on the same cluster with the same model (a second `vmr index` joined with
    # --ray-address) reuses the loaded model instead of loading its own.
    digest = hashlib.sha1(json.dumps(tag, default=str).encode()).hexdigest()[:12]
    actors = [actor_cls.options(name=f"vmr-{name}-{digest}-{i}", namespace="vmr", get_if_exists=True).remote(*args)
              for i in range(n)]
    try:
        described = ray.get([a.describe.remote() for a in actors])
        error = next((d["error"] for d in described if d.get("error")), None)
    except Exception as err:  # noqa: BLE001 - the actor died (out of memory, lost node): its error's last line
        error = f"{name} worker failed to start: {first_line(err)}"
    if error is not None:
        for actor in actors:
            ray.kill(actor)
        raise VmrError(error)
    return actors, described


def first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # Ray wraps the worker's exception; its last line is usually "SomeError: message".
    for line in reversed(lines):
        if "Error" in line and ":" in line:
            return line[:300]
    return (lines[0] if lines else type(err).__name__)[:300]
