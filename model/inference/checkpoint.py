"""Self-contained LLMEPET checkpoints: everything needed to rebuild the model and to refuse features it was not
trained on. Loaded with ``torch.load(weights_only=True)`` (plain dicts, lists, numbers, strings and tensors only).

Layout (a dict):
    format, version          "vmr-llmepet", 1
    model_config             ModelConfig.to_dict()
    data_config              DataConfig.to_dict() (max lengths, clip length, normalisation, feature dirs)
    feature_spec             clip_model, video_kinds, video_dims, text_dim, clip_seconds
    dataset                  qvhighlights | charades | tacos | custom (post-processing rule)
    state                    the model's state_dict without the frozen LLM blocks when those are referenced
    llm                      {"mode": "embedded", "stored_as"} or {"mode": "reference", "source", "layers", "sha256"}
                             or {"mode": "file", "path", "prefix", "sha256"} (blocks in an authors' checkpoint)
    train_state (optional)   optimizer / scheduler state, epoch, best score, train config (for --resume)
    metrics (optional)       the validation "brief" metrics of this checkpoint

The frozen LLM blocks (3 LLaMA-7B layers: ~600M parameters) are stored as a reference to their source (HF id,
directory or consolidated.pth) plus a SHA-256 of their bf16 values; loading re-reads them and refuses a source
whose weights changed. Random LLM blocks (tests, synthetic world) cannot be re-read, so they are embedded, as
they are when ``embed_llm=True``. Converted checkpoints either embed them or (``llm_file``) reference the authors'
checkpoint they came from by absolute path plus a SHA-256 of the block tensors exactly as stored there; loading
reads them from it (memory-mapped) and refuses a file that is missing or whose blocks changed. Embedded blocks are
stored in the narrowest dtype that holds their values exactly (bf16 or fp16: released LLM weights and our random blocks
are such values; anything else stays fp32), so storage never changes a prediction; version-1 files holding fp32 blocks
load unchanged. Loading memory-maps the file (zip format) and assigns the stored tensors (no random init, no fp32 copy
first), then casts them once, to the precision asked for (model.inference.precision) or else the config's
``llm_dtype``; int8 quantization releases each layer's mapped pages as it goes (model.inference.file_pages), so the
stored blocks are never resident whole.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import warnings

import torch

from model.config import ModelConfig
from model.data.providers import check_feature_spec
from model.data.sample import DataConfig
from model.errors import ModelError, weights_file_problem
from model.inference.file_pages import release_file_pages
from model.inference.precision import apply_precision
from model.net.llmepet import LLMEPET, _llm_dtype, build_model

FORMAT, VERSION = "vmr-llmepet", 1
LLM_BLOCK_PREFIX = "llm.blocks."


def llm_blocks_sha256(model) -> str:
    """SHA-256 of the LLM blocks' weights (names, shapes, values cast to bf16 so fp32 and bf16 copies of the
    same source agree)."""
    h = hashlib.sha256()
    for name, t in sorted(model.llm.blocks.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def tensors_sha256(state: dict, release: bool = False) -> str:
    """SHA-256 of named tensors exactly as stored (names, dtypes, shapes, raw bytes): no cast, no copy.
    release: drop each memory-mapped tensor's pages from RSS once hashed (release_file_pages)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        flat = t.detach().contiguous()
        h.update(memoryview(flat.view(torch.uint8).reshape(-1).numpy()) if flat.numel() else b"")
        if release:
            release_file_pages(t)
    return h.hexdigest()


def _embeds_llm(cfg: ModelConfig, embed_llm: bool) -> bool:
    return embed_llm or cfg.llm in ("", "random")


def save_checkpoint(path: str, model, data_cfg: DataConfig, feature_spec: dict, dataset: str,
                    train_state: dict | None = None, metrics: dict | None = None, embed_llm: bool = False,
                    llm_file: dict | None = None) -> None:
    """Write ``model`` (an LLMEPET) and its data/feature settings to ``path`` atomically.

    llm_file: {"path", "prefix", "sha256"}: the frozen LLM blocks are not written but read at load from the
        torch file ``path`` (its "model" state_dict, keys ``prefix`` + our block names' tail).
    """
    cfg: ModelConfig = model.cfg
    state = model.state_dict()
    if llm_file is not None:
        llm = {"mode": "file", **llm_file}
        state = {k: v for k, v in state.items() if not k.startswith(LLM_BLOCK_PREFIX)}
    elif _embeds_llm(cfg, embed_llm):
        state, stored_as = compact_llm_blocks(state)
        llm = {"mode": "embedded", "stored_as": stored_as}
    else:
        # the blocks are frozen, so their digest is computed once per model (it reads ~1 GB for LLaMA-7B layers)
        digest = getattr(model.llm, "_vmr_sha256", None) or llm_blocks_sha256(model)
        model.llm._vmr_sha256 = digest
        llm = {"mode": "reference", "source": cfg.llm, "layers": cfg.llm_layers, "sha256": digest}
        state = {k: v for k, v in state.items() if not k.startswith(LLM_BLOCK_PREFIX)}
    ckpt = {"format": FORMAT, "version": VERSION, "model_config": cfg.to_dict(), "data_config": data_cfg.to_dict(),
            "feature_spec": dict(feature_spec), "dataset": dataset,
            "state": {k: v.detach().cpu() for k, v in state.items()}, "llm": llm}
    if train_state is not None:
        ckpt["train_state"] = train_state
    if metrics is not None:
        ckpt["metrics"] = {k: float(v) for k, v in metrics.items()}
    write_checkpoint(ckpt, path)


def write_checkpoint(ckpt: dict, path: str) -> None:
    """Save ``ckpt`` to ``path`` through a temporary file and a rename: a crash never leaves half a checkpoint, and
    a process that has the old file memory-mapped (read_checkpoint) keeps reading the old file, not one being
    overwritten under it (writing in place over a mapping crashes that process with SIGBUS)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".ckpt-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _lossless_dtype(t: torch.Tensor) -> torch.dtype:
    """The narrowest of bf16 / fp16 that holds every value of float tensor ``t`` exactly, else its own dtype."""
    if not t.is_floating_point() or t.element_size() <= 2:
        return t.dtype
    for dtype in (torch.bfloat16, torch.float16):
        if torch.equal(t.to(dtype).to(t.dtype), t):
            return dtype
    return t.dtype


def compact_llm_blocks(state: dict) -> tuple[dict, str]:
    """``state`` with the frozen LLM block tensors in their narrowest lossless dtype; (state, what was used:
    "bfloat16" | "float16" | "float32" | "mixed")."""
    out, used = dict(state), set()
    for k, v in state.items():
        if k.startswith(LLM_BLOCK_PREFIX):
            dtype = _lossless_dtype(v)
            out[k] = v.to(dtype)
            used.add(str(dtype).removeprefix("torch."))
    return out, (used.pop() if len(used) == 1 else "mixed" if used else "none")


def load_weights_only(path: str, expected: str = "a file written by `vmr train` or `vmr convert-checkpoint`",
                      mmap: bool = False):
    """``torch.load`` restricted to plain data and tensors, plus argparse.Namespace (the authors' checkpoints keep
    their options in one), allow-listed with add_safe_globals. ModelError (one line) when missing or unreadable.
    mmap: map the tensors' bytes instead of reading them (zip-format files; others are read whole)."""
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        with warnings.catch_warnings():  # torch warns (several lines) about pickle protocols of foreign files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
    except Exception as err:  # noqa: BLE001 - unreadable / unsafe pickle: the user's file to fix
        raise ModelError(f"cannot read checkpoint {path}: {weights_file_problem(path, err)} (give {expected})") \
            from None


def _is_zip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _blocks_from_file(llm: dict, path: str) -> dict:
    """Our LLM block tensors read from the authors' checkpoint a converted one references, checked by digest."""
    src, fix = llm["path"], (f"put it back there, or convert it again with `vmr convert-checkpoint SRC {path} "
                             f"--llm-blocks copy` to embed the blocks")
    if not os.path.isfile(src):
        raise ModelError(f"{path}: its frozen LLM blocks are read from {src}, which is missing ({fix})")
    theirs = load_weights_only(src, expected="the authors' checkpoint it was converted from", mmap=True)
    theirs = theirs.get("model", {}) if isinstance(theirs, dict) else {}
    blocks = {}
    for key, value in theirs.items():
        key = key.removeprefix("module.")
        if key.startswith(llm["prefix"]):
            blocks[LLM_BLOCK_PREFIX + key[len(llm["prefix"]):]] = value
    if tensors_sha256(blocks, release=True) != llm["sha256"]:  # hashed, not held: pages come back when used
        raise ModelError(f"{path}: the frozen LLM blocks in {src} changed since it was converted ({fix})")
    return blocks


def read_checkpoint(path: str) -> dict:
    """The raw checkpoint dict (weights_only). ModelError when it is not a vmr LLMEPET checkpoint."""
    ckpt = load_weights_only(path, mmap=True)  # blocks are paged in as they are cast or quantized, not read whole
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = " (an authors' checkpoint? convert it with `vmr convert-checkpoint`)" \
            if isinstance(ckpt, dict) and "model" in ckpt else ""
        raise ModelError(f"{path} is not a vmr LLMEPET checkpoint{hint}")
    if ckpt.get("version", 0) > VERSION:
        raise ModelError(f"{path} was written by a newer vmr (checkpoint version {ckpt['version']})")
    return ckpt


def load_checkpoint(path: str, device="cpu", features: dict | None = None, what: str = "these features",
                    ckpt: dict | None = None, precision: str | None = None, log=None):
    """Rebuild the model of a checkpoint.

    Args:
        features: the feature spec of the data it will see (provider.feature_spec()); refused with ModelError
            when it does not match the checkpoint's.
        ckpt: the dict ``read_checkpoint(path)`` already returned (saves reading a large file twice).
        precision: "auto" | "fp32" | "bf16" | "int8": the frozen LLM blocks' precision for inference
            (model.inference.precision.apply_precision; ``log`` gets its one line); None: the config's ``llm_dtype``.
    Returns: (model in eval mode on ``device``, checkpoint dict); ``model.precision`` says what runs.
    """
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    if features is not None:
        check_feature_spec(ckpt["feature_spec"], features, what)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    llm = ckpt["llm"]
    if llm["mode"] == "file":
        ckpt["state"].update(_blocks_from_file(llm, path))
    if llm["mode"] in ("embedded", "file"):
        # the blocks take the stored tensors as they are: no random init of ~0.6 B parameters, no fp32 copy
        model = LLMEPET(cfg, llm_blocks_on_meta=True)
        _load_state(model, ckpt["state"], path, allowed_missing=(), assign=True)
        if precision is not None:  # the model owns the block tensors now: casting/quantizing can release them
            for key in [k for k in ckpt["state"] if k.startswith(LLM_BLOCK_PREFIX)]:
                del ckpt["state"][key]
        model.llm.freeze()
        if precision is None:
            model.llm.blocks.to(_llm_dtype(cfg, device))
            model.llm.norm.to(_llm_dtype(cfg, device))
        model.to(device)
    else:
        if (llm["source"], llm["layers"]) != (cfg.llm, cfg.llm_layers):
            raise ModelError(f"{path}: inconsistent LLM reference")
        model = build_model(cfg, llm_weights=True, device=device)
        digest = llm_blocks_sha256(model)
        model.llm._vmr_sha256 = digest
        if digest != llm["sha256"]:
            raise ModelError(f"LLM weights read from {llm['source']} (layers {llm['layers']}) differ from those "
                             f"{path} was trained with (sha256 {digest[:12]} != {llm['sha256'][:12]})")
        blocks = {k for k in model.state_dict() if k.startswith(LLM_BLOCK_PREFIX)}
        _load_state(model, ckpt["state"], path, allowed_missing=blocks)
    model.precision = apply_precision(model, precision, device, log) if precision is not None else None
    model.eval()
    return model, ckpt


def _load_state(model, state: dict, path: str, allowed_missing, assign: bool = False) -> None:
    result = model.load_state_dict(state, strict=False, assign=assign)
    missing = set(result.missing_keys) - set(allowed_missing)
    if missing or result.unexpected_keys:
        raise ModelError(f"{path} does not fit the model its config describes "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(result.unexpected_keys)[:3]})")


def data_config_of(ckpt: dict) -> DataConfig:
    return DataConfig.from_dict(ckpt["data_config"])
