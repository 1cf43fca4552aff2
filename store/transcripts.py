"""Time-coded text of the text channels ("speech", on-screen text "ocr") and what each channel did with each
video, in DuckDB.

  text_segments  (video_id, channel, idx) PK, start, end (s), text, words VARCHAR[], word_starts DOUBLE[],
                 word_ends DOUBLE[]: one transcript segment or on-screen text track and its words (a track's
                 words all carry the track's span)
  channel_runs   (video_id, channel) PK, state, reason, language, run_id, n_segments, seconds, settled_at: one row per
                 video a channel has settled, ``state`` one of STATES; ``reason`` says why nothing is stored
                 ("no audio stream", "silent audio", "audio stream unreadable: ...")

A video's segments and its run row are written in one transaction (``commit``), so a channel is added to an
indexed library video by video, kill-safe: a video without a run row is what the next ingest transcribes. A
re-indexed (changed), failed or deleted video loses both (``delete``, in the transaction that drops its clips).
``run_id`` (new for each commit) lets the text index (store.text_index) tell a stale document from a current one.
Meta ``channels`` records, per channel, what made its text (model, digest, language setting).
"""
from __future__ import annotations

import datetime
import uuid

import duckdb

TABLES_SQL = (
    """CREATE TABLE IF NOT EXISTS text_segments (
        video_id BIGINT NOT NULL, channel VARCHAR NOT NULL, idx INTEGER NOT NULL, start DOUBLE, "end" DOUBLE,
        text VARCHAR NOT NULL, words VARCHAR[], word_starts DOUBLE[], word_ends DOUBLE[],
        PRIMARY KEY (video_id, channel, idx))""",
    """CREATE TABLE IF NOT EXISTS channel_runs (
        video_id BIGINT NOT NULL, channel VARCHAR NOT NULL, state VARCHAR NOT NULL, reason VARCHAR,
        language VARCHAR, run_id VARCHAR NOT NULL, n_segments INTEGER NOT NULL, seconds DOUBLE, settled_at TIMESTAMP,
        PRIMARY KEY (video_id, channel))""",
)
# ok: text stored; no_speech: audio present, nothing said (silence, or VAD found no voice); no_audio: the file has
# no audio stream; no_text: no on-screen text read in any sampled frame; failed: the audio stream or the frames
# could not be decoded or read (reason says why)
STATES = ("ok", "no_speech", "no_audio", "no_text", "failed")
SEGMENT_COLUMNS = ("video_id", "channel", "idx", "start", "end", "text", "words", "word_starts", "word_ends")


def ensure_tables(con) -> None:
    for sql in TABLES_SQL:
        con.execute(sql)


def commit(con, video_id: int, channel: str, run: dict, segments: list[dict]) -> str:
    """Replace one video's text of ``channel`` and its run row in one transaction; returns the new run id.

    run: state (STATES), reason, language, seconds (processing time). segments: [{start, end, text, words: [{word,
    start, end}]}], in time order."""
    if run["state"] not in STATES:
        raise ValueError(f"channel state {run['state']!r}: expected one of {STATES}")
    run_id = uuid.uuid4().hex
    con.execute("BEGIN TRANSACTION")
    try:
        _delete(con, video_id, channel)
        for i, seg in enumerate(segments):
            words = seg.get("words") or []
            con.execute("INSERT INTO text_segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [int(video_id), channel, i, float(seg["start"]), float(seg["end"]), seg["text"],
                         [w["word"] for w in words], [float(w["start"]) for w in words],
                         [float(w["end"]) for w in words]])
        con.execute("INSERT INTO channel_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [int(video_id), channel, run["state"], run.get("reason"), run.get("language"), run_id,
                     len(segments), run.get("seconds"), _now()])
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
    return run_id


def _delete(con, video_id: int, channel: str | None) -> None:
    where = "video_id = ?" + ("" if channel is None else " AND channel = ?")
    params = [int(video_id)] + ([] if channel is None else [channel])
    for table in ("text_segments", "channel_runs"):
        con.execute(f"DELETE FROM {table} WHERE {where}", params)


def delete(con, video_id: int) -> None:
    """Drop every channel's text and run of a video (its content changed, failed or left), inside the caller's
    transaction; nothing to do in an index made before the tables existed (asked first: a failed statement would
    abort the caller's transaction)."""
    held = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'channel_runs'").fetchone()
    if held[0]:
        _delete(con, video_id, None)


def _rows(con, sql: str, params=None) -> list[tuple]:
    """Rows of a query on these tables; none from an index made before they existed (opened read-only)."""
    try:
        return con.execute(sql, params or []).fetchall()
    except duckdb.CatalogException:
        return []


def settled(con, channel: str) -> set[int]:
    """Ids of the videos ``channel`` has settled (any state): the ones an incremental ingest skips."""
    return {int(v) for v, in _rows(con, "SELECT video_id FROM channel_runs WHERE channel = ?", [channel])}


def runs(con) -> dict[tuple[int, str], dict]:
    """{(video_id, channel): {state, reason, language, run_id, n_segments, seconds}} of every settled video."""
    rows = _rows(con, "SELECT video_id, channel, state, reason, language, run_id, n_segments, seconds "
                      "FROM channel_runs")
    return {(int(r[0]), r[1]): dict(zip(("state", "reason", "language", "run_id", "n_segments", "seconds"), r[2:]))
            for r in rows}


def segments_of(con, keys: list[tuple[int, str, int]]) -> dict[tuple[int, str, int], dict]:
    """{(video_id, channel, idx): segment dict (SEGMENT_COLUMNS, plus run_id)} of the given keys, one query."""
    if not keys:
        return {}
    rows = _rows(con, """SELECT s.video_id, s.channel, s.idx, s.start, s."end", s.text, s.words, s.word_starts,
                         s.word_ends, r.run_id FROM text_segments s JOIN channel_runs r USING (video_id, channel)
                         JOIN (SELECT unnest(?::BIGINT[]) AS video_id, unnest(?::VARCHAR[]) AS channel,
                               unnest(?::INTEGER[]) AS idx) k USING (video_id, channel, idx)""",
                 [[int(k[0]) for k in keys], [k[1] for k in keys], [int(k[2]) for k in keys]])
    return {(int(r[0]), r[1], int(r[2])): dict(zip((*SEGMENT_COLUMNS, "run_id"), r)) for r in rows}


def all_segments(con, video_ids: list[int] | None = None):
    """Every stored segment (of the given videos; None: all), with its run id: what the text index holds."""
    sql = ("""SELECT s.video_id, s.channel, s.idx, s.start, s."end", s.text, s.words, s.word_starts, s.word_ends,
              r.run_id FROM text_segments s JOIN channel_runs r USING (video_id, channel)""")
    params = []
    if video_ids is not None:
        sql += " WHERE s.video_id IN (SELECT unnest(?::BIGINT[]))"
        params = [[int(v) for v in video_ids]]
    return [dict(zip((*SEGMENT_COLUMNS, "run_id"), r)) for r in _rows(con, sql + " ORDER BY 1, 2, 3", params)]


def state_counts(con) -> dict[str, dict[str, int]]:
    """{channel: {state: videos}}."""
    out: dict[str, dict[str, int]] = {}
    for channel, state, n in _rows(con, "SELECT channel, state, count(*) FROM channel_runs GROUP BY 1, 2"):
        out.setdefault(channel, {})[state] = int(n)
    return out


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


__all__ = ["STATES", "ensure_tables", "commit", "delete", "settled", "runs", "segments_of", "all_segments",
           "state_counts"]
