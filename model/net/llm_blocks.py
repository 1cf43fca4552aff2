"""Frozen LLaMA decoder layers inside the fusion path: Linear(hidden -> llm_dim), layers [first, end) of a
LLaMA-architecture LLM, RMSNorm, Linear(llm_dim -> hidden).

As the authors use them, the blocks have no rotary position embedding and no causal mask: every token attends
to every other token (positions were already mixed in by the CG-DETR encoder). Parameter names follow Meta's
consolidated format (``attention.wq``, ``feed_forward.w1``, ...). Weights come from

* a transformers checkpoint (HF hub id or local dir, safetensors): only the chosen layers' tensors are read;
* a Meta ``consolidated.00.pth`` (memory-mapped; only the chosen layers' tensors are copied).

Transformers' conversion permutes the rows of q/k within each head (for its rotary layout); the same permutation
on q and k leaves every q.k dot product unchanged, so without rotary both formats compute the same thing.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ModelError
from model.hub import hub_offline

LLAMA_HEAD_DIM = 128  # every LLaMA release uses 128-d heads; used when only weight shapes are known

# transformers LlamaDecoderLayer parameter names -> Meta consolidated names
HF_TO_META = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x, attend=None):
        """x [N, T, dim]; attend [N, 1, 1, T] bool (True = may attend) or None -> [N, T, dim]."""
        n, t, _ = x.shape
        q = self.wq(x).view(n, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(n, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(n, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / self.head_dim ** 0.5
        if attend is not None:
            scores = scores.masked_fill(~attend, float("-inf"))
        out = scores.float().softmax(-1).type_as(q) @ v
        return self.wo(out.transpose(1, 2).reshape(n, t, -1))


class LlamaFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    """One LLaMA decoder layer (pre-RMSNorm attention + SwiGLU), without rotary embedding or causal mask."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, ffn_dim: int, norm_eps: float,
                 head_dim: int | None = None):
        super().__init__()
        self.attention = LlamaAttention(dim, n_heads, n_kv_heads, head_dim or dim // n_heads)
        self.feed_forward = LlamaFeedForward(dim, ffn_dim)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x, attend=None):
        h = x + self.attention(self.attention_norm(x), attend)
        return h + self.feed_forward(self.ffn_norm(h))


class LLMBlocks(nn.Module):
    """Linear -> frozen LLaMA layers -> RMSNorm -> Linear on the encoder memory.

    ``attention`` "time": each video's tokens attend to each other (padding masked). "batch": the authors'
    behaviour: their [L, B, D] memory reaches a batch-first module, so the tokens at one time index attend
    across the samples of the batch (at batch size 1 the attention is a fixed map of each token alone).
    """

    def __init__(self, hidden_dim: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim: int,
                 norm_eps: float, attention: str = "time", head_dim: int | None = None, blocks_on_meta: bool = False):
        super().__init__()
        self.attention = attention
        self.to_llm = nn.Linear(hidden_dim, dim, bias=False)
        with torch.device("meta" if blocks_on_meta else torch.get_default_device()):
            self.blocks = nn.ModuleList(LlamaBlock(dim, n_heads, n_kv_heads, ffn_dim, norm_eps, head_dim)
                                        for _ in range(n_layers))
        # The authors' final norm is never loaded from the LLM (it stays at ones) and is frozen with the blocks.
        self.norm = RMSNorm(dim, norm_eps)
        self.from_llm = nn.Linear(dim, hidden_dim, bias=False)
        if not blocks_on_meta:
            self._round_random_blocks()
        self.freeze()

    @torch.no_grad()
    def _round_random_blocks(self):
        """Random blocks (tests, the synthetic world; loaded LLMs replace them) hold bf16-representable values, as
        released LLM weights do (fp16/bf16), so checkpoints store them in 2 bytes a value without loss."""
        for p in self.blocks.parameters():
            p.copy_(p.to(torch.bfloat16))

    def freeze(self):
        for p in list(self.blocks.parameters()) + list(self.norm.parameters()):
            p.requires_grad_(False)

    @property
    def dtype(self):
        return self.norm.weight.dtype

    def forward(self, x, padding=None):
        """x [L, B, hidden] (sequence-first), padding [B, L] (True = padding) -> [L, B, hidden]."""
        h = self.to_llm(x)
        if self.attention == "batch":
            tokens, attend = h, None  # [L, B, dim] read as L sequences of B tokens
        else:
            # contiguous: a transposed (strided) bf16 input sends every linear layer down a slow CPU path (10x at
            # 2048-d, bench/results/rerank.md); fp32 is indifferent
            tokens = h.transpose(0, 1).contiguous()  # [B, L, dim]
            attend = None if padding is None else ~padding[:, None, None, :]
        tokens = tokens.to(self.dtype)
        for block in self.blocks:
            tokens = block(tokens, attend)
        tokens = self.norm(tokens).float()
        if self.attention != "batch":
            tokens = tokens.transpose(0, 1)
        return self.from_llm(tokens)


# ----------------------------------------------------------------------------------------------------------
# Loading the chosen layers


def _offline_error(source: str, why: str) -> ModelError:
    return ModelError(f"LLM weights {source!r} not available ({why}); download them first "
                      f"(`huggingface-cli download {source}`) or pass --llm a local transformers directory or "
                      f"a Meta consolidated.00.pth")


def _spec(dim, n_heads, n_kv_heads, ffn_dim, norm_eps, n_total, head_dim):
    return dict(llm_dim=int(dim), llm_heads=int(n_heads), llm_kv_heads=int(n_kv_heads), llm_ffn_dim=int(ffn_dim),
                llm_norm_eps=float(norm_eps), n_total_layers=int(n_total), head_dim=int(head_dim))


def _check_range(source, first, end, n_total):
    if end > n_total:
        raise ModelError(f"--llm-layers {first}:{end} asks for layers beyond the {n_total} of {source}")


def _load_meta(path: Path, first: int, end: int):
    shards = sorted(path.parent.glob("consolidated.*.pth"))
    if len(shards) > 1:
        raise ModelError(f"{path.parent} holds {len(shards)} model-parallel shards; only single-file "
                         f"consolidated.00.pth checkpoints are supported (or use a transformers copy)")
    try:
        full = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ModelError(f"cannot read Meta checkpoint {path}: {exc}".splitlines()[0]) from None
    layer_ids = {int(m.group(1)) for k in full if (m := re.match(r"layers\.(\d+)\.", k))}
    if not layer_ids:
        raise ModelError(f"{path} has no 'layers.N.' tensors; not a Meta LLaMA checkpoint")
    _check_range(path, first, end, max(layer_ids) + 1)
    weights = {}
    for i in range(first, end):
        prefix = f"layers.{i}."
        for key in full:
            if key.startswith(prefix):
                weights[f"{i - first}.{key[len(prefix):]}"] = full[key].clone()
    params = {}
    if (path.parent / "params.json").exists():
        params = json.loads((path.parent / "params.json").read_text())
    wq = weights["0.attention.wq.weight"]
    dim = wq.shape[1]
    n_heads = params.get("n_heads", wq.shape[0] // LLAMA_HEAD_DIM)
    head_dim = wq.shape[0] // n_heads
    n_kv = params.get("n_kv_heads") or weights["0.attention.wk.weight"].shape[0] // head_dim
    spec = _spec(dim, n_heads, n_kv, weights["0.feed_forward.w1.weight"].shape[0], params.get("norm_eps", 1e-6),
                 max(layer_ids) + 1, head_dim)
    return spec, weights


def _hf_files(source: str) -> tuple[dict, callable]:
    """(config dict, fetch(filename) -> local path) for a local dir or a hub id (hub: files fetched lazily)."""
    local = Path(source)
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ModelError(f"{local} has no config.json; not a transformers checkpoint")
        return json.loads((local / "config.json").read_text()), lambda name: local / name
    if os.path.sep in source and not local.exists() and source.startswith((".", "/", "~")):
        raise ModelError(f"LLM path {source} does not exist")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover
        raise _offline_error(source, "huggingface_hub is not installed") from None

    def fetch(name):
        try:  # the HF cache first: no network round trip when the files are already here
            return Path(hf_hub_download(source, name, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached; try the hub below
            pass
        if hub_offline():  # fail at once instead of spending ~20 s in the hub client's retries
            raise _offline_error(source, "offline and not in the Hugging Face cache")
        try:
            return Path(hf_hub_download(source, name))
        except Exception as exc:  # noqa: BLE001 - offline, gated, missing: one line for the user
            raise _offline_error(source, type(exc).__name__) from None

    return json.loads(fetch("config.json").read_text()), fetch


def _load_hf(source: str, first: int, end: int):
    config, fetch = _hf_files(source)
    if "num_hidden_layers" not in config or "hidden_size" not in config:
        raise ModelError(f"{source} config.json is not a LLaMA-architecture config")
    _check_range(source, first, end, config["num_hidden_layers"])
    try:
        index_path = fetch("model.safetensors.index.json")
    except ModelError:  # a single-file checkpoint has no index
        index_path = None
    index = json.loads(index_path.read_text())["weight_map"] if index_path and index_path.exists() else None
    wanted = {f"model.layers.{i}.{hf}": f"{i - first}.{meta}"
              for i in range(first, end) for hf, meta in HF_TO_META.items()}
    by_file: dict[str, list[str]] = {}
    for key in wanted:
        by_file.setdefault(index.get(key, "?") if index else "model.safetensors", []).append(key)
    if "?" in by_file:
        raise ModelError(f"{source} lacks tensors {by_file['?'][0]} ...; not a LLaMA-architecture checkpoint")
    from safetensors import safe_open

    weights = {}
    for fname, keys in by_file.items():
        path = fetch(fname)
        if not Path(path).exists():
            raise ModelError(f"{source} has no {fname} (only safetensors checkpoints are supported)")
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            if any(k.replace(".weight", ".bias") in present for k in keys if "_proj" in k):
                raise ModelError(f"{source} has attention/MLP biases; not a LLaMA-architecture checkpoint")
            for k in keys:
                if k not in present:
                    raise ModelError(f"{source}: tensor {k} missing from {fname}")
                weights[wanted[k]] = f.get_tensor(k)
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    spec = _spec(config["hidden_size"], n_heads, config.get("num_key_value_heads") or n_heads,
                 config["intermediate_size"], config.get("rms_norm_eps", 1e-6), config["num_hidden_layers"], head_dim)
    return spec, weights


def load_llm_layers(source: str, first: int, end: int) -> tuple[dict, dict]:
    """Read layers [first, end) of an LLM.

    Returns: (spec: llm_dim, llm_heads, llm_kv_heads, llm_ffn_dim, llm_norm_eps, n_total_layers, head_dim;
    weights: {"<j>.attention.wq.weight": tensor, ...} for j = 0 .. end-first-1, Meta names).
    """
    path = Path(os.path.expanduser(source))
    if path.is_file() and path.suffix == ".pth":
        return _load_meta(path, first, end)
    if path.is_dir() and not (path / "config.json").exists() and list(path.glob("consolidated.*.pth")):
        return _load_meta(sorted(path.glob("consolidated.*.pth"))[0], first, end)
    if path.suffix == ".pth" and not path.exists():
        raise ModelError(f"LLM checkpoint {path} does not exist")
    return _load_hf(str(path) if path.is_dir() else source, first, end)
