"""`vmr demo` (small: 3 videos, none 10-min) leaves an index that records its reranker, prints the `vmr serve`
command for it last, and a server on that index reranks with no --checkpoint."""
from __future__ import annotations

import pytest

from world import WORLD_RERANKER

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not WORLD_RERANKER.is_file(), reason="world reranker not trained")]


@pytest.mark.slow  # ~30 s: a real (small) ingest and the corpus metrics
def test_demo_records_its_reranker_and_says_how_to_serve(tmp_path, capsys, ray_session):
    from server.state import ServerState
    from store import db
    from world.demo import run_demo

    metrics = run_demo(str(tmp_path), n_videos=3, n_shown=2, long_videos=0)
    assert set(metrics) == {"coarse", "rerank"}
    lines = capsys.readouterr().out.rstrip().splitlines()
    index = tmp_path / "index"
    assert lines[-1].strip() == f"vmr serve --index {index}"
    assert lines[-2].strip().startswith("vmr search ") and "--checkpoint" not in lines[-2]
    con = db.connect(index, read_only=True)
    try:
        assert db.read_meta(con)["reranker"] == str(WORLD_RERANKER.resolve())
    finally:
        con.close()
    state = ServerState(str(index), device="cpu")  # what `vmr serve --index` builds: no checkpoint given
    try:
        assert state.engine.reranker is not None
        moments, _ = state.search("a red circle appears on the left", 3)
        assert moments and all(m["reranked"] for m in moments)
    finally:
        state.close()
