"""SlowFast-R50 8x8 weights into model/slowfast.py's SlowFastR50, from either published layout.

- PySlowFast's Caffe2 checkpoint ``SLOWFAST_8x8_R50.pkl`` (Kinetics-400, top-1 77.0): the weights behind the public
  QVHighlights / Charades-STA / TACoS SlowFast features. A Python-2 pickle ``{"blobs": {caffe2 name: ndarray}}``.
  It is read with a restricted unpickler (numpy arrays, dicts and plain values only: ``pickle.load`` would run any
  code the file names) and mapped through CAFFE2_NAMES, written from PySlowFast's Caffe2 name conversion. Every
  model key must be filled with the right shape: the reference extractor loads with ``strict=False`` and skips a
  mismatched blob with a log line, leaving that layer random - here that is a one-line refusal. Optimiser and
  bookkeeping blobs (``*_momentum``, ``lr``, ``model_iter``) and the classifier (``pred_*``) are ignored.
- pytorchvideo's ``slowfast_r50`` (``{"model_state": state_dict}``, as its hub serves ``SLOWFAST_8x8_R50.pyth``),
  mapped through PYTORCHVIDEO_NAMES. Same network, but a different training run (top-1 76.4-76.9): its features
  are NOT the public ones, so a checkpoint trained on the public features should not be fed them.

    load_slowfast_state(path) -> (state dict of SlowFastR50, source: "caffe2" | "pytorchvideo")
    build_slowfast(path) -> SlowFastR50 in eval mode with those weights
    find_slowfast_weights(given, recorded) -> the file an ingest uses (given, recorded in the index, or cached)
"""
from __future__ import annotations

import importlib
import os
import pickle
import zipfile

import numpy as np
import torch

from model.errors import ModelError, WeightsNotFound, weights_file_problem
from model.inference.slowfast import FUSED_AFTER, STAGE_DEPTHS, STAGES, SlowFastR50

CAFFE2_URL = "https://dl.fbaipublicfiles.com/pyslowfast/model_zoo/kinetics400/SLOWFAST_8x8_R50.pkl"
PUBLIC_WEIGHTS_HINT = (f"the public features' weights are PySlowFast's SLOWFAST_8x8_R50.pkl ({CAFFE2_URL}, "
                       "PySlowFast MODEL_ZOO.md); download it where there is a network and pass that file")

_BN_SUFFIX_CAFFE2 = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
# Caffe2's SpatialBN stores the running variance under "riv"; PySlowFast maps it straight to running_var.


def _units():
    """Every ConvBN of SlowFastR50 as (our prefix, Caffe2 conv blob, Caffe2 bn blob prefix, pytorchvideo conv key,
    pytorchvideo norm prefix)."""
    for p, (ours, t) in enumerate((("slow", ""), ("fast", "t_"))):
        yield (f"{ours}.stem", f"{t}conv1", f"{t}res_conv1_bn",
               f"blocks.0.multipathway_blocks.{p}.conv", f"blocks.0.multipathway_blocks.{p}.norm")
        for s, (name, depth) in enumerate(zip(STAGES, STAGE_DEPTHS), start=2):
            ptv_stage = f"blocks.{s - 1}.multipathway_blocks.{p}.res_blocks"
            for i in range(depth):
                for part in "abc":
                    c2 = f"{t}res{s}_{i}_branch2{part}"
                    yield (f"{ours}.{name}.{i}.{part}", c2, f"{c2}_bn",
                           f"{ptv_stage}.{i}.branch2.conv_{part}", f"{ptv_stage}.{i}.branch2.norm_{part}")
            c2 = f"{t}res{s}_0_branch1"
            yield (f"{ours}.{name}.0.shortcut", c2, f"{c2}_bn",
                   f"{ptv_stage}.0.branch1_conv", f"{ptv_stage}.0.branch1_norm")
    for k, name in enumerate(FUSED_AFTER):
        # the fusion after res{s} hangs off the fast pathway's last block of that stage in Caffe2's names
        c2 = "t_pool1_subsample" if name == "stem" else f"t_{name}_{STAGE_DEPTHS[k - 1] - 1}_branch2c_bn_subsample"
        ptv = f"blocks.{k}.multipathway_fusion"
        yield f"fuse.{name}", c2, f"{c2}_bn", f"{ptv}.conv_fast_to_slow", f"{ptv}.norm"


def _tables():
    caffe2, ptv = {}, {}
    for ours, c2_conv, c2_bn, ptv_conv, ptv_norm in _units():
        caffe2[f"{ours}.conv.weight"] = f"{c2_conv}_w"
        ptv[f"{ours}.conv.weight"] = f"{ptv_conv}.weight"
        for field, suffix in _BN_SUFFIX_CAFFE2.items():
            caffe2[f"{ours}.bn.{field}"] = f"{c2_bn}_{suffix}"
            ptv[f"{ours}.bn.{field}"] = f"{ptv_norm}.{field}"
    return caffe2, ptv


CAFFE2_NAMES, PYTORCHVIDEO_NAMES = _tables()  # our state-dict key -> the checkpoint's name


class _BlobUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists and plain values; refuses every other global (they would run code)."""

    _numpy_core = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # how a Python-3 pickle at protocol 2 writes bytes (a str -> bytes conversion)
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unsupported GLOBAL {module}.{name}")
        if module.startswith("numpy.") and module.endswith(".multiarray"):
            return getattr(importlib.import_module(f"{self._numpy_core}.multiarray"), name)
        if module == "numpy":
            return getattr(np, name)
        return getattr(importlib.import_module(module), name)


def _read_caffe2(path: str) -> dict:
    with open(path, "rb") as f:
        data = _BlobUnpickler(f, encoding="latin1").load()
    blobs = data.get("blobs", data) if isinstance(data, dict) else None
    if not isinstance(blobs, dict):
        raise ModelError(f"SlowFast weights {path}: not a Caffe2 checkpoint (no 'blobs' dict)")
    return blobs


def _fill(path: str, names: dict, found: dict, source: str) -> dict:
    """Our state dict from ``found`` (checkpoint name -> array) via ``names``; refuses gaps and wrong shapes.

    Names the table does not ask for (optimiser momenta, lr, model_iter, the classifier, num_batches_tracked) are
    never looked at.
    """
    with torch.device("meta"):  # shapes only: no 34M-parameter initialisation
        expected = SlowFastR50().state_dict()
    missing = [key for key in expected if names[key] not in found]
    if missing:
        first = names[missing[0]]
        raise ModelError(f"SlowFast weights {path}: not a complete {source} SlowFast-R50 8x8 checkpoint: "
                         f"{len(missing)} of {len(expected)} weights missing (first: {first})")
    state = {}
    for key, ref in expected.items():
        value = found[names[key]]
        if not torch.is_tensor(value):
            try:
                value = torch.from_numpy(np.array(value, dtype=np.float32))
            except (TypeError, ValueError):
                raise ModelError(f"SlowFast weights {path}: {names[key]} is not a numeric array") from None
        if tuple(value.shape) != tuple(ref.shape):
            raise ModelError(f"SlowFast weights {path}: {names[key]} has shape {tuple(value.shape)}, SlowFast-R50 "
                             f"8x8 needs {tuple(ref.shape)}")
        state[key] = value.to(torch.float32).clone()
    return state


def _is_torch_file(path: str) -> bool:
    return zipfile.is_zipfile(path) or path.endswith((".pyth", ".pth", ".pt"))


def load_slowfast_state(path) -> tuple[dict, str]:
    """SlowFastR50's state dict from a Caffe2 ``.pkl`` or a pytorchvideo checkpoint, and which of the two it was.

    Raises ModelError (one line) if the file is missing or unreadable, or leaves a model key unfilled.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"SlowFast weights {path}: {weights_file_problem(path, FileNotFoundError())}; "
                         f"{PUBLIC_WEIGHTS_HINT}")
    if _is_torch_file(path):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - reworded into one line
            raise ModelError(f"SlowFast weights {path}: {weights_file_problem(path, err)}") from None
        state = data.get("model_state", data) if isinstance(data, dict) else None
        if not isinstance(state, dict):
            raise ModelError(f"SlowFast weights {path}: not a pytorchvideo checkpoint (no 'model_state' dict)")
        return _fill(path, PYTORCHVIDEO_NAMES, state, "pytorchvideo"), "pytorchvideo"
    try:
        blobs = _read_caffe2(path)
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - reworded into one line
        if "unsupported GLOBAL" in str(err):
            reason = weights_file_problem(path, err)  # names the code the file asks to run
        else:
            reason = f"not a readable Caffe2 pickle (truncated or corrupt: {type(err).__name__})"
        raise ModelError(f"SlowFast weights {path}: {reason}") from None
    return _fill(path, CAFFE2_NAMES, blobs, "Caffe2"), "caffe2"


def build_slowfast(path) -> SlowFastR50:
    """SlowFastR50 in eval mode with the weights of ``path`` (either layout; see load_slowfast_state)."""
    state, _ = load_slowfast_state(path)
    with torch.device("meta"):
        model = SlowFastR50()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


WEIGHTS_FILE = "SLOWFAST_8x8_R50.pkl"  # its name in PySlowFast's model zoo, and in the cache folder
PYTORCHVIDEO_URL = "https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/kinetics/SLOWFAST_8x8_R50.pyth"


def cache_dir() -> str:
    """Where vmr looks for SlowFast weights no one named: $VMR_CACHE/slowfast, else ~/.cache/vmr/slowfast."""
    root = os.environ.get("VMR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vmr")
    return os.path.join(root, "slowfast")


def find_slowfast_weights(given=None, recorded: str | None = None) -> str:
    """The weights file of a run, as an absolute path: ``given`` (--slowfast-weights), else the one the index
    ``recorded``, else the cache folder's SLOWFAST_8x8_R50.pkl (or .pyth). Raises one line when there is none."""
    if given is not None:
        path = os.path.abspath(os.fspath(given))
        if not os.path.isfile(path):
            raise WeightsNotFound(f"--slowfast-weights {given}: {weights_file_problem(path, OSError())}; "
                                          f"{PUBLIC_WEIGHTS_HINT}")
        return path
    if recorded:
        if not os.path.isfile(recorded):
            raise WeightsNotFound(f"the index's SlowFast weights {recorded} are gone: pass "
                                          "--slowfast-weights FILE (the same file: its sha256 is recorded)")
        return recorded
    for name in (WEIGHTS_FILE, WEIGHTS_FILE.replace(".pkl", ".pyth")):
        path = os.path.join(cache_dir(), name)
        if os.path.isfile(path):
            return path
    raise WeightsNotFound(
        f"no SlowFast weights: {WEIGHTS_FILE} is neither given (--slowfast-weights FILE) nor in {cache_dir()}; it "
        f"comes from the PySlowFast model zoo ({CAFFE2_URL}; pytorchvideo's hub serves a different training run, "
        f"{PYTORCHVIDEO_URL}): download it where there is a network and pass it or put it there")


def weights_layout(path) -> str:
    """"caffe2" | "pytorchvideo": the layout load_slowfast_state reads ``path`` as."""
    return "pytorchvideo" if _is_torch_file(os.fspath(path)) else "caffe2"
