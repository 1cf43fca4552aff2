"""`vmr status`: the counts of an index as JSON (docs/design.md) and as text."""
from __future__ import annotations

from store import kinds, transcripts
from store.library import Library
from store.lock import ingest_running


def library_status(index_dir) -> dict:
    """{"videos", "indexed", "failed": [{"path", "error"}], "pending", "clips", "events", "clip_model", ...}."""
    with Library(index_dir, read_only=True) as lib:
        meta = lib.meta()
        videos = lib.videos()
        counts = lib.counts()
        by_video = lib.kinds_by_video()
        with lib.session() as con:
            runs = transcripts.runs(con)
    indexed = [v for v in videos if v["status"] == "indexed"]
    return {
        "videos": len(videos),
        "indexed": len(indexed),
        "failed": [{"path": v["path"], "error": v["error"]} for v in videos if v["status"] == "failed"],
        "pending": len([v for v in videos if v["status"] == "pending"]),
        "clips": int(counts["clips"]),
        "events": int(counts["events"]),
        "hours": round(sum(v["duration"] or 0.0 for v in indexed) / 3600.0, 3),
        "clip_model": meta.get("clip_model"),
        "embed_dim": meta.get("embed_dim"),
        "root": meta.get("root"),
        "schema_version": meta.get("schema_version"),
        "library_id": meta.get("library_id", 0),
        "coarse_kind": kinds.coarse_kind(meta),
        "feature_kinds": {kind: {**record, "videos": sum(kind in held for held in by_video.values())}
                          for kind, record in kinds.feature_kinds(meta).items()},
        "faiss": {k: meta["faiss"].get(k) for k in ("clips_type", "events_type", "n_clips", "n_events")
                  if k in meta["faiss"]},
        "faiss_current": meta["faiss"].get("generation") == meta.get("generation"),
        "channels": channel_status(meta, runs, videos),
        "index": str(index_dir),
        "ingest_running": ingest_running(index_dir),
    }


def channel_status(meta: dict, runs: dict, videos: list[dict]) -> dict:
    """{channel: {model, digest, language, videos, states {state: n}, not_stored [{path, state, reason}]}} of the
    text channels the index records (meta ``channels``; store.transcripts)."""
    paths = {int(v["id"]): v["path"] for v in videos if v["status"] == "indexed"}
    out = {}
    for channel, record in (meta.get("channels") or {}).items():
        mine = {vid: run for (vid, ch), run in runs.items() if ch == channel and vid in paths}
        states: dict[str, int] = {}
        for run in mine.values():
            states[run["state"]] = states.get(run["state"], 0) + 1
        out[channel] = {"model": record.get("model"), "digest": record.get("digest"),
                        "language": record.get("language"), "videos": len(mine), "states": states,
                        "languages": sorted({r["language"] for r in mine.values() if r["language"]}),
                        "not_stored": [{"path": paths[vid], "state": run["state"], "reason": run["reason"]}
                                       for vid, run in sorted(mine.items()) if run["state"] != "ok"]}
    return out


def incomplete_note(info: dict) -> str | None:
    """One line when not every video of the index is settled: an ingest is running, or one stopped early."""
    if not info["pending"]:
        return None
    done = f"{info['indexed']} of {info['videos']} videos indexed ({info['pending']} not yet)"
    if info.get("ingest_running"):
        return f"{done}; an ingest is running"
    return f"{done}; ingest incomplete — re-run `vmr index` to finish"


def describe_status(info: dict) -> str:
    """Human-readable status: counts, the CLIP model, the failed files with their reasons."""
    lines = [
        f"index {info['index']}  (videos from {info['root']})",
        f"  videos {info['videos']}: {info['indexed']} indexed, {len(info['failed'])} failed, {info['pending']} pending",
        f"  clips {info['clips']}, events {info['events']}, {info['hours']:.2f} h of video",
        f"  CLIP {info['clip_model']} ({info['embed_dim']}-d)",
        *(f"  features '{kind}': {r['dim']}-d {r['dtype']} by {r['model']}, {r['videos']} of {info['indexed']} videos"
          + (" (coarse search key)" if kind == info["coarse_kind"] else "")
          for kind, r in info["feature_kinds"].items()),
        f"  FAISS {info['faiss'].get('clips_type', 'none')}" + ("" if info["faiss_current"] else
                                                               " (behind DuckDB: the next `vmr index` rebuilds it)"),
    ]
    for channel, c in info.get("channels", {}).items():
        states = ", ".join(f"{n} {state}" for state, n in sorted(c["states"].items())) or "none yet"
        language = (f", language {c['language']}" + (f" ({', '.join(c['languages'])})" if c["languages"] else "")
                    if c["language"] else "")  # on-screen text records none
        lines.append(f"  channel '{channel}': {c['videos']} of {info['indexed']} videos ({states}) by {c['model']}"
                     + language)
        lines += [f"    {r['path']}: {r['state']}: {r['reason']}" for r in c["not_stored"]]
    note = incomplete_note(info)
    if note:
        lines.append(f"  {note}")
    if info["failed"]:
        lines.append("  failed:")
        lines += [f"    {f['path']}: {f['error']}" for f in info["failed"]]
    return "\n".join(lines)
