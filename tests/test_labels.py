"""store/labels.py on a real DuckDB index (synthetic world vectors, no decode): one label per (sentence, hit),
versions (a stale writer gets Conflict), delete + restore, the in-place migration of a table an older vmr wrote,
and `vmr labels export` refusing (or dropping) windows both relevant and negative for one sentence."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from store import db
from store import labels as label_store


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(index dir, {path: video id}) of a 3-video synthetic-vector index, built once."""
    import world
    from model.inference.features import ClipEncoder
    from store.library import Library
    from world.generator import build_world
    from world.synthetic import write_library

    root = tmp_path_factory.mktemp("labels_world")
    videos, _ = build_world(root, n_videos=3, seed=3, long_videos=0, write=False)
    encoder = ClipEncoder.load(str(world.WORLD_CLIP_CONFIG), str(world.WORLD_CLIP_WEIGHTS), device="cpu")
    write_library(root / "index", videos, encoder, seed=3)
    with Library(root / "index") as lib:
        ids = {f"{v.vid}.mp4": lib.resolve_vid(v.vid) for v in videos}
    return root / "index", ids


@pytest.fixture()
def index(built, tmp_path):
    """A fresh copy of the built index (no labels) for one test."""
    shutil.copytree(built[0], tmp_path / "index")
    return tmp_path / "index", built[1]


def written(index_dir, fn):
    con = label_store.write_connection(index_dir)
    try:
        return fn(con)
    finally:
        con.close()


def test_one_label_per_sentence_and_hit_with_versions(index):
    index_dir, ids = index
    vid = min(ids.values())
    first = written(index_dir, lambda con: label_store.add_label(con, vid, "A white cross", 4.0, 10.0, "accept",
                                                                 search_id="s1", author="ana"))
    assert first["version"] == 1 and first["query_key"] == "a white cross" and first["author"] == "ana"
    # the same hit of the same sentence (case and spacing aside): the stored label comes back in a Conflict
    with pytest.raises(label_store.Conflict) as err:
        written(index_dir, lambda con: label_store.add_label(con, vid, "a  WHITE cross", 4.0, 10.0, "reject"))
    assert err.value.label["id"] == first["id"] and err.value.label["verdict"] == "accept"
    changed = written(index_dir, lambda con: label_store.update_label(con, first["id"], verdict="reject",
                                                                      version=1, author="bo"))
    assert changed["version"] == 2 and changed["verdict"] == "reject" and changed["author"] == "bo"
    with pytest.raises(label_store.Conflict, match="changed by bo since you saw it"):  # a tab that saw version 1
        written(index_dir, lambda con: label_store.update_label(con, first["id"], end=12.0, version=1))
    with pytest.raises(label_store.Conflict):
        written(index_dir, lambda con: label_store.delete_label(con, first["id"], version=1))
    gone = written(index_dir, lambda con: label_store.delete_label(con, first["id"], version=2))
    assert gone["deleted_at"] is not None
    con = db.connect(index_dir, read_only=True)
    try:
        assert label_store.list_labels(con) == [] and label_store.count_labels(con)["total"] == 0
    finally:
        con.close()
    back = written(index_dir, lambda con: label_store.restore_label(con, first["id"]))
    assert back["deleted_at"] is None and back["verdict"] == "reject" and back["version"] == 4


def test_a_table_an_older_vmr_wrote_is_migrated_in_place(index):
    """An old labels table (no query_key, version, ...): read as it is by a read-only export, then given the new
    columns on the next write, its labels kept."""
    index_dir, ids = index
    vid = min(ids.values())
    path = next(p for p, i in ids.items() if i == vid)
    con = db.connect(index_dir, read_only=False)
    try:
        con.execute(label_store.SEQUENCE)
        con.execute(label_store.SCHEMA)
        con.execute("INSERT INTO labels (id, query, path, content_hash, start, \"end\", verdict, source) VALUES "
                    "(nextval('labels_id'), 'An Old Label', ?, NULL, 2.0, 8.0, 'accept', 'hit')", [path])
    finally:
        con.close()
    con = db.connect(index_dir, read_only=True)
    try:
        old, = label_store.list_labels(con, query="an old label")
        assert old["version"] == 1 and old["query_key"] == "an old label" and old["deleted_at"] is None
        records, _ = label_store.export_records(con)
        assert records[0]["relevant_windows"] == [[2.0, 8.0]]
    finally:
        con.close()
    new = written(index_dir, lambda con: label_store.add_label(con, vid, "another", 1.0, 3.0, "reject", "mark"))
    con = db.connect(index_dir, read_only=True)
    try:
        assert set(label_store.ADDED_COLUMNS) <= label_store._table_columns(con)
        assert [r["id"] for r in label_store.list_labels(con)] == [old["id"], new["id"]]
        assert label_store.list_labels(con, query="AN OLD LABEL")[0]["query_key"] == "an old label"
    finally:
        con.close()


def test_export_names_contradictions_or_drops_them(index, tmp_path):
    """A window accepted (a mark) and rejected (a hit) for one sentence: `vmr labels export` exits 1 naming both
    labels and the fix, writes nothing; with --drop-contradictions it leaves the window out and says so."""
    from cli import main

    index_dir, ids = index
    vid = min(ids.values())
    a = written(index_dir, lambda con: label_store.add_label(con, vid, "a red circle", 4.0, 10.0, "reject"))
    b = written(index_dir, lambda con: label_store.add_label(con, vid, "A red circle", 4.0, 10.0, "accept", "mark"))
    written(index_dir, lambda con: label_store.add_label(con, vid, "a red circle", 20.0, 24.0, "accept", "mark"))
    out = tmp_path / "ann.jsonl"
    res = CliRunner().invoke(main, ["labels", "export", "--index", str(index_dir), "--out", str(out)])
    assert res.exit_code == 1 and not out.exists()
    assert f"accepted by label {b['id']}, rejected by {a['id']}" in res.output
    assert "4.0-10.0 s" in res.output and "--drop-contradictions" in res.output
    res = CliRunner().invoke(main, ["labels", "export", "--index", str(index_dir), "--out", str(out),
                                    "--drop-contradictions"])
    assert res.exit_code == 0, res.output
    assert "1 contradicting window(s) left out" in res.output
    record, = map(json.loads, out.read_text().splitlines())
    assert record["relevant_windows"] == [[20.0, 24.0]] and record["negative_windows"] == []
