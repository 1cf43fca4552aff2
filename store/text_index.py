"""The text index of an index folder: tantivy over the text channels' segments (store.transcripts), for words and
exact "quoted" phrases, kept in line with DuckDB (the truth) and rebuilt from it when missing or damaged.

    <index>/text_index/          tantivy files; one document per segment: key "video_id:channel", video_id,
                                 channel, idx, run_id, text (the "default" analyzer: split on non-alphanumerics,
                                 lower-cased; positions kept for phrases)
    <index>/text_index/state.json  {"held": {key: run_id}, "dirty": [keys]}: what the documents reflect

``sync(con)`` compares the run ids DuckDB holds (channel_runs) with ``held``: documents of a stale or gone key
are deleted by key and a current key's segments added again, then one tantivy commit, then the state file
(atomically). Keys are marked ``dirty`` in the state before the commit, so a run killed between the commit and the
state write leaves no orphan: the next sync deletes every dirty key first. Any hit is still checked against
DuckDB by the reader (its run id), so an index behind DuckDB can miss a new video but never return a gone one.

Query language (``parse_query``): words match anywhere (BM25 ranks segments holding more, rarer words first;
function words count only in a query of nothing else); "quoted words" must appear in that order, adjacent. The analyzer is mirrored in Python (``tokens``) so that the
words a hit matched can be located in its segment.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

try:
    import tantivy  # the speech extra (pyproject.toml): an index without text channels never needs it
except ImportError:
    tantivy = None

from store import transcripts

FOLDER = "text_index"
STATE_FILE = "state.json"
WRITER_HEAP = 15_000_000
_TOKEN = re.compile(r"[^\W_]+")  # tantivy's SimpleTokenizer: runs of alphanumeric characters
_PHRASE = re.compile(r'"([^"]*)"')
# Function words match nearly every segment: outside a quoted phrase they are searched for only in a query made of
# nothing else, so that "the kettle under the bridge" finds segments by kettle and bridge.
FUNCTION_WORDS = frozenset("a an the and or but of to in on at for with by from is are was were be been it this "
                           "that these those i you he she we they me my your our his her its their so as if".split())


def available() -> bool:
    """Whether the tantivy package is installed."""
    return tantivy is not None


def tokens(text: str) -> list[str]:
    """The terms the "default" analyzer makes of ``text`` (lower-cased alphanumeric runs of <= 40 bytes)."""
    return [t for t in _TOKEN.findall(text.lower()) if len(t.encode()) <= 40]


def parse_query(query: str) -> tuple[list[list[str]], list[str]]:
    """(phrases: each a list of terms that must occur in order, words: terms of which one or more must occur) of
    a query; the words leave out FUNCTION_WORDS unless the query has no other word."""
    phrases = [tokens(p) for p in _PHRASE.findall(query)]
    rest = tokens(_PHRASE.sub(" ", query).replace('"', " "))
    content = [t for t in rest if t not in FUNCTION_WORDS]
    return [p for p in phrases if p], content or ([] if phrases else rest)


def _schema():
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("key", stored=True, tokenizer_name="raw")
    builder.add_unsigned_field("video_id", stored=True, indexed=True)
    builder.add_text_field("channel", stored=True, tokenizer_name="raw")
    builder.add_unsigned_field("idx", stored=True)
    builder.add_text_field("run_id", stored=True, tokenizer_name="raw")
    builder.add_text_field("text", stored=False, tokenizer_name="default", index_option="position")
    return builder.build()


def _key(video_id: int, channel: str) -> str:
    return f"{int(video_id)}:{channel}"


class TextIndex:
    """The tantivy index of one index folder. ``sync`` needs a DuckDB connection (read-only is enough)."""

    def __init__(self, index_dir):
        self.path = os.path.join(os.fspath(index_dir), FOLDER)
        self.schema = _schema()
        self._index = None

    # ---- state -------------------------------------------------------------------------------------------------
    def _read_state(self) -> dict | None:
        try:
            with open(os.path.join(self.path, STATE_FILE)) as f:
                state = json.load(f)
            return {"held": dict(state["held"]), "dirty": list(state.get("dirty", []))}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_state(self, state: dict) -> None:
        tmp = os.path.join(self.path, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, os.path.join(self.path, STATE_FILE))

    def _open(self, fresh: bool = False):
        if fresh:
            shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path, exist_ok=True)
        self._index = tantivy.Index(self.schema, path=self.path, reuse=not fresh)
        return self._index

    # ---- writes ------------------------------------------------------------------------------------------------
    def sync(self, con) -> dict:
        """Bring the documents in line with DuckDB's segments; rebuild from DuckDB when the folder is missing,
        unreadable or its state lost. Returns {"added", "deleted", "rebuilt"} (keys). Another process syncing at
        the same time (tantivy's writer lock): nothing is done here, {"busy": True}."""
        want = {_key(v, c): r["run_id"] for (v, c), r in transcripts.runs(con).items() if r["n_segments"]}
        state = self._read_state()
        if not want and state is None and not os.path.isdir(self.path):
            return {"added": 0, "deleted": 0, "rebuilt": False}  # an index without text: no folder made
        rebuilt = state is None
        if state is not None:
            try:
                self._open()
            except (OSError, ValueError):
                rebuilt, state = True, None
        if state is None:
            self._open(fresh=True)
            state = {"held": {}, "dirty": []}
        stale = {k for k, run in state["held"].items() if want.get(k) != run} | set(state["dirty"])
        missing = {k for k, run in want.items() if state["held"].get(k) != run}
        if not stale and not missing and not rebuilt:
            return {"added": 0, "deleted": 0, "rebuilt": False}
        try:
            writer = self._index.writer(WRITER_HEAP, 1)
        except ValueError:  # the writer lock is held by another process's sync
            return {"added": 0, "deleted": 0, "rebuilt": False, "busy": True}
        try:
            self._write_state({"held": {k: r for k, r in state["held"].items() if k not in stale | missing},
                               "dirty": sorted(stale | missing)})
            for key in stale | missing:
                writer.delete_documents_by_term("key", key)
            ids = sorted({int(k.split(":")[0]) for k in missing})
            for seg in transcripts.all_segments(con, ids) if ids else []:
                key = _key(seg["video_id"], seg["channel"])
                if key in missing and want.get(key) == seg["run_id"]:
                    doc = tantivy.Document(key=key, channel=seg["channel"], run_id=seg["run_id"], text=seg["text"])
                    doc.add_unsigned("video_id", int(seg["video_id"]))
                    doc.add_unsigned("idx", int(seg["idx"]))
                    writer.add_document(doc)
            writer.commit()
            writer.wait_merging_threads()
        except BaseException:
            with contextlib.suppress(Exception):
                writer.rollback()
            raise
        self._write_state({"held": {**{k: r for k, r in state["held"].items() if k not in stale | missing},
                                    **{k: want[k] for k in missing}}, "dirty": []})
        return {"added": len(missing), "deleted": len(stale - missing), "rebuilt": rebuilt}

    # ---- reads -------------------------------------------------------------------------------------------------
    def search(self, query: str, limit: int, channels: list[str] | None = None) -> list[dict]:
        """Segments matching ``query`` (parse_query), best first: [{video_id, channel, idx, run_id, score}]; [] for
        a query without words or an index without documents."""
        phrases, words = parse_query(query)
        if not phrases and not words or limit <= 0:
            return []
        if self._index is None:
            if self._read_state() is None:
                return []
            self._open()
        self._index.reload()
        schema = self.schema
        clauses = [(tantivy.Occur.Must, tantivy.Query.phrase_query(schema, "text", p) if len(p) > 1
                    else tantivy.Query.term_query(schema, "text", p[0])) for p in phrases]
        if words:  # at least one of the words (beside any phrase): a Should clause next to a Must is optional
            clauses.append((tantivy.Occur.Must, tantivy.Query.boolean_query(
                [(tantivy.Occur.Should, tantivy.Query.term_query(schema, "text", w)) for w in dict.fromkeys(words)])))
        if channels:
            clauses.append((tantivy.Occur.Must, tantivy.Query.term_set_query(schema, "channel", list(channels))))
        searcher = self._index.searcher()
        out = []
        for score, address in searcher.search(tantivy.Query.boolean_query(clauses), limit, count=False).hits:
            doc = searcher.doc(address)
            out.append({"video_id": int(doc["video_id"][0]), "channel": doc["channel"][0], "idx": int(doc["idx"][0]),
                        "run_id": doc["run_id"][0], "score": float(score)})
        return out


    def matching_segments(self, con, query: str, limit: int, channels: list[str] | None = None) -> list[dict]:
        """The stored segments (store.transcripts.all_segments' dicts, plus ``score``) of the best ``limit`` hits,
        best first; a hit whose document DuckDB no longer holds (a stale index) is dropped."""
        hits = self.search(query, limit, channels)
        rows = transcripts.segments_of(con, [(h["video_id"], h["channel"], h["idx"]) for h in hits])
        out = []
        for hit in hits:
            row = rows.get((hit["video_id"], hit["channel"], hit["idx"]))
            if row is not None and row["run_id"] == hit["run_id"]:
                out.append({**row, "score": hit["score"]})
        return out


__all__ = ["FOLDER", "FUNCTION_WORDS", "TextIndex", "available", "tokens", "parse_query"]
