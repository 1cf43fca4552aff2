"""CLIP features with open_clip: the image embedding of a frame and the per-token / pooled text features.

What the public moment-retrieval features hold, and what this class computes:
  video  one L2-normalised pooled image embedding per 2-s clip                     [T, embed_dim]
  text   the text transformer's output after ``ln_final`` and BEFORE ``text_projection``, for the tokens
         SOT..EOT inclusive (the public ``last_hidden_state``)                       [L, text_width]
  query  the pooled projected text embedding, L2-normalised (coarse index search)  [embed_dim]

Weights come from open_clip's registry (a tag such as ``openai``, downloaded once into the HF cache) or a local
checkpoint file. With no network a missing tag fails at once with a one-line ModelError; random weights exist only
when a caller passes ``allow_random=True`` (tests, the synthetic world).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from model.errors import ModelError, weights_file_problem
from model.hub import hub_offline
from model.inference.precision import autocast_for, clip_precision, detect_hardware

RANDOM_SEED = 0  # random-weight models are seeded so every process (driver, Ray actors) builds the same one


class ClipEncoder:
    """An open_clip model, its own image preprocessing and tokenizer.

    Attributes:
        model_id: "<model>:<weights>" e.g. "ViT-B-32:openai" (stored in the index meta and checkpoint specs).
        embed_dim: pooled/projected dim (512 for ViT-B-32). text_width: per-token dim (512 for ViT-B-32).
        image_size: side S of the preprocessed square frame.
        precision: "fp32" | "bf16" (bf16 autocast: on a device with native bf16 ~2.4x faster, embeddings within
            cosine 0.999 of fp32; model.inference.precision.clip_precision). Indexes record it; queries use the index's.
    """

    def __init__(self, model, preprocess, tokenizer, model_id: str, device: torch.device, precision: str = "fp32"):
        self.model = model.eval()
        self.precision = precision
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        self._text = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower in .text
        for name in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(self._text, name):
                raise ModelError(f"{model_id}: per-token text features need an open_clip text transformer "
                                 f"(this model's text tower has no {name})")
        self.text_width = int(self._text.ln_final.normalized_shape[0])
        self.embed_dim = int(model.visual.output_dim)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.context_length = int(self._text.positional_embedding.shape[0])
        self.eot_token_id = getattr(tokenizer, "eot_token_id", None)

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_name_or_config_json: str, pretrained: str | None, device: str = "auto",
             allow_random: bool = False, precision: str = "fp32") -> "ClipEncoder":
        """Build the model. ``pretrained``: an open_clip tag ("openai") or a checkpoint file path.

        ``pretrained`` empty/None gives random weights, allowed only with ``allow_random=True``.
        ``precision``: "fp32" | "bf16" | "auto" (bf16 where the device runs it natively).
        """
        import open_clip

        torch_device = resolve_device(device)
        precision = clip_precision(precision, detect_hardware(torch_device))
        name, model_id, weights, kwargs = resolve_weights(model_name_or_config_json, pretrained, allow_random)
        if weights is None:
            torch.manual_seed(RANDOM_SEED)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=weights, device=torch_device, **kwargs)
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as err:  # noqa: BLE001 - a broken weights file or config: one line naming the file
            what = weights if weights and os.path.isfile(str(weights)) else model_id
            raise ModelError(f"cannot load CLIP {what}: {weights_file_problem(str(weights or model_id), err)}; "
                             "give working weights with --clip-pretrained") from None
        return cls(model, preprocess, tokenizer, model_id, torch_device, precision)

    # ---- images ------------------------------------------------------------------------------------------------
    def preprocess_frame(self, rgb: np.ndarray) -> torch.Tensor:
        """The model's own preprocessing of one frame: uint8 [H, W, 3] -> float [3, S, S]."""
        from PIL import Image

        return self.preprocess(Image.fromarray(np.ascontiguousarray(rgb)))

    @property
    def preprocess_cfg(self) -> dict:
        """The model's image preprocessing as data (size, mean, std, interpolation, resize_mode, ...)."""
        return dict(self.model.visual.preprocess_cfg)

    @torch.inference_mode()
    def encode_frames_uint8(self, frames: np.ndarray) -> np.ndarray:
        """Frames already resized/cropped by ``frame_resizer`` (uint8 [N, S, S, 3]) -> np.float32 [N, embed_dim].

        Equals encode_images(stack(preprocess_frame(f))): the same x/255 then (x - mean) / std as the model's own
        ToTensor + Normalize, done here so that decode workers ship 4x smaller uint8 frames.
        """
        cfg = self.preprocess_cfg
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div(255.0)
        mean = torch.tensor(cfg["mean"], dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(cfg["std"], dtype=torch.float32)[None, :, None, None]
        return self.encode_images((x - mean) / std)

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor | np.ndarray, chunk: int = 256) -> np.ndarray:
        """float [N, 3, S, S] (preprocessed) -> np.float32 [N, embed_dim], L2-normalised."""
        batch = torch.as_tensor(batch)
        out = []
        for start in range(0, len(batch), chunk):
            with self._autocast():
                feats = self.model.encode_image(batch[start: start + chunk].to(self.device, torch.float32))
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    # ---- text --------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text_tokens(self, texts: list[str]) -> list[np.ndarray]:
        """Per-token features after ln_final, before text_projection, SOT..EOT inclusive.

        Returns: one np.float32 [L_i, text_width] per text (over-long texts are truncated to the context length,
        the tokenizer then ends them with EOT).
        """
        tokens = self.tokenizer(list(texts)).to(self.device)  # [N, context_length]
        with self._autocast():
            hidden = self._token_states(tokens).float().cpu().numpy()  # [N, ctx, width]
        lengths = self._token_lengths(tokens.cpu())
        return [hidden[i, :n].astype(np.float32) for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Pooled projected text embeddings, L2-normalised: np.float32 [N, embed_dim]."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            feats = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy().astype(np.float32)

    def _autocast(self):
        return autocast_for(self.precision, self.device)

    def _token_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The text tower up to ln_final, as open_clip's encode_text computes it: [N, ctx, text_width]."""
        tower = self._text
        cast_dtype = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(tokens).to(cast_dtype)
        x = x + tower.positional_embedding.to(cast_dtype)
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        return tower.ln_final(x)

    def _token_lengths(self, tokens: torch.Tensor) -> list[int]:
        """Index of EOT + 1 per row (the CLIP tokenizer's EOT has the largest id, which CLIP pools on)."""
        if self.eot_token_id is not None:
            is_eot = tokens == self.eot_token_id
            has = is_eot.any(dim=1)
            first = is_eot.int().argmax(dim=1)
            fallback = tokens.argmax(dim=1)
            ends = torch.where(has, first, fallback)
        else:
            ends = tokens.argmax(dim=1)
        return [int(e) + 1 for e in ends]


def resolve_weights(model_name_or_config_json: str, pretrained: str | None, allow_random: bool = False):
    """Check a model + weights choice without loading anything heavy (ModelError at once if unusable).

    Returns (open_clip model name, model_id, weights for create_model (tag, file or None), extra kwargs).
    """
    import open_clip

    name = _register_model(model_name_or_config_json)
    kwargs = {}
    if not pretrained:
        if not allow_random:
            raise ModelError(f"no CLIP weights given for {name}: pass a pretrained tag (e.g. openai) or a "
                             "local checkpoint file (--clip-pretrained PATH)")
        return name, f"{name}:random", None, kwargs
    if os.path.isfile(pretrained):
        check_weights_file(pretrained)
        return name, f"{name}:{Path(pretrained).name}", pretrained, kwargs
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelError(f"{pretrained!r} is neither a checkpoint file nor a pretrained tag of {name} "
                         f"(tags: {', '.join(tags) or 'none'})")
    model_id = f"{name}:{pretrained}"
    weights = _cached_weights(tag_cfg)
    if weights is None:
        if hub_offline():
            raise ModelError(f"CLIP weights {model_id} are not in the local cache and there is no network: "
                             "download them once online, or pass a local checkpoint with "
                             "--clip-pretrained /path/to/open_clip_model.safetensors")
        return name, model_id, pretrained, kwargs  # open_clip downloads it into the HF cache
    # A cached file loses the tag's own settings unless they are passed along (openai needs QuickGELU).
    kwargs = {"force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))}
    for key, arg in (("mean", "image_mean"), ("std", "image_std"),
                     ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
        if tag_cfg.get(key) is not None:
            kwargs[arg] = tag_cfg[key]
    return name, model_id, weights, kwargs


def check_weights_file(path: str) -> None:
    """Read a local weights file's structure without its tensors (ms, even for large files): a truncated, corrupt
    or unsafe file fails here, before any worker starts. ModelError naming the file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                f.keys()
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file: read it all
    except Exception as err:  # noqa: BLE001 - the file is the user's to fix
        raise ModelError(f"cannot load CLIP weights {path}: {weights_file_problem(path, err)}; give working weights "
                         "with --clip-pretrained") from None


def model_embed_dim(model_name_or_config_json: str) -> int:
    """The pooled embedding size of a model (from its config; no weights loaded)."""
    import open_clip

    cfg = open_clip.get_model_config(_register_model(model_name_or_config_json))
    return int(cfg["embed_dim"])


def frame_resizer(preprocess_cfg: dict):
    """The model's resize + crop as a function rgb uint8 [H, W, 3] -> uint8 [S, S, 3] (no normalisation).

    Built from the preprocessing config alone (no model), so decode workers can run it.
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    fields = {k: v for k, v in preprocess_cfg.items() if k in PreprocessCfg.__dataclass_fields__}
    fields.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # ToTensor's x/255 only: exactly invertible
    transform = image_transform_v2(PreprocessCfg(**fields), is_train=False)

    def resize(rgb: np.ndarray) -> np.ndarray:
        x = transform(Image.fromarray(np.ascontiguousarray(rgb)))  # float [3, S, S] = uint8 / 255
        return x.mul(255.0).round_().to(torch.uint8).permute(1, 2, 0).numpy()

    return resize


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU -> ModelError."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but torch sees no GPU")
    return torch.device(device)


def _register_model(model_name_or_config_json: str) -> str:
    """A built-in open_clip name as is; a config JSON (open_clip's format) is registered under its file stem."""
    import open_clip

    value = str(model_name_or_config_json)
    if value.endswith(".json") or os.path.isfile(value):
        path = Path(value)
        if not path.is_file():
            raise ModelError(f"CLIP model config not found: {value}")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot read CLIP model config {value}: {err}") from None
        if not isinstance(cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg.get("model_cfg", cfg)):
            raise ModelError(f"{value} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        if "model_cfg" in cfg:  # an open_clip_config.json of a hub repo wraps the model config
            raise ModelError(f"{value}: pass the model_cfg part (embed_dim, vision_cfg, text_cfg) as its own JSON")
        open_clip.add_model_config(path)
        return path.stem
    if value not in open_clip.list_models():
        raise ModelError(f"unknown CLIP model {value!r}: give an open_clip model name (e.g. ViT-B-32) or the path "
                         "of a model-config JSON")
    return value


def _cached_weights(tag_cfg: dict) -> str | None:
    """The local path of a tag's weights if they are already cached (HF hub cache or open_clip's url cache)."""
    if tag_cfg.get("file") and os.path.isfile(tag_cfg["file"]):
        return tag_cfg["file"]
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)  # "org/repo/" -> ("org/repo", ""): the default file name
        candidates = [filename] if filename else []
        candidates += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            candidates.insert(0, filename[: -len(".bin")] + ".safetensors")
        for name in candidates:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = tag_cfg.get("url", "")
    if url:
        local = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(local):
            return local
    return None
