"""Convert an authors' LLMEPET checkpoint ({"model": state_dict, "opt": argparse.Namespace}) to ours.

Parameter names are renamed by prefix (AUTHORS_TO_OURS); shapes (hidden size, layer counts, dummy/prompt/query
counts, LLM width, heads, FFN width and the number of LLM layers) are read from the state_dict, the rest of the
configuration from ``opt``. The converted configuration has ``compat="authors"``: it reproduces the authors'
computation (LLM attention across the batch, their T2V mask layout, no pseudo-event loss). A checkpoint without
LLaMA blocks (``n_layers 0``: the paper's ablation) converts to ``llm_layers "0:0"``.

Tensors their forward never reads are dropped (UNUSED_PREFIXES).
"""
from __future__ import annotations

import argparse
import os
import re

import torch

from model.config import ModelConfig
from model.data.providers import DEFAULT_PUBLIC_CLIP_MODEL as PUBLIC_CLIP_MODEL, FEATURE_KINDS
from model.data.sample import DataConfig
from model.errors import ModelError
from model.inference.checkpoint import LLM_BLOCK_PREFIX, load_weights_only, save_checkpoint, tensors_sha256
from model.net.llm_blocks import LLAMA_HEAD_DIM
from model.net.llmepet import LLMEPET

# (authors' prefix, ours); the first matching prefix wins, so longer prefixes come first.
AUTHORS_TO_OURS: list[tuple[str, str]] = [
    ("transformer.llama.layers.", "llm.blocks."),
    ("transformer.llama.norm.", "llm.norm."),
    ("transformer.llama_dim_mapper1.", "llm.to_llm."),
    ("transformer.llama_dim_mapper2.", "llm.from_llm."),
    ("transformer.mcls_encoder.", "moment_encoder."),
    ("transformer.t2v_encoder.", "t2v_encoder."),
    ("transformer.encoder.", "encoder."),
    ("transformer.decoder.", "decoder."),
    ("txtproj_encoder.", "dummy_encoder."),
    ("scls_encoder.", "sentence_encoder."),
    ("token_type_embeddings.", "token_type."),
    ("txt_position_embed.position_embeddings.", "txt_pos.table."),
    ("txt_position_embed.LayerNorm.", "txt_pos.norm."),
    ("query_embed.", "query_anchors."),
    ("class_embed.", "class_head."),
    ("event_span_embed.", "event_head."),
    ("span_embed.", "span_head."),
    ("saliency_proj1.", "saliency_proj_clip."),
    ("saliency_proj2.", "saliency_proj_global."),
    ("contrastive_align_projection_query.", "align_proj_query."),
    ("contrastive_align_projection_txt.", "align_proj_txt."),
    ("contrastive_align_projection_vid.", "align_proj_vid."),
    ("dummy_rep_token", "dummy_tokens"),
    ("dummy_rep_pos", "dummy_pos"),
    ("sent_rep_token", "sentence_token"),
    ("sent_rep_pos", "sentence_pos"),
    ("moment_rep_token", "moment_token"),
    ("moment_rep_pos", "moment_pos"),
    ("global_rep_token", "saliency_prompts"),
    ("global_rep_pos", "saliency_pos"),
]
# input projections: input_{vid,txt}_proj.<i>.LayerNorm. / .net.1.
_PROJECTION = re.compile(r"^input_(vid|txt)_proj\.(\d+)\.(LayerNorm|net\.1)\.")
_PROJECTION_PART = {"LayerNorm": "norm", "net.1": "linear"}

# Built by their model but never read by its forward.
UNUSED_PREFIXES = ("llama_dim_mapper1.", "llama_dim_mapper2.", "token_fc.", "txt_proj_linear.")


def authors_key_to_ours(key: str) -> str | None:
    """Our name for an authors' parameter name; None for tensors their forward never uses."""
    if key.startswith(UNUSED_PREFIXES):
        return None
    m = _PROJECTION.match(key)
    if m:
        return f"{m.group(1)}_proj.{m.group(2)}.{_PROJECTION_PART[m.group(3)]}.{key[m.end():]}"
    for theirs, ours in AUTHORS_TO_OURS:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    raise ModelError(f"unexpected parameter {key!r} in the authors' checkpoint")


def ours_key_to_authors(key: str) -> str:
    """Inverse of ``authors_key_to_ours`` (for tests and for exporting)."""
    m = re.match(r"^(vid|txt)_proj\.(\d+)\.(norm|linear)\.", key)
    if m:
        part = {v: k for k, v in _PROJECTION_PART.items()}[m.group(3)]
        return f"input_{m.group(1)}_proj.{m.group(2)}.{part}.{key[m.end():]}"
    for theirs, ours in AUTHORS_TO_OURS:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise ModelError(f"no authors' name for {key!r}")


def _count(state: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def config_from_authors(state: dict, opt) -> ModelConfig:
    """Our configuration for an authors' state_dict (shapes) and options (the rest)."""
    o = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt or {})
    d = state["class_embed.weight"].shape[1]
    n_llm = _count(state, "transformer.llama.layers.")
    first = int(o.get("first_layer", 14)) if n_llm else 0
    llm_shapes = dict(llm_dim=state["transformer.llama_dim_mapper1.weight"].shape[0])
    if n_llm:  # with no blocks (the paper's ablation) the head and FFN shapes do not exist: defaults stand
        wq = state["transformer.llama.layers.0.attention.wq.weight"]
        llm_shapes.update(
            llm_heads=wq.shape[0] // LLAMA_HEAD_DIM,  # their blocks: dim // 128 heads (32 for LLaMA-7B)
            llm_kv_heads=state["transformer.llama.layers.0.attention.wk.weight"].shape[0] // LLAMA_HEAD_DIM,
            llm_ffn_dim=state["transformer.llama.layers.0.feed_forward.w1.weight"].shape[0])
    dset = o.get("dset_name", "hl")
    defaults = ModelConfig()
    keep = {k: o[k] for k in ("nheads", "dim_feedforward", "dropout", "input_dropout", "use_txt_pos", "num_prompts",
                              "contrastive_hdim", "temperature", "aux_loss", "max_v_l", "set_cost_span",
                              "set_cost_giou", "set_cost_class", "span_loss_coef", "giou_loss_coef",
                              "label_loss_coef", "eos_coef", "saliency_margin", "lw_saliency", "lw_wattn",
                              "lw_ms_align", "lw_distill", "contrastive_align_loss_coef", "event_coef")
            if k in o and o[k] is not None}
    if o.get("span_loss_type", "l1") != "l1":
        raise ModelError("only span_loss_type 'l1' checkpoints are supported")
    shapes = dict(
        hidden_dim=d,
        txt_dim=state["input_txt_proj.0.LayerNorm.weight"].shape[0],
        vid_dim=state["input_vid_proj.0.LayerNorm.weight"].shape[0],
        n_input_proj=_count(state, "input_vid_proj."),
        max_q_l=state["txt_position_embed.position_embeddings.weight"].shape[0],
        enc_layers=_count(state, "transformer.encoder.layers."),
        dec_layers=_count(state, "transformer.decoder.layers."),
        t2v_layers=_count(state, "transformer.t2v_encoder.layers."),
        moment_layers=_count(state, "transformer.mcls_encoder.layers."),
        dummy_layers=_count(state, "txtproj_encoder.layers."),
        sent_layers=_count(state, "scls_encoder.layers."),
        num_queries=state["query_embed.weight"].shape[0],
        num_dummies=state["dummy_rep_token"].shape[0],
        total_prompts=state["global_rep_token"].shape[0],
        contrastive_align_loss="contrastive_align_projection_query.weight" in state,
        llm="", llm_layers=f"{first}:{first + n_llm}", **llm_shapes,
        llm_norm_eps=1e-6,  # hard-coded in their LLaMA config
        llm_head_dim=LLAMA_HEAD_DIM, llm_dtype="float32",  # their blocks run in fp32
        compat="authors",
        tef_dims=2 if "tef" in o.get("ctx_mode", "video_tef") else 0,
        vid_has_window_suffix=(dset == "hl"), saliency_loss_only=dset in ("youtube_uni", "tvsum"),
        extra={"converted_from": "fletcherjiang/LLMEPET", "dset_name": dset,
               "clip_length": float(o.get("clip_length", 2.0)), "v_feat_dirs": list(o.get("v_feat_dirs") or []),
               "ctx_mode": o.get("ctx_mode", "video_tef")},
    )
    return ModelConfig.from_dict({**defaults.to_dict(), **keep, **shapes})


def convert_state_dict(state: dict, opt) -> tuple[ModelConfig, dict]:
    """(our config, our state_dict) for an authors' state_dict and options."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    for required in ("query_embed.weight", "transformer.llama_dim_mapper1.weight", "dummy_rep_token"):
        if required not in state:
            raise ModelError(f"not an LLMEPET checkpoint: no {required!r} in its state_dict")
    cfg = config_from_authors(state, opt)
    ours = {}
    for key, value in state.items():
        new = authors_key_to_ours(key)
        if new is not None:
            ours[new] = value
    return cfg, ours


def load_authors_checkpoint(src: str) -> dict:
    ckpt = load_weights_only(src, expected="a checkpoint saved by the authors' LLMEPET train.py")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ModelError(f"{src} is not an authors' checkpoint (expected a dict with 'model' and 'opt')")
    return ckpt


LLM_BLOCKS_MODES = ("reference", "copy")
AUTHORS_BLOCK_PREFIX = "transformer.llama.layers."


def convert_authors_checkpoint(src: str, out: str, llm_blocks: str = "reference",
                               clip_model: str = PUBLIC_CLIP_MODEL) -> ModelConfig:
    """Read ``src`` (theirs), check that our model accepts every tensor, write ``out`` (ours).

    llm_blocks: "reference": ``out`` names ``src`` (absolute path) and the SHA-256 of its frozen LLM blocks, which
        are read from it at every load; "copy": the blocks are embedded (self-contained, about half of ``src``).
    clip_model: the CLIP (model id, "<model>:<weights>") whose features it was trained on; their options do not
        say. The public features' by default; another for a model trained on features `vmr features export` wrote
        from an index (its feature_spec.json names the index's CLIP), so that search and predict accept it there.
    """
    if llm_blocks not in LLM_BLOCKS_MODES:
        raise ModelError(f"llm_blocks must be one of {LLM_BLOCKS_MODES}, not {llm_blocks!r}")
    ckpt = load_authors_checkpoint(src)
    cfg, state = convert_state_dict(ckpt["model"], ckpt.get("opt"))
    with torch.device("meta"):  # no second copy of the (large) LLM blocks: take the tensors as they are
        model = LLMEPET(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelError(f"converted state_dict does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.llm.freeze()
    blocks = {k: v for k, v in state.items() if k.startswith(LLM_BLOCK_PREFIX)}
    llm_file = None
    if llm_blocks == "reference" and blocks:  # no blocks (the paper's ablation): nothing to reference
        llm_file = {"path": os.path.abspath(src), "prefix": AUTHORS_BLOCK_PREFIX, "sha256": tensors_sha256(blocks)}
    _save(model, cfg, ckpt.get("opt"), out, llm_file, clip_model)
    return cfg


KNOWN_FEATURE_DIMS = {"slowfast": 2304, "clip": 512}  # the public releases' per-clip feature widths
DATASET_NAMES = {"hl": "qvhighlights", "charadesSTA": "charades", "tacos": "tacos"}


def data_settings_from_authors(cfg: ModelConfig, opt, clip_model: str = PUBLIC_CLIP_MODEL) -> tuple[dict, dict, str]:
    """(DataConfig fields, feature spec, dataset) their options describe."""
    o = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt or {})
    use_tef = "tef" in o.get("ctx_mode", "video_tef")
    dirs = [os.path.basename(os.path.normpath(d)) for d in (o.get("v_feat_dirs") or [])] or ["clip_features"]
    kinds = [FEATURE_KINDS.get(d, d) for d in dirs]
    video_dim = cfg.vid_dim - (2 if use_tef else 0)
    dims = [KNOWN_FEATURE_DIMS.get(k) for k in kinds]
    if None in dims or sum(dims) != video_dim:
        dims = [video_dim] if len(kinds) == 1 else dims
    data = dict(max_q_l=int(o.get("max_q_l", cfg.max_q_l)), max_v_l=int(o.get("max_v_l", cfg.max_v_l)),
                clip_length=float(o.get("clip_length", 2.0)), max_windows=int(o.get("max_windows", 5)),
                normalize_v=not o.get("no_norm_vfeat", False), normalize_t=not o.get("no_norm_tfeat", False),
                use_tef=use_tef, v_feat_dirs=dirs,
                t_feat_dir=os.path.basename(os.path.normpath(o.get("t_feat_dir") or "clip_text_features")))
    spec = {"clip_model": clip_model, "video_kinds": kinds, "video_dims": dims, "text_dim": cfg.txt_dim,
            "clip_seconds": data["clip_length"]}
    return data, spec, DATASET_NAMES.get(o.get("dset_name", "hl"), "custom")


def _save(model, cfg: ModelConfig, opt, out: str, llm_file: dict | None, clip_model: str):
    """Write in the project's checkpoint format, the LLM blocks embedded unless ``llm_file`` references them."""
    data, spec, dataset = data_settings_from_authors(cfg, opt, clip_model)
    save_checkpoint(out, model, DataConfig.from_dict(data), spec, dataset, embed_llm=True, llm_file=llm_file)
