"""Settings of a training run, filled in this order: the dataclasses' defaults, the dataset's preset
(model/presets/<dataset>.json), a resumed checkpoint's saved settings, ``--config`` JSON, ``--set KEY=VALUE``.
A key may name a field of ModelConfig, DataConfig or TrainConfig (max_q_l / max_v_l belong to model and data).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from model.config import ModelConfig, load_preset, preset_names
from model.errors import ModelError
from model.data.sample import DataConfig


@dataclass
class TrainConfig:
    bsz: int = 32
    eval_bsz: int = 100
    lr: float = 1e-4
    lr_drop: int = 400
    wd: float = 1e-5
    n_epoch: int = 200
    grad_clip: float = 0.1
    eval_epoch: int = 5
    max_es_cnt: int = 200       # evaluations without improvement before stopping; -1: never
    seed: int = 2018
    amp: bool = True            # bf16 autocast on CUDA (ignored on CPU)
    num_workers: int = -1       # DataLoader workers; -1: 4 on CUDA with public feature files, else 0 (an index
                                # provider holds a database connection that must not be forked)
    embed_llm: bool = False     # store the frozen LLM blocks in the checkpoint instead of a hashed reference
    clip_model: str = ""        # CLIP id of public features (default: the public ViT-B-32:openai)
    # Negative windows (model.data.negatives) per annotated sample and epoch. -1: the default for the data: 1 when
    # training on an index or on the custom preset, 0 (the authors' recipe) for the public presets' feature files.
    neg_ratio: float = -1.0
    neg_sources: list = dataclasses.field(default_factory=lambda: ["other", "hard", "same", "labels"])
    progress: bool = True


def _coerce(value, current, key: str):
    """A --set string (or JSON value) converted to the field's type."""
    if not isinstance(value, str):
        return value
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ModelError(f"--set {key}: expected true/false, got {value!r}")
    if isinstance(current, int):
        try:
            return int(value)
        except ValueError:
            raise ModelError(f"--set {key}: expected an integer, got {value!r}") from None
    if isinstance(current, float):
        try:
            return float(value)
        except ValueError:
            raise ModelError(f"--set {key}: expected a number, got {value!r}") from None
    if isinstance(current, list):
        if value.startswith("["):
            return json.loads(value)
        return [v for v in value.split(",") if v]
    if isinstance(current, dict):
        return json.loads(value)
    return value


def sets_key(overrides, config_path, key: str) -> bool:
    """Whether --set KEY=... or the --config JSON (its top level or "model" part) sets ``key``."""
    if any(o.split("=", 1)[0].strip() == key for o in overrides):
        return True
    try:
        with open(config_path or "", encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (key in cfg or key in (cfg.get("model") or {}))


def build_settings(dataset: str, config_path: str | None = None, overrides: list[str] = (),
                   base: dict | None = None) -> tuple[dict, DataConfig, TrainConfig]:
    """(ModelConfig overrides dict, DataConfig, TrainConfig) after all layers of settings.

    ``base``: a resumed checkpoint's saved settings ({"model", "data", "train"}), applied before --config/--set.
    """
    if dataset not in preset_names():
        raise ModelError(f"unknown dataset {dataset!r}; choose one of {', '.join(preset_names())}")
    preset = load_preset(dataset)
    layered = {**preset["model"], **preset["train"]}
    if base:
        layered.update(base.get("model", {}))
        layered.update(base.get("data", {}))
        layered.update(base.get("train", {}))
    if config_path:
        try:
            with open(config_path, encoding="utf-8") as f:
                layered.update(json.load(f))
        except OSError as err:
            raise ModelError(f"cannot read --config {config_path}: {err.strerror or err}") from None
        except (ValueError, TypeError):  # not UTF-8, not JSON, or not one JSON object
            raise ModelError(f"--config {config_path} is not a JSON object of config fields") from None
    for item in overrides:
        if "=" not in item:
            raise ModelError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        layered[k.strip()] = v.strip()

    model_fields = ModelConfig().to_dict()
    data_fields = {f.name: getattr(DataConfig(), f.name) for f in dataclasses.fields(DataConfig)}
    train_fields = dataclasses.asdict(TrainConfig())
    model_over, data_kw, train_kw = {}, {}, {}
    for k, v in layered.items():
        hit = False
        if k in model_fields:
            model_over[k] = _coerce(v, model_fields[k], k)
            hit = True
        if k in data_fields:
            data_kw[k] = _coerce(v, data_fields[k], k)
            hit = True
        if k in train_fields:
            train_kw[k] = _coerce(v, train_fields[k], k)
            hit = True
        if not hit:
            raise ModelError(f"unknown setting {k!r} (not a model, data or training field)")
    return model_over, DataConfig(**data_kw), TrainConfig(**train_kw)


def negative_ratio(train_cfg: TrainConfig, dataset: str, public_features: bool) -> tuple[float, str]:
    """(negative windows per sample, why): ``neg_ratio`` when set (>= 0); else 1 for training on an index or on
    the custom preset (a search engine's reranker must tell a window without the moment), 0 for the public
    presets on their feature files (the authors' recipe, so paper-style runs stay comparable)."""
    if train_cfg.neg_ratio >= 0:
        return float(train_cfg.neg_ratio), "set by neg_ratio"
    if dataset == "custom" or not public_features:
        return 1.0, "the default for index and custom training; --set neg_ratio=0 for none"
    return 0.0, f"the authors' recipe for {dataset}; --set neg_ratio=1 to add negative windows"


RELEVANCE_COEF = 1.0  # the relevance head's loss weight when negatives switch it on


def relevance_weight(model_over: dict, neg_ratio: float) -> tuple[float, str]:
    """(relevance head loss weight, why): ``relevance_coef`` when set; else on exactly when the run trains with
    negative windows (the head learns "this clip matches the sentence" from the moments against them; without
    negatives it would see no window lacking the moment). A resumed run keeps its checkpoint's value."""
    if "relevance_coef" in model_over:
        return float(model_over["relevance_coef"]), "set by relevance_coef"
    if neg_ratio > 0:
        return RELEVANCE_COEF, "on with negative windows; --set relevance_coef=0 for none"
    return 0.0, "off without negative windows"
