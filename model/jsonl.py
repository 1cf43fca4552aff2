"""jsonl files (one JSON record a line): the annotations training and prediction read (model.data.dataset) and the
submissions and ground truth the metrics read (model.inference.metrics)."""
from __future__ import annotations

import json
from pathlib import Path

from model.errors import ModelError


def load_jsonl(path: str | Path) -> list[dict]:
    """Records of a jsonl file (a missing final newline is fine). ModelError names the bad line."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ModelError(f"{path}:{n}: not valid JSON ({err.msg})") from None
                    if not isinstance(records[-1], dict):
                        raise ModelError(f"{path}:{n}: not a JSON object (jsonl: one {{...}} record a line)")
    except UnicodeDecodeError:
        raise ModelError(f"{path} is not a UTF-8 text file (jsonl: one JSON record a line)") from None
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err.strerror}") from None
    return records
