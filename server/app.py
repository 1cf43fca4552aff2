"""`vmr serve`: the JSON API (OpenAPI at /docs) and the page (server/static) over one index.

    GET  /api/status                      index counts, ingest progress (+ the incomplete-ingest note), labels, model
    GET  /api/search?q=...&top_k=10[&channel=speech]  moments as `vmr search --json` + rank, duration, thumbnail_url, video_url,
                                          playable (false + unplayable_reason, URLs null: a file not served)
    GET  /api/videos?offset=&limit=       indexed videos (metadata)
    GET  /api/videos/{id}                 one video: metadata + pseudo-events
    GET  /api/videos/{id}/file            the video's bytes (HTTP Range -> 206, so the player can seek)
    GET  /api/videos/{id}/thumbnail?t=s   JPEG of the 2-s clip holding t (cached in the index folder)
    GET/POST /api/labels, PATCH/DELETE /api/labels/{id}    label mode (store/labels.py)

Every error is a 4xx/5xx with a JSON body {"error": "..."}; request bodies over MAX_BODY_BYTES get 413; a request
that waited the server's lock_wait for a running ingest to let go of the index gets 503 with Retry-After.
"""
from __future__ import annotations

import contextlib
import os
from typing import Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.spans import clip_at
from server.media import Forbidden, ThumbnailCache, unplayable_reason, video_file
from server.state import Busy, ServerState
from store import db
from store import labels as label_store
from store.errors import VmrError

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MAX_BODY_BYTES = 16 * 1024  # a label is ~300 bytes
MAX_QUERY_CHARS = label_store.MAX_QUERY_CHARS
MAX_TOP_K = 100


class LabelIn(BaseModel):
    """A new label: a verdict on a search hit (source "hit") or a moment marked while watching ("mark")."""
    model_config = ConfigDict(extra="forbid")
    video_id: int
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    start: float = Field(ge=0)
    end: float = Field(gt=0)
    verdict: Literal["accept", "reject"] = "accept"
    source: Literal["hit", "mark"] = "hit"
    orig_start: float | None = None
    orig_end: float | None = None
    score: float | None = None


class LabelPatch(BaseModel):
    """Change a label: its window (drag start/end) and/or its verdict."""
    model_config = ConfigDict(extra="forbid")
    start: float | None = Field(default=None, ge=0)
    end: float | None = Field(default=None, gt=0)
    verdict: Literal["accept", "reject"] | None = None


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _error(413 if declared.isdigit() else 400, f"request body over {self.limit} bytes"
                                if declared.isdigit() else "bad Content-Length")(scope, receive, send)
        if declared is not None:
            return await self.app(scope, receive, send)
        # No declared length (chunked): read at most limit + 1 bytes, then replay them to the app.
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            more = message.get("more_body", False)
            if seen > self.limit:
                return await _error(413, f"request body over {self.limit} bytes")(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(index_dir: str, checkpoint: str | None = None, device: str = "auto", state: ServerState | None = None,
               precision: str = "auto") -> FastAPI:
    """The app over the index at ``index_dir``; models load now (once), not on the first request."""
    state = state or ServerState(index_dir, checkpoint=checkpoint, device=device, precision=precision)
    thumbs = ThumbnailCache(state.index_dir)
    state.on_catalogue_change.append(thumbs.sweep)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.close()

    app = FastAPI(title="vmr", version="0.1.0", lifespan=lifespan,
                  description="Search a video library for moments, watch them, label them for retraining.")
    app.state.vmr = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc):
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return JSONResponse({"error": "; ".join(problems)[:1000] or "invalid request"}, status_code=422)

    @app.exception_handler(Busy)
    async def busy(_request, exc):  # an ingest kept the index's file past the request's wait: try again
        return JSONResponse({"error": f"the index is busy ({exc}); try again"}, status_code=503,
                            headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def internal_error(_request, exc):
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    def indexed(video_id: int) -> dict:
        try:
            return state.video(video_id)
        except VmrError as err:
            raise HTTPException(404, str(err)) from None

    def served_file(row: dict) -> str:
        try:
            return video_file(state.root, row)
        except Forbidden as err:
            raise HTTPException(403, str(err)) from None
        except VmrError as err:
            raise HTTPException(410, str(err)) from None

    def with_video_id(label: dict) -> dict:
        return {**label, "video_id": state.video_id_of(label["path"])}

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    @app.get("/api/status", summary="Index counts, ingest progress, labels, models")
    def status():
        ingest = state.ingest_progress()
        labels = state.label_counts()
        engine = state.engine
        return {"index": state.index_dir, "root": state.root, "generation": state.generation,
                "clip_model": state.meta.get("clip_model"), "reranker": engine.reranker is not None,
                "fallback": engine.fallback_reason, "videos": ingest["indexed"], "ingest": ingest, "labels": labels}

    @app.get("/api/search", summary="Best moments for a sentence (the fields of `vmr search --json`, plus URLs)",
             description="Each moment adds rank, duration, thumbnail_url, video_url and playable; a video whose "
                         "file is not served (a link to outside the indexed folder, or a file gone since indexing) "
                         "has playable false, unplayable_reason saying why, and no URLs.")
    def search(q: str = Query(min_length=1, max_length=MAX_QUERY_CHARS, description="the sentence"),
               top_k: int = Query(10, ge=1, le=MAX_TOP_K),
               channel: list[Literal["visual", "speech"]] | None = Query(
                   None, description="only these channels propose moments (repeatable; default: all the index "
                                     "holds, fused); each moment says its `channels` and `matched_text`")):
        if not q.strip():
            raise HTTPException(422, "the query is empty")
        try:
            moments, timings = state.search(q, top_k, channel)
        except VmrError as err:
            raise HTTPException(400, str(err)) from None
        out = []
        for rank, m in enumerate(moments, 1):
            vid = int(m["video_id"])
            row = state._videos.get(vid) or {"id": vid, "path": m["path"]}
            reason = unplayable_reason(state.root, row)
            out.append({**m, "rank": rank, "duration": row.get("duration"), "playable": reason is None,
                        "unplayable_reason": reason,
                        "thumbnail_url": None if reason else f"/api/videos/{vid}/thumbnail?t={m['start']}",
                        "video_url": None if reason else f"/api/videos/{vid}/file"})
        return {"query": " ".join(q.split()), "moments": out,
                "timings": {k: round(float(v), 4) for k, v in timings.items()}}

    @app.get("/api/videos", summary="Indexed videos (metadata), by id")
    def videos(offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)):
        rows = [v for v in state.videos() if v["status"] == "indexed"]
        return {"total": len(rows), "videos": [_public(v, state.root) for v in rows[offset: offset + limit]]}

    @app.get("/api/videos/{video_id}", summary="One video: metadata and pseudo-events")
    def video(video_id: int):
        row = indexed(video_id)
        events = state.read(lambda con: db.event_spans(con, video_id))
        return {**_public(row, state.root), "events": [[s, e] for s, e in events]}

    @app.get("/api/videos/{video_id}/file", summary="The video's bytes; honours HTTP Range (206)")
    def video_bytes(video_id: int):
        path = served_file(indexed(video_id))
        return FileResponse(path, media_type=_media_type(path), headers={"Cache-Control": "no-cache"})

    @app.get("/api/videos/{video_id}/thumbnail", summary="JPEG of the 2-s clip holding time t")
    def thumbnail(video_id: int, t: float = Query(0.0, ge=0, le=1e7)):
        row = indexed(video_id)
        path = served_file(row)
        try:
            jpeg = thumbs.get(path, row, clip_at(t, row.get("duration")))
        except VmrError as err:
            raise HTTPException(422, str(err)) from None
        return FileResponse(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/labels", summary="Labels, oldest first (filter by query and/or video)")
    def list_labels(query: str | None = Query(None, max_length=MAX_QUERY_CHARS), video_id: int | None = None):
        path = indexed(video_id)["path"] if video_id is not None else None
        rows = state.read(lambda con: label_store.list_labels(con, query=query, path=path))
        return {"labels": [with_video_id(r) for r in rows]}

    @app.post("/api/labels", status_code=201, summary="Add a label (accept/reject a hit, or mark a moment)")
    def add_label(label: LabelIn):
        indexed(label.video_id)
        try:
            row = state.write(lambda con: label_store.add_label(con, **label.model_dump()))
        except VmrError as err:
            raise HTTPException(422, str(err)) from None
        return with_video_id(row)

    @app.patch("/api/labels/{label_id}", summary="Change a label's window or verdict")
    def patch_label(label_id: int, patch: LabelPatch):
        try:
            row = state.write(lambda con: label_store.update_label(con, label_id, **patch.model_dump()))
        except VmrError as err:
            raise HTTPException(404 if "no label" in str(err) else 422, str(err)) from None
        return with_video_id(row)

    @app.delete("/api/labels/{label_id}", status_code=204, summary="Remove a label")
    def delete_label(label_id: int):
        try:
            state.write(lambda con: label_store.delete_label(con, label_id))
        except VmrError as err:
            raise HTTPException(404, str(err)) from None
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimit)
    return app


def _public(row: dict, root: str) -> dict:
    keys = ("id", "path", "duration", "fps", "width", "height", "n_clips", "n_events", "size")
    reason = unplayable_reason(root, row)
    return {**{k: row.get(k) for k in keys}, "playable": reason is None, "unplayable_reason": reason,
            "video_url": None if reason else f"/api/videos/{row['id']}/file"}


def _media_type(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
            ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}.get(ext, "application/octet-stream")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(index_dir: str, checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", log_level: str = "info", precision: str = "auto") -> None:
    """`vmr serve`: load the index and models once, serve until Ctrl-C (uvicorn then shuts down cleanly)."""
    import click
    import uvicorn

    app = create_app(index_dir, checkpoint=checkpoint, device=device, precision=precision)
    if host not in LOOPBACK:
        click.echo(f"warning: serving on {host}: anyone who can reach this port can watch the indexed videos and "
                   "write labels (there is no login)", err=True)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"vmr: serving {index_dir} at http://{shown}:{port}/  (API docs: /docs; Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
