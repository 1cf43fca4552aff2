"""The synthetic TEST world: small videos and tiny models with exact ground truth, for tests, bench and `vmr demo`.

A leaf beside the product: product code imports it only in `vmr demo` (cli.py, lazily); bench/ and tests/ use it.

A test fixture and a demo, never a default for real use. It exists so that search (coarse stage, reranker,
merging, metrics) can be measured end to end offline, with exact ground truth:

- ``scene``      vocabulary (colours, shapes, positions), frame rendering, sentences;
- ``generator``  writes a library of videos + annotation jsonl (QVHighlights fields) with ground-truth windows;
- ``train_clip`` trains the tiny open_clip model (``world_clip.json`` + ``world_clip.pt``) so that text and
  frames of this world align;
- ``demo``       ``vmr demo``: build, index, train/load the world's reranker, answer queries;
- ``videos``     plain test videos (flat-colour scenes in several codecs/containers, and broken files) for ingest;
- ``vectors``    CLIP-like random unit vectors for index tests and benchmarks (no video at all);
- ``corpus``     corpus metrics of a library search on annotated sentences (video recall, VCMR R@k);
- ``clip_tiny.json`` a 32-dim open_clip config used with random weights where only shapes and plumbing matter.
"""
from pathlib import Path

WORLD_DIR = Path(__file__).resolve().parent
WORLD_CLIP_CONFIG = WORLD_DIR / "world_clip.json"  # open_clip model config (tiny)
WORLD_CLIP_WEIGHTS = WORLD_DIR / "world_clip.pt"  # its trained weights (fp16 state_dict)
WORLD_RERANKER = WORLD_DIR / "world_reranker.pt"  # tiny LLMEPET trained with `vmr train` on the world
CLIP_TINY_CONFIG = WORLD_DIR / "clip_tiny.json"  # untrained 32-dim open_clip config (random weights in tests)
