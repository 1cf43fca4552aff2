"""Numeric precision of the frozen LLM blocks (and of CLIP): chosen once at load from what the hardware runs natively.

Precisions:
    fp32  everything float32: the parity mode (the authors' code runs fp32; tests/test_golden.py uses it).
    bf16  the frozen LLM blocks (weights and activations) in bfloat16; the rest of the model stays float32.
    int8  the blocks' linear layers dynamically quantized (int8 weights per output channel, int8 activations
          per tensor, torch's maintained ``quantize_dynamic`` / fbgemm); attention products and norms in float32.
    auto  the fastest of these the device runs natively (``choose_precision``).

The blocks are ~97% of a paper-size forward (3 x 4096-d LLaMA layers, ~0.6 B parameters), so only they change;
bench/rerank.py measures speed and accuracy against fp32 at that shape (bench/results/rerank.md).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from model.errors import ModelError
from model.inference.file_pages import release_file_pages

PRECISIONS = ("auto", "fp32", "bf16", "int8")
# Below this many LLM-block parameters reduced precision buys nothing measurable (casts and quantization overhead
# dominate; the test-size models have ~0.1 M): auto keeps fp32 there.
SMALL_LLM_PARAMS = 20_000_000
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 dot products in hardware
CPU_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512bw", "avx2")  # fbgemm's int8 kernels use these


@dataclass(frozen=True)
class Hardware:
    """What a device runs natively. device: "cpu" | "cuda"; cpu_flags: /proc/cpuinfo flags; cpu_capability:
    torch.backends.cpu.get_cpu_capability() ("AVX512", "AVX2", ...); cuda_bf16: the GPU has bf16 units;
    int8_engine: torch's dynamic quantization engine is available (fbgemm/x86)."""
    device: str
    cpu_flags: frozenset = frozenset()
    cpu_capability: str = ""
    cuda_bf16: bool = False
    int8_engine: bool = False
    name: str = ""

    @property
    def native_bf16(self) -> bool:
        if self.device == "cuda":
            return self.cuda_bf16
        return any(f in self.cpu_flags for f in CPU_BF16_FLAGS)

    @property
    def native_int8(self) -> bool:
        return self.device == "cpu" and self.int8_engine and any(f in self.cpu_flags for f in CPU_INT8_FLAGS)

    def describe(self) -> str:
        """One line for logs and bench reports: the flags that decide the precision, as detected now."""
        if self.device == "cuda":
            return f"cuda {self.name} (bf16 {'native' if self.cuda_bf16 else 'not native'})"
        flags = [f for f in CPU_BF16_FLAGS + CPU_INT8_FLAGS if f in self.cpu_flags]
        return f"cpu {self.name} (torch kernels {self.cpu_capability or '?'}; flags: {' '.join(flags) or 'none'})"


def read_cpu_flags(path: str = "/proc/cpuinfo") -> tuple[frozenset, str]:
    """(flags of the first CPU, model name) from /proc/cpuinfo; empty when it cannot be read (not Linux)."""
    flags, name = frozenset(), ""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags" and not flags:
                    flags = frozenset(value.split())
                elif key == "model name" and not name:
                    name = value.strip()
                if flags and name:
                    break
    except OSError:
        pass
    return flags, name


def detect_hardware(device) -> Hardware:
    device = torch.device(device)
    if device.type == "cuda":
        return Hardware("cuda", cuda_bf16=torch.cuda.is_bf16_supported(),
                        name=torch.cuda.get_device_name(device))
    flags, name = read_cpu_flags()
    engines = torch.backends.quantized.supported_engines
    return Hardware("cpu", flags, torch.backends.cpu.get_cpu_capability(),
                    int8_engine=any(e in engines for e in ("x86", "fbgemm")), name=name)


def choose_precision(requested: str, hw: Hardware, llm_params: int = SMALL_LLM_PARAMS) -> str:
    """The precision to run: ``requested`` unless "auto"; auto never picks what ``hw`` lacks.

    auto on CPU: int8 where fbgemm's int8 kernels run (VNNI or AVX2: fastest of the three, measured in
    bench/rerank.py), else bf16 where the CPU has bf16 dot products, else fp32; on CUDA: bf16 where native, else
    fp32. Models whose LLM blocks hold fewer than SMALL_LLM_PARAMS parameters (or none) stay fp32.
    """
    if requested not in PRECISIONS:
        raise ModelError(f"--precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested != "auto":
        if requested == "int8" and hw.device != "cpu":
            raise ModelError("--precision int8 runs on CPU only (torch's dynamic quantization); use bf16 on cuda")
        return requested
    if llm_params < SMALL_LLM_PARAMS:
        return "fp32"
    if hw.native_int8:
        return "int8"
    if hw.native_bf16:
        return "bf16"
    return "fp32"


# Windows per forward for a model with paper-size LLM blocks (bench/results/rerank.md, "Batch size"): on CPU the
# per-window time stops falling at about 4 (int8 and bf16, the 2-core EPYC), and a budgeted search (retriever.search)
# wants small steps; a GPU is latency-bound below ~32 (H200: 37 windows/s at 1, 279 at 8, 1103 at 32, bf16).
CPU_BATCH, GPU_BATCH = 4, 32
SMALL_MODEL_BATCH = 32  # small blocks: a forward is mostly fixed overhead, so more windows a forward is cheaper


def choose_batch_size(hw: Hardware, llm_params: int) -> int:
    """Windows per forward for reranking and `vmr predict` on ``hw`` (the constants above say why)."""
    if hw.device == "cuda":
        return GPU_BATCH
    return CPU_BATCH if llm_params >= SMALL_LLM_PARAMS else SMALL_MODEL_BATCH


def llm_block_params(model) -> int:
    """Parameters of the frozen LLM blocks, counted alike before and after int8 quantization (a quantized linear
    holds its weight outside ``parameters()``)."""
    n = 0
    for m in model.llm.blocks.modules():
        weight = getattr(m, "weight", None)
        if callable(weight) and not isinstance(weight, torch.Tensor):  # torch's quantized linear: weight() method
            n += weight().numel()
        n += sum(p.numel() for p in m.parameters(recurse=False))
    return n


def apply_precision(model, requested: str = "auto", device=None, log=None) -> str:
    """Cast or quantize ``model.llm``'s frozen blocks (an LLMEPET, eval use only) once; returns the precision
    applied. ``log``: a callable given one line saying what was picked and why (None: silent)."""
    device = torch.device(device if device is not None else next(model.parameters()).device)
    hw = detect_hardware(device)
    picked = choose_precision(requested, hw, llm_block_params(model))
    llm = model.llm
    if picked == "int8":
        llm.norm.to(torch.float32)
        for block in llm.blocks:
            quantize_linear_int8(block)
    else:
        dtype = torch.bfloat16 if picked == "bf16" else torch.float32
        llm.blocks.to(dtype)
        llm.norm.to(dtype)
    if log is not None:
        why = "requested" if requested != "auto" else "auto"
        log(f"precision: {picked} ({why}; {hw.describe()})")
    return picked


def quantize_linear_int8(module: nn.Module) -> nn.Module:
    """Every nn.Linear in ``module`` -> torch's dynamically quantized int8 linear (per-channel weights), in place,
    one layer at a time: the float32 copy the quantizer reads exists for one layer only (a 4096 x 11008 LLaMA
    projection: 180 MB), and the layer's stored weights are released as soon as it is swapped. The rest of
    ``module`` (norms) becomes float32."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    linears = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]
    with warnings.catch_warnings():  # torch flags quantized tensor creation as deprecated (a long notice per layer)
        warnings.simplefilter("ignore")
        while linears:
            parent, name, child = linears.pop()
            stored = child.weight.detach()
            child.float().qconfig = per_channel_dynamic_qconfig
            cast = child.weight.data_ptr() != stored.data_ptr()
            if cast:  # the quantizer reads the float32 copy: the stored (memory-mapped) pages can leave RSS now
                release_file_pages(stored)
            setattr(parent, name, DynamicLinear.from_float(child))
            del child  # the last reference here: its weights go now, not after the loop
            if not cast:
                release_file_pages(stored)
            del stored
    return module.float()


def autocast_for(precision: str, device) -> contextlib.AbstractContextManager:
    """The autocast context CLIP runs under: bf16 autocast for "bf16", none for "fp32"."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def clip_precision(requested: str, hw: Hardware) -> str:
    """CLIP's precision, "fp32" or "bf16" (CLIP has no int8 path): bf16 when asked for; with auto or int8, bf16
    where the device has it natively, else fp32."""
    if requested not in PRECISIONS:
        raise ModelError(f"--precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested in ("fp32", "bf16"):
        return requested
    return "bf16" if hw.native_bf16 else "fp32"
