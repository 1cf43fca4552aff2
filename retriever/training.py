"""`vmr train --index`: what training on an index adds around model.train (model/ never reads an index itself).

- ``labels_for_training``: the labels people made in `vmr serve` exported as training records beside --out
  (plus any --train records), so `vmr train --labels` reads the same jsonl format as hand-written annotations.
- ``fit_after_training``: the ranking rule fit on the --val queries of the index (retriever/fit_score.py) and
  stored in the checkpoint that training just wrote.
"""
from __future__ import annotations

from retriever.fit_score import describe_fit, fit_checkpoint
from store.errors import VmrError
from store.labels import export_labels


def labels_for_training(index_dir: str, train_path: str | None, out_path: str) -> tuple[str, str]:
    """Export the index's labels to ``{out_path}.labels.jsonl``; merge with ``train_path`` if given.

    Returns (the jsonl path to train on, a one-line report for the user).
    """
    labels_path = f"{out_path}.labels.jsonl"
    report = export_labels(index_dir, labels_path)
    line = (f"labels: {report['records']} training records from {report['labels']} labels in {index_dir}"
            + (f" ({report['stale']} stale skipped)" if report.get("stale") else ""))
    if train_path is None:
        if not report["records"]:
            raise VmrError(f"{index_dir} holds no accepted or marked labels to train on (label hits in `vmr serve`)")
        return labels_path, line
    merged = f"{out_path}.train.jsonl"
    with open(merged, "w", encoding="utf-8") as out:
        for path in (train_path, labels_path):
            with open(path, encoding="utf-8") as f:
                out.writelines(row if row.endswith("\n") else row + "\n" for row in f if row.strip())
    return merged, line


def fit_after_training(index_dir: str, checkpoint: str, val_path: str | None, device: str) -> str:
    """Fit the ranking rule on the --val queries and store it in ``checkpoint``; the line to print."""
    if not val_path:
        return "no --val: search ranks by the model's confidence alone (give --val to fit the ranking rule)"
    from model.data.dataset import load_annotations  # lazy: torch, only when there are --val queries to fit on

    return describe_fit(fit_checkpoint(index_dir, checkpoint, load_annotations(val_path), device))
