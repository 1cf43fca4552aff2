"""LLMEPET configuration: one dataclass for the architecture, the LLM blocks and the loss weights.

Defaults are the authors' argparse defaults (llm_epet/config.py); a preset (``load_preset(name)``, the JSON files
in presets/) holds the overrides their per-dataset training scripts pass (scripts/train.sh,
scripts/charades_sta/train.sh, scripts/tacos/train.sh).
Feature dimensions are not dataset defaults: they follow the features the user trains on.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import ModelError


@dataclass
class ModelConfig:
    # --- inputs -------------------------------------------------------------------------------------------
    txt_dim: int = 512            # per-token text feature width (CLIP ViT-B/32 text transformer)
    vid_dim: int = 514            # per-clip video feature width INCLUDING the 2 TEF columns (CLIP 512 + 2)
    max_q_l: int = 32             # rows of the (trainable, by default unused) text position table; -1 -> 100
    max_v_l: int = 75             # clips per window the data code keeps; -1 = no limit (model does not need it)
    n_input_proj: int = 2         # LayerNorm-Dropout-Linear(-ReLU) layers projecting each input
    input_dropout: float = 0.5
    use_txt_pos: bool = False     # add the trainable text position embedding (authors: off)

    # --- CG-DETR backbone ---------------------------------------------------------------------------------
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.1
    enc_layers: int = 3
    dec_layers: int = 3
    t2v_layers: int = 2
    moment_layers: int = 1
    dummy_layers: int = 2
    sent_layers: int = 1
    num_queries: int = 10
    num_dummies: int = 45
    total_prompts: int = 10       # learnable saliency prompt tokens ("global_rep_token")
    num_prompts: int = 1          # prompts mixed into the saliency token (top-k)
    aux_loss: bool = True
    contrastive_align_loss: bool = False
    contrastive_hdim: int = 64
    temperature: float = 0.07
    # "vmr": the paper's design. "authors": reproduce the authors' released code (converted checkpoints, parity);
    # the behaviours that differ derive from it (COMPAT_BEHAVIOURS, the properties below the fields).
    compat: str = "vmr"
    # QVHighlights vids are "<youtube id>_<start>_<end>": the negative pass treats windows of one video as the
    # same video (their dset_name == "hl" rule).
    vid_has_window_suffix: bool = True

    # --- LLM blocks ---------------------------------------------------------------------------------------
    llm: str = ""                 # HF id/dir (safetensors), a Meta consolidated.*.pth, or "random" (tests)
    llm_layers: str = "14:17"     # python slice of decoder layers to take (the paper: LLaMA-7B 14..16)
    llm_dim: int = 4096
    llm_heads: int = 32
    llm_kv_heads: int = 32
    llm_ffn_dim: int = 11008
    llm_head_dim: int = 0         # 0 = llm_dim // llm_heads (every LLaMA release)
    llm_norm_eps: float = 1e-6
    llm_dtype: str = "auto"       # "auto" (bf16 on CUDA, fp32 elsewhere) | "float32" | "bfloat16"

    # --- matcher and losses (weights as the authors' build_model) ----------------------------------------
    set_cost_span: float = 10.0
    set_cost_giou: float = 1.0
    set_cost_class: float = 4.0
    span_loss_coef: float = 10.0
    giou_loss_coef: float = 1.0
    label_loss_coef: float = 4.0
    eos_coef: float = 0.1
    saliency_margin: float = 0.2
    lw_saliency: float = 1.0
    lw_wattn: float = 1.0
    lw_ms_align: float = 1.0
    lw_distill: float = 1.0
    contrastive_align_loss_coef: float = 0.0
    # Pseudo-event regulation: event-head L1 + GIoU against pseudo-events, weighted event_coef * span/giou coef
    # (the paper's method; off under compat "authors" and when event_coef is 0: the ablation).
    event_coef: float = 0.1
    # Relevance head (model.net.llmepet.RelevanceHead): > 0 builds it and weights its loss; 0 = none (the paper's model,
    # the public presets, converted checkpoints). A ranking score across windows and videos (docs/guide.md, Ranking).
    relevance_coef: float = 0.0
    relevance_dim: int = 128
    tef_dims: int = 2             # trailing TEF columns of src_vid (0 when the data adds no TEF)
    saliency_loss_only: bool = False  # highlight-only datasets (their youtube_uni / tvsum): no matcher

    extra: dict = field(default_factory=dict)  # free-form provenance (e.g. "converted_from")

    # ------------------------------------------------------------------------------------------------------
    def __post_init__(self):
        if self.compat not in COMPAT_BEHAVIOURS:
            raise ModelError(f"compat must be 'vmr' or 'authors', not {self.compat!r}")
        if self.llm_dtype not in ("auto", "float32", "bfloat16"):
            raise ModelError(f"llm_dtype must be auto, float32 or bfloat16, not {self.llm_dtype!r}")
        self.llm_layer_range()  # validates the slice

    # --- the behaviours ``compat`` selects ------------------------------------------------------------------
    @property
    def llm_attention(self) -> str:
        """"time": the clips of one video attend to each other (the paper's design; padded clips masked).
        "batch": the authors' code feeds (time, batch, dim) to a batch-first block, so each clip attends to the
        clips at the same time index of the OTHER samples in the batch."""
        return COMPAT_BEHAVIOURS[self.compat]["llm_attention"]

    @property
    def t2v_cross_sample_mask(self) -> bool:
        """Their T2V attention mask is laid out (batch-major vs head-major) inconsistently with the attention
        scores, so in a padded batch a clip may lose text tokens that are padding in ANOTHER sample. True
        reproduces that; False masks each sample by its own padding only."""
        return COMPAT_BEHAVIOURS[self.compat]["t2v_cross_sample_mask"]

    @property
    def event_loss(self) -> bool:
        """Pseudo-event regulation in the loss (their released code never adds it to the loss list)."""
        return COMPAT_BEHAVIOURS[self.compat]["event_loss"] and self.event_coef > 0

    @property
    def pseudo_events_from(self) -> str:
        """"input": pseudo-events of the clip features as given, without the TEF columns (what the index
        stores; stable targets); "projected": of the projected clip tokens, after input dropout in training (the
        authors' choice; their event loss is never active, so nothing depends on it)."""
        return COMPAT_BEHAVIOURS[self.compat]["pseudo_events_from"]

    @property
    def text_encoder_heads(self) -> int:
        """Heads of the dummy and sentence encoders: the authors' code builds both with 8 heads whatever
        ``nheads`` is (the same at the paper's nheads 8); vmr uses ``nheads``."""
        return AUTHORS_TEXT_ENCODER_HEADS if self.compat == "authors" else self.nheads

    def llm_layer_range(self) -> tuple[int, int]:
        """(first, end) of ``llm_layers`` "a:b" (end exclusive; "0:0" = no LLM blocks, the paper's ablation)."""
        try:
            first, end = (int(p) for p in str(self.llm_layers).split(":"))
        except ValueError:
            raise ModelError(f"llm_layers must look like '14:17', not {self.llm_layers!r}") from None
        if not 0 <= first <= end or (first == end and first != 0):
            raise ModelError(f"llm_layers {self.llm_layers!r} is not a range of layers ('0:0' for none)")
        return first, end

    @property
    def n_llm_layers(self) -> int:
        first, end = self.llm_layer_range()
        return end - first

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = _compat_from_legacy_fields(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **overrides) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **overrides})


# What each ``compat`` value selects (the four switches checkpoints before ``compat`` stored one by one).
COMPAT_BEHAVIOURS: dict[str, dict] = {
    "vmr": dict(llm_attention="time", t2v_cross_sample_mask=False, event_loss=True, pseudo_events_from="input"),
    "authors": dict(llm_attention="batch", t2v_cross_sample_mask=True, event_loss=False,
                    pseudo_events_from="projected"),
}


AUTHORS_TEXT_ENCODER_HEADS = 8  # hard-coded in their model for the dummy and sentence encoders


def _compat_from_legacy_fields(d: dict) -> dict:
    """A config dict that still holds the four switches (checkpoints written before ``compat``) -> ``compat``.

    All four as one ``compat`` value selects it; the event-loss ablation of a "vmr" config (event_loss False)
    becomes event_coef 0; any other mix cannot be expressed and is refused.
    """
    legacy = {k: d[k] for k in COMPAT_BEHAVIOURS["vmr"] if k in d}
    if not legacy:
        return d
    d = {k: v for k, v in d.items() if k not in legacy}
    if all(COMPAT_BEHAVIOURS["vmr"][k] == v for k, v in legacy.items() if k != "event_loss"):
        return {**d, "compat": "vmr", **({} if legacy.get("event_loss", True) else {"event_coef": 0.0})}
    if all(COMPAT_BEHAVIOURS["authors"][k] == v for k, v in legacy.items()):
        return {**d, "compat": "authors"}
    raise ModelError(f"model config mixes the paper's and the authors' behaviours ({legacy}); "
                     f"set compat to 'vmr' or 'authors' instead")


# Presets: one JSON file per dataset beside this module (presets/<name>.json), as open_clip's model configs; a new
# preset is a new file. Keys: name, aliases, about, model (ModelConfig overrides), train (TrainConfig / DataConfig
# fields), max_timestamp (the clamp of the authors' post-processor, seconds; null = none).
PRESETS_DIR = Path(__file__).with_name("presets")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


@functools.lru_cache(maxsize=None)
def _read_preset(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_preset(name: str) -> dict:
    """The preset ``name`` (a file stem or one of its aliases, any case). ModelError naming the known ones."""
    wanted = name.lower()
    for stem in preset_names():
        preset = _read_preset(PRESETS_DIR / f"{stem}.json")
        if wanted == stem or wanted in preset.get("aliases", []):
            return copy.deepcopy(preset)
    raise ModelError(f"unknown dataset {name!r}; known: {', '.join(preset_names())} "
                     f"(a new one is a JSON file in {PRESETS_DIR})")


def dataset_defaults(name: str) -> dict:
    """ModelConfig overrides of the preset ``name`` (the authors' training script for their datasets)."""
    return load_preset(name)["model"]


def train_defaults(name: str) -> dict:
    """Optimisation (and data) settings of the preset ``name``."""
    return load_preset(name)["train"]
