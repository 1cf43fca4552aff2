"""Where the project's shared data (../shared/data: annotations, official eval samples, the real video) lives.

The checkout sits beside ../shared; VMR_SHARED_DATA overrides that (e.g. for a clone elsewhere).
"""
from __future__ import annotations

import os
from pathlib import Path

_candidates = [os.environ.get("VMR_SHARED_DATA"), Path(__file__).resolve().parents[2] / "shared" / "data",
               "/work/shared/data"]
SHARED_DATA = next((Path(c) for c in _candidates if c and Path(c).is_dir()), Path(_candidates[1]))
