"""Where the project's shared data and the authors' code live, when they are on this machine.

SHARED_DATA (annotations, official eval samples, authors_golden/, the real video): the checkout sits beside
../shared; VMR_SHARED_DATA overrides that (e.g. for a clone elsewhere).
AUTHORS_REPO: a read-only checkout of github fletcherjiang/LLMEPET at ../ref/fletcherjiang+LLMEPET, or where
VMR_AUTHORS_LLMEPET says (as bench/rerank.py); tests that need it skip when it is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parents[2]  # the folder that holds this checkout
_candidates = [os.environ.get("VMR_SHARED_DATA"), _HERE / "shared" / "data", "/work/shared/data"]
SHARED_DATA = next((Path(c) for c in _candidates if c and Path(c).is_dir()), Path(_candidates[1]))
AUTHORS_REPO = Path(os.environ.get("VMR_AUTHORS_LLMEPET") or _HERE / "ref" / "fletcherjiang+LLMEPET")
