"""`vmr serve`: the JSON API (OpenAPI at /docs) and the page (server/static) over one index.

    GET  /, /static/...                   the page (open without a token: it asks for one)
    POST /api/login                       {"token"} -> the page's cookie (a server with access tokens)
    GET  /docs, /openapi.json             API docs (Swagger UI from the swagger-ui-bundle-v2 package: offline)
    GET  /api/status                      index counts, ingest progress (+ the incomplete-ingest note), labels, model
    GET  /api/search?q=...&top_k=10       search_id + moments as `vmr search --json` + rank, duration, thumbnail_url,
                                          video_url, playable (false + unplayable_reason, URLs null: not served);
                                          &channel=speech (repeatable): only those channels propose moments
    GET  /api/videos?offset=&limit=       indexed videos (metadata)
    GET  /api/videos/{id}                 one video: metadata + pseudo-events
    GET  /api/videos/{id}/file            the video's bytes (HTTP Range -> 206, so the player can seek)
    GET  /api/videos/{id}/thumbnail?t=s   JPEG of the 2-s clip holding t (cached in the index folder)
    GET  /api/videos/{id}/clip?start=&end=   the moment as an mp4 download (server/clips.py: stream copy from a
                                          keyframe, else re-encoded); bad bounds 422
    GET/POST /api/labels, PATCH/DELETE /api/labels/{id}, POST /api/labels/{id}/restore    label mode
                                          (store/labels.py; a hit's label names its search_id; versions as ETag,
                                          If-Match -> 409 with the stored label when a tab was stale)

Who may ask (server/access.py): a Host the server is not bound to gets 400; with tokens, a request without one 401.
Every error is a 4xx/5xx with a JSON body {"error": "..."}; request bodies over limits.MAX_BODY_BYTES get 413; a request
that waited the server's lock_wait for a running ingest to let go of the index gets 503 with Retry-After.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from typing import Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path

from model.spans import clip_at
from server.access import (COOKIE, COOKIE_SECONDS, LOOPBACK, HostCheck, TokenCheck, allowed_hosts, new_token,
                           parse_tokens, user_of)
from server.clips import MAX_CLIP_SECONDS, ClipError, clip_filename, cut_clip
from server.limits import BodyLimit
from server.media import Forbidden, ThumbnailCache, unplayable_reason, video_file
from server.state import Busy, ServerState, hit_key
from store import db
from store import labels as label_store
from store.errors import VmrError

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
DOCS_ASSETS = "/static/docs"  # Swagger UI's files; under /static/: the page's files, open without a token
MAX_QUERY_CHARS = label_store.MAX_QUERY_CHARS
MAX_TOP_K = 100
CUTS_AT_ONCE = 2  # clip exports running together (a re-encode keeps a core busy); more wait their turn


class LabelIn(BaseModel):
    """A new label: a verdict on a search hit (source "hit": names the search that found it, whose sentence the
    label takes) or a moment marked while watching ("mark": the sentence given)."""
    model_config = ConfigDict(extra="forbid")
    video_id: int
    query: str | None = Field(default=None, min_length=1, max_length=MAX_QUERY_CHARS)
    search_id: str | None = Field(default=None, max_length=64)
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


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=200)


def create_app(index_dir: str, checkpoint: str | None = None, device: str = "auto", state: ServerState | None = None,
               precision: str = "auto", host: str = "127.0.0.1", allow_hosts: tuple[str, ...] = (),
               tokens: dict[str, str] | None = None) -> FastAPI:
    """The app over the index at ``index_dir``; models load now (once), not on the first request.

    ``host``, ``allow_hosts``: the address it is bound to and other names it answers to; ``tokens``: {secret: name}
    of the access tokens, none: no login (server/access.py)."""
    state = state or ServerState(index_dir, checkpoint=checkpoint, device=device, precision=precision)
    thumbs = ThumbnailCache(state.index_dir)
    state.on_catalogue_change.append(thumbs.sweep)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.close()

    app = FastAPI(title="vmr", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
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

    @app.post("/api/login", summary="Exchange the access token for the page's cookie (a server started with tokens)")
    def login(body: LoginIn):
        user = user_of(tokens or {}, body.token)
        if tokens and user is None:
            raise HTTPException(401, "that is not this server's access token (it is printed when `vmr serve` "
                                     "starts, or given with --token)")
        response = JSONResponse({"user": user})
        if tokens:
            response.set_cookie(COOKIE, body.token, max_age=COOKIE_SECONDS, httponly=True, samesite="strict")
        return response

    @app.get("/docs", include_in_schema=False)
    def docs():  # Swagger UI from the swagger-ui-bundle package, not a CDN: the docs work offline
        return get_swagger_ui_html(openapi_url="/openapi.json", title="vmr API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # its default asks swagger.io

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
               channel: list[Literal["visual", "speech", "ocr"]] | None = Query(
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
        query = " ".join(q.split())
        return {"query": query, "search_id": state.searches.add(query, moments), "moments": out,
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

    cutting = threading.BoundedSemaphore(CUTS_AT_ONCE)

    @app.get("/api/videos/{video_id}/clip", summary="The moment start-end as an mp4 download",
             description="Stream copy when start falls on a keyframe, else re-encoded (libx264, else mpeg4), said "
                         f"by X-Clip-Method; audio kept; at most {MAX_CLIP_SECONDS:.0f} s, an end past the video's "
                         "end is cut there; other bounds 422.")
    def clip(video_id: int, start: float = Query(ge=0, allow_inf_nan=False),
             end: float = Query(gt=0, allow_inf_nan=False)):
        row = indexed(video_id)
        path = served_file(row)
        fd, out = tempfile.mkstemp(prefix="vmr-clip-", suffix=".mp4")
        os.close(fd)
        try:
            with cutting:
                report = cut_clip(path, start, end, out)  # on failure it removes the file
        except ClipError as err:
            raise HTTPException(422, str(err)) from None
        return FileResponse(out, media_type="video/mp4", filename=clip_filename(row["path"], report.start,
                                                                                report.end),
                            headers={"X-Clip-Method": report.method}, background=BackgroundTask(os.remove, out))

    @app.exception_handler(label_store.Conflict)
    async def conflict(_request, exc):  # a stale tab, a hit labelled elsewhere: the stored label comes back
        return JSONResponse({"error": str(exc), "label": with_video_id(exc.label)}, status_code=409,
                            headers=_etag(exc.label))

    def written(fn, status_code: int = 200) -> JSONResponse:
        """The label state.write(fn) returns, with its ETag; a VmrError (not Conflict: 409) -> 404 / 422."""
        try:
            row = state.write(fn)
        except label_store.Conflict:
            raise
        except VmrError as err:
            raise HTTPException(404 if "no label" in str(err) else 422, str(err)) from None
        return JSONResponse(with_video_id(row), status_code=status_code, headers=_etag(row))

    def sentence_of_hit(label: LabelIn) -> str:
        """The sentence a hit's label takes: its search's (module docstring); HTTPException when it cannot be."""
        if label.search_id is None:
            raise HTTPException(422, "a hit's label needs the search_id /api/search returned with the hit (or "
                                     "source 'mark' and a query for a moment found by eye)")
        found = state.searches.get(label.search_id)
        if found is None:
            raise HTTPException(409, f"search {label.search_id} is unknown to the server (it restarted, or the "
                                     "search is old): search again, then label")
        if label.query is not None and label_store.query_key(label.query) != label_store.query_key(found["query"]):
            raise HTTPException(409, f"this hit was found for “{found['query']}”, not “{label.query}”: label the "
                                     "hits of the search you see")
        orig = (label.start if label.orig_start is None else label.orig_start,
                label.end if label.orig_end is None else label.orig_end)
        if hit_key(label.video_id, *orig) not in found["hits"]:
            raise HTTPException(422, f"video {label.video_id} {orig[0]}-{orig[1]} s is not a hit of search "
                                     f"{label.search_id}: give the hit's start and end as orig_start/orig_end")
        return found["query"]

    @app.get("/api/labels", summary="Labels, oldest first (filter by sentence, case and spacing aside, and/or video)")
    def list_labels(query: str | None = Query(None, max_length=MAX_QUERY_CHARS), video_id: int | None = None):
        path = indexed(video_id)["path"] if video_id is not None else None
        rows = state.read(lambda con: label_store.list_labels(con, query=query, path=path))
        return {"labels": [with_video_id(r) for r in rows]}

    @app.post("/api/labels", status_code=201, summary="Add a label (accept/reject a hit, or mark a moment)",
              description="A hit's label names its search (search_id from /api/search) and takes that search's "
                          "sentence; a hit already labelled for the sentence answers 409 with that label (change "
                          "it with PATCH). Responses carry the label's version as ETag.")
    def add_label(label: LabelIn, request: Request):
        indexed(label.video_id)
        fields = label.model_dump(exclude={"query"})
        if label.source == "hit":
            query = sentence_of_hit(label)
        elif label.query is None:
            raise HTTPException(422, "a marked moment needs its sentence: give query")
        else:
            query = label.query
        return written(lambda con: label_store.add_label(con, query=query, author=_user(request), **fields), 201)

    @app.patch("/api/labels/{label_id}", summary="Change a label's window or verdict",
               description="If-Match: the version (ETag) the change was made against; another one answers 409 "
                           "with the stored label.")
    def patch_label(label_id: int, patch: LabelPatch, request: Request):
        version = _if_match(request)
        return written(lambda con: label_store.update_label(con, label_id, version=version, author=_user(request),
                                                            **patch.model_dump()))

    @app.delete("/api/labels/{label_id}", summary="Delete a label (POST .../restore undoes it)",
                description="If-Match as for PATCH. Answers the label as deleted.")
    def delete_label(label_id: int, request: Request):
        version = _if_match(request)
        return written(lambda con: label_store.delete_label(con, label_id, version=version))

    @app.post("/api/labels/{label_id}/restore", summary="Undo a label's delete")
    def restore_label(label_id: int):
        return written(lambda con: label_store.restore_label(con, label_id))

    # before /static, which would match first
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimit)
    if tokens:
        app.add_middleware(TokenCheck, tokens=tokens)
    app.add_middleware(HostCheck, hosts=allowed_hosts(host, allow_hosts))  # outermost: before anything is read
    return app


def _etag(label: dict) -> dict:
    return {"ETag": f'"{label["version"]}"'}


def _if_match(request: Request) -> int | None:
    """The label version an If-Match header names (None: none given, the write is unconditional)."""
    value = request.headers.get("if-match")
    if value is None:
        return None
    digits = value.strip().removeprefix("W/").strip('"')
    if not digits.isdigit():
        raise HTTPException(400, f"If-Match must be a label's ETag (its version, e.g. \"3\"), not {value[:40]!r}")
    return int(digits)


def _user(request: Request) -> str | None:
    """Who makes this request: the name of its access token (server/access.py); None without tokens."""
    return request.scope.get("vmr_user")


def _public(row: dict, root: str) -> dict:
    keys = ("id", "path", "duration", "fps", "width", "height", "n_clips", "n_events", "size")
    reason = unplayable_reason(root, row)
    return {**{k: row.get(k) for k in keys}, "playable": reason is None, "unplayable_reason": reason,
            "video_url": None if reason else f"/api/videos/{row['id']}/file"}


def _media_type(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
            ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}.get(ext, "application/octet-stream")


def serve(index_dir: str, checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          device: str = "auto", log_level: str = "info", precision: str = "auto", tokens: tuple[str, ...] = (),
          allow_hosts: tuple[str, ...] = ()) -> None:
    """`vmr serve`: load the index and models once, serve until Ctrl-C (uvicorn then shuts down cleanly).

    ``tokens``: '[NAME=]SECRET' strings (access.parse_tokens). Bound to anything but localhost it needs access
    tokens: without any it makes one and prints it."""
    import click
    import uvicorn

    try:
        tokens = parse_tokens(tokens or ())
    except ValueError as err:
        raise VmrError(f"--token: {err}") from None
    made = None
    if host not in LOOPBACK and not tokens:
        made = new_token()
        tokens[made] = "user"
    app = create_app(index_dir, checkpoint=checkpoint, device=device, precision=precision, host=host,
                     allow_hosts=allow_hosts, tokens=tokens or None)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"vmr: serving {index_dir} at http://{shown}:{port}/  (API docs: /docs; Ctrl-C stops)")
    if made:
        click.echo(f"vmr: access token (the page asks for it once; keep it across restarts with --token or "
                   f"$VMR_TOKEN): {made}\n     or open http://{shown}:{port}/?token={made}")
    elif tokens:
        click.echo(f"vmr: {len(tokens)} access token(s): {', '.join(sorted(set(tokens.values())))}")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
