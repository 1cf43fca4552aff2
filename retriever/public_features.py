"""An index's per-clip features written in the public release layout (`vmr features export`), so that a model is
trained or evaluated on a user's own library by `vmr train --features`, `vmr predict --features`, the authors'
code or lighthouse:

    DIR/<kind>_features/<vid>.npz        key "features": f32 [rows, dim], one kind as the index stores it
                                         (unnormalised, as the public files: readers L2-normalise each kind alone)
    DIR/clip_text_features/qid<qid>.npz  key "last_hidden_state": f32 [L, Dt], the index's CLIP (--annotations)
    DIR/<annotation file name>           the annotations again, each vid the exported name (--annotations)
    DIR/videos.jsonl                     a line a video: vid, video_id, path, duration, n_clips, rows {kind: n}
    DIR/feature_spec.json                clip_model (what `vmr train/predict --features` check), clip_seconds,
                                         video_kinds, video_dims

A video's name (vid) is its file stem, as the public releases and their annotations name videos, so two indexed
videos of one stem are refused. Kinds may differ by a row where a recipe pads the video to whole clips of its own
(SlowFast); readers keep the rows every kind covers, as the authors' loader does. Only videos that hold every
kind asked for are written (the others are counted). The index is opened read-only: nothing in it changes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from model.data.dataset import load_annotations
from model.data.providers import TEXT_FEATURE_DIR, video_feature_dir
from model.errors import ModelError
from retriever.search import load_query_encoder
from retriever.windows import index_clip_seconds
from store import kinds
from store.errors import VmrError
from store.library import Library

VIDEOS_FILE, SPEC_FILE = "videos.jsonl", "feature_spec.json"
READ_BATCH = 32  # videos a read: one DuckDB query a kind, a bounded amount of vectors in memory
AUTHORS_ORDER = ("slowfast", "clip")  # their models' input order: SlowFast first, then CLIP


@dataclass
class ExportReport:
    """What an export wrote: videos (count), kinds (in order), lacking {kind: videos left out for lacking it},
    queries (text features written), removed (files of an earlier export no longer part of this one)."""
    out_dir: str
    kinds: list[str]
    videos: int = 0
    lacking: dict[str, int] = field(default_factory=dict)
    queries: int = 0
    removed: int = 0

    def describe(self) -> str:
        line = f"wrote {', '.join(self.kinds)} features of {self.videos} videos"
        if self.queries:
            line += f" and text features of {self.queries} queries"
        line += f" -> {self.out_dir}"
        for kind, n in self.lacking.items():
            line += f"; {n} videos left out: no '{kind}' features ({kinds.HOW_TO_ADD.get(kind, 'not computed')})"
        if self.removed:
            line += f"; removed {self.removed} files of the earlier export"
        return line


def default_kinds(meta: dict) -> list[str]:
    """Every kind the index holds, in the authors' order (SlowFast, CLIP), any other after them by name."""
    held = kinds.feature_kinds(meta)
    return [k for k in AUTHORS_ORDER if k in held] + sorted(set(held) - set(AUTHORS_ORDER))


def public_names(videos: list[dict]) -> dict[int, str]:
    """{video id: vid} — the file stem; refused in one line when two videos share one."""
    names, owner = {}, {}
    for video in videos:
        stem = os.path.splitext(os.path.basename(video["path"]))[0]
        if stem in owner:
            raise VmrError(f"{owner[stem]} and {video['path']} are both named {stem!r} in the public layout (a "
                           "video is its file name without extension): rename one and re-run `vmr index`")
        owner[stem] = video["path"]
        names[int(video["id"])] = stem
    return names


def export_public_features(index_dir, out_dir, kinds_wanted: list[str] | None = None, annotations=(),
                           overwrite: bool = False, device: str = "auto", progress: bool = False) -> ExportReport:
    """Write ``kinds_wanted`` (default: every kind held) of each indexed video into ``out_dir``; with
    ``annotations`` (jsonl paths), their queries' text features and the annotations renamed to exported vids.

    ``out_dir`` must be new or empty unless ``overwrite``: then the files written replace the earlier ones, and
    .npz files of its *_features folders that this export does not write are removed (the folder then holds this
    export only: readers take every such folder present).
    """
    out_dir = os.fspath(out_dir)
    with Library(index_dir, read_only=True) as lib:
        meta = lib.meta()
        wanted = list(kinds_wanted or default_kinds(meta))
        unknown = [k for k in wanted if k not in kinds.feature_kinds(meta) and k not in kinds.HOW_TO_ADD]
        if unknown:
            raise VmrError(f"--kinds {unknown[0]}: the index {index_dir} holds no such feature kind (it holds: "
                           f"{', '.join(default_kinds(meta))})")
        kinds.check_kinds(meta, wanted, None, "`vmr features export`")
        held_by = lib.kinds_by_video()
        indexed = [v for v in lib.videos(status="indexed") if int(v["id"]) in held_by]
        names = public_names(indexed)
        report = ExportReport(out_dir, wanted)
        exported = []
        for video in indexed:
            missing = [k for k in wanted if k not in held_by[int(video["id"])]]
            if missing:
                report.lacking[missing[0]] = report.lacking.get(missing[0], 0) + 1
            else:
                exported.append(video)
        exported_ids = {int(v["id"]) for v in exported}
        renamed = [(path, _renamed(path, indexed, exported_ids, names, held_by, wanted)) for path in annotations]
        _check_out_dir(out_dir, overwrite, [os.path.basename(p) for p, _ in renamed])
        written: set[str] = set()
        lines = []
        with lib.session(), tqdm(total=len(exported), desc="export", unit="video", disable=not progress) as bar:
            for start in range(0, len(exported), READ_BATCH):
                batch = exported[start: start + READ_BATCH]
                ids = [int(v["id"]) for v in batch]
                per_kind = {kind: lib.features_many(ids, [kind]) for kind in wanted}
                for video in batch:
                    vid, rows = names[int(video["id"])], {}
                    for kind in wanted:
                        vectors = per_kind[kind][int(video["id"])]
                        written.add(_save_npz(out_dir, video_feature_dir(kind), vid, "features", vectors))
                        rows[kind] = int(len(vectors))
                    lines.append({"vid": vid, "video_id": int(video["id"]), "path": video["path"],
                                  "duration": video["duration"], "n_clips": int(video["n_clips"]), "rows": rows})
                    bar.update(1)
            dims = {kind: int(kinds.feature_kinds(meta)[kind]["dim"]) for kind in wanted}
    report.videos = len(lines)
    queries = _unique_queries(renamed)
    if queries:
        encoder = load_query_encoder(meta, device)
        for qid, query in tqdm(queries.items(), desc="text", unit="query", disable=not progress):
            written.add(_save_npz(out_dir, TEXT_FEATURE_DIR, f"qid{qid}", "last_hidden_state",
                                  encoder.encode_text_tokens([query])[0]))
        report.queries = len(queries)
    for path, records in renamed:
        _write_text(os.path.join(out_dir, os.path.basename(path)), "".join(json.dumps(r) + "\n" for r in records))
    _write_text(os.path.join(out_dir, VIDEOS_FILE), "".join(json.dumps(r) + "\n" for r in lines))
    spec = {"clip_model": meta["clip_model"], "clip_seconds": index_clip_seconds(meta), "video_kinds": wanted,
            "video_dims": [dims[k] for k in wanted], "index": os.path.abspath(os.fspath(index_dir))}
    _write_text(os.path.join(out_dir, SPEC_FILE), json.dumps(spec, indent=2) + "\n")
    if overwrite:
        report.removed = _remove_stale(out_dir, written)
    return report


def _renamed(path: str, indexed: list[dict], exported: set[int], names: dict[int, str], held_by: dict,
             wanted: list[str]) -> list[dict]:
    """The annotations of ``path`` with each vid (an index name: path relative to the root, or file stem) the
    exported name; one line naming the record when its video is not exported."""
    try:
        records = load_annotations(path)
    except ModelError as err:
        raise VmrError(str(err)) from None
    id_of = {}
    for video in indexed:
        id_of[video["path"]] = id_of[names[int(video["id"])]] = int(video["id"])
    out = []
    for n, record in enumerate(records, 1):
        vid = str(record["vid"]).replace(os.sep, "/")
        video_id = id_of.get(vid)
        if video_id not in exported:
            why = ("no indexed video has that path or file name" if video_id is None else
                   "it lacks " + ", ".join(f"'{k}' features" for k in wanted if k not in held_by[video_id]))
            raise VmrError(f"{path}: record {n} (qid {record['qid']}) names video {vid!r}, which this export does "
                           f"not hold ({why}): fix its vid, or add the video to the index")
        out.append({**record, "vid": names[video_id]})
    return out


def _unique_queries(renamed: list[tuple[str, list[dict]]]) -> dict:
    """{qid: query} over every annotation file; a qid given two queries is refused (one text file a qid)."""
    queries: dict = {}
    for path, records in renamed:
        for record in records:
            qid, query = record["qid"], record["query"]
            if queries.setdefault(qid, query) != query:
                raise VmrError(f"{path}: qid {qid} has the query {query!r} here and {queries[qid]!r} elsewhere: the "
                               "text features are one file a qid, give each query its own qid")
    return queries


def _check_out_dir(out_dir: str, overwrite: bool, annotation_names: list[str]) -> None:
    clash = [n for n in annotation_names if n in (VIDEOS_FILE, SPEC_FILE)]
    if clash or len(set(annotation_names)) < len(annotation_names):
        raise VmrError(f"annotation files are written into {out_dir} under their own names: give files named "
                       f"apart and other than {VIDEOS_FILE} / {SPEC_FILE}")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise VmrError(f"{out_dir} is not empty: export into a new or empty folder, or give --overwrite to replace "
                       "the export there")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise VmrError(f"{out_dir} is a file: give a folder for --out")


def _save_npz(out_dir: str, folder: str, name: str, key: str, array: np.ndarray) -> str:
    """Write ``DIR/folder/name.npz`` ({key: f32 array}) atomically; returns its path."""
    directory = os.path.join(out_dir, folder)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name + ".npz")
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **{key: np.ascontiguousarray(array, dtype=np.float32)})
    os.replace(path + ".tmp", path)
    return path


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _remove_stale(out_dir: str, written: set[str]) -> int:
    """Remove the .npz files of ``out_dir``'s *_features folders that are not in ``written``; their count."""
    removed = 0
    for folder in os.listdir(out_dir):
        directory = os.path.join(out_dir, folder)
        if not (folder.endswith("_features") and os.path.isdir(directory)):
            continue
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.endswith(".npz") and path not in written:
                os.remove(path)
                removed += 1
    return removed
