"""Precision of the frozen LLM blocks and of CLIP (model.inference.precision), and compact checkpoints
(model.inference.checkpoint)."""
from __future__ import annotations

import copy
import itertools
import os

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import world
from model.inference.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.inference.features import ClipEncoder
from model.net.llmepet import build_model
from model.inference.postprocess import decode_outputs
from model.inference.precision import (CPU_BATCH, CPU_BF16_FLAGS, CPU_INT8_FLAGS, GPU_BATCH, SMALL_LLM_PARAMS,
                                       SMALL_MODEL_BATCH, Hardware, apply_precision, choose_batch_size,
                                       choose_precision, clip_precision, detect_hardware, read_cpu_flags)
from model.data.sample import DataConfig
from model.spans import temporal_iou

# the paper's structure (QVHighlights CG-DETR stages, LLaMA-shaped blocks without rotary), at a small width
SMALL = dict(hidden_dim=64, nheads=4, dim_feedforward=128, enc_layers=2, dec_layers=2, t2v_layers=2, dummy_layers=1,
             sent_layers=1, moment_layers=1, num_dummies=8, total_prompts=4, max_q_l=20, max_v_l=75,
             txt_dim=64, vid_dim=66, llm="random", llm_layers="0:2", llm_dim=256, llm_heads=2, llm_kv_heads=2,
             llm_ffn_dim=768)
N_WINDOWS, N_CLIPS, N_TOKENS = 16, 75, 12


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(**SMALL)).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    txt = torch.nn.functional.normalize(torch.randn(N_WINDOWS, N_TOKENS, 64, generator=g), dim=-1)
    vid = torch.randn(N_WINDOWS, N_CLIPS, 66, generator=g)
    vid[..., :64] = torch.nn.functional.normalize(vid[..., :64], dim=-1)
    vid[..., 64] = torch.arange(N_CLIPS) / N_CLIPS
    vid[..., 65] = (torch.arange(N_CLIPS) + 1) / N_CLIPS
    return txt, torch.ones(N_WINDOWS, N_TOKENS), vid, torch.ones(N_WINDOWS, N_CLIPS)


def _predict(model, inputs):
    with torch.inference_mode():
        out = model(*inputs)
    meta = [{"duration": N_CLIPS * 2.0}] * N_WINDOWS
    return decode_outputs(out, inputs[3], meta)


# --- auto never picks what the hardware lacks --------------------------------------------------------------------

FLAG_POOL = CPU_BF16_FLAGS + CPU_INT8_FLAGS + ("sse4_2",)


@pytest.mark.parametrize("n", range(len(FLAG_POOL) + 1))
def test_auto_never_picks_what_the_cpu_lacks(n):
    for flags in itertools.combinations(FLAG_POOL, n):
        for engine in (True, False):
            hw = Hardware("cpu", frozenset(flags), int8_engine=engine)
            picked = choose_precision("auto", hw, llm_params=10 * SMALL_LLM_PARAMS)
            if picked == "int8":
                assert engine and set(flags) & set(CPU_INT8_FLAGS)
            if picked == "bf16":
                assert set(flags) & set(CPU_BF16_FLAGS)
            if not engine and not set(flags) & set(CPU_BF16_FLAGS):
                assert picked == "fp32"
            assert clip_precision("auto", hw) in (("bf16", "fp32") if set(flags) & set(CPU_BF16_FLAGS) else ("fp32",))


def test_auto_choices_and_explicit_requests():
    big = 10 * SMALL_LLM_PARAMS
    vnni_bf16 = Hardware("cpu", frozenset({"avx2", "avx512_vnni", "avx512_bf16"}), int8_engine=True)
    assert choose_precision("auto", vnni_bf16, big) == "int8"
    assert choose_precision("auto", Hardware("cpu", frozenset({"avx512_bf16"})), big) == "bf16"
    assert choose_precision("auto", Hardware("cpu", frozenset()), big) == "fp32"
    assert choose_precision("auto", vnni_bf16, llm_params=100_000) == "fp32"  # tiny blocks: nothing to gain
    assert choose_precision("auto", Hardware("cuda", cuda_bf16=True), big) == "bf16"
    assert choose_precision("auto", Hardware("cuda", cuda_bf16=False), big) == "fp32"
    assert choose_precision("fp32", vnni_bf16, big) == "fp32"  # parity mode is never overridden
    with pytest.raises(Exception, match="int8 runs on CPU only"):
        choose_precision("int8", Hardware("cuda", cuda_bf16=True), big)
    with pytest.raises(Exception, match="--precision must be one of"):
        choose_precision("fp16", vnni_bf16, big)


def test_batch_size_by_hardware_and_model_size():
    cpu, gpu = Hardware("cpu", frozenset({"avx512_vnni"}), int8_engine=True), Hardware("cuda", cuda_bf16=True)
    assert choose_batch_size(cpu, 607_000_000) == CPU_BATCH < choose_batch_size(gpu, 607_000_000) == GPU_BATCH
    assert choose_batch_size(cpu, 100_000) == SMALL_MODEL_BATCH
    assert choose_batch_size(gpu, 0) == GPU_BATCH


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512_vnni\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    flags, name = read_cpu_flags(str(fake))
    assert flags == {"fpu", "avx2", "avx512_vnni"} and name == "Test CPU"
    assert read_cpu_flags(str(tmp_path / "missing")) == (frozenset(), "")
    hw = detect_hardware("cpu")  # this machine, detected now: auto only picks what it has
    picked = choose_precision("auto", hw, 10 * SMALL_LLM_PARAMS)
    assert picked == "fp32" or (picked == "int8" and hw.native_int8) or (picked == "bf16" and hw.native_bf16)


# --- reduced precision stays within the accuracy bounds of fp32 -------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_within_bounds_of_fp32(small_model, precision):
    inputs = _inputs()
    ref = _predict(small_model, inputs)
    model = copy.deepcopy(small_model)
    assert apply_precision(model, precision, "cpu") == precision
    if precision == "int8":
        assert "quantized" in type(model.llm.blocks[0].feed_forward.w1).__module__
    else:
        assert model.llm.blocks[0].feed_forward.w1.weight.dtype == torch.bfloat16
    got = _predict(model, inputs)
    same_top1 = [temporal_iou(a["windows"][0][:2], b["windows"][0][:2]) >= 0.9 for a, b in zip(ref, got)]
    rho = [spearmanr(a["saliency"], b["saliency"])[0] for a, b in zip(ref, got)]
    assert np.mean(same_top1) >= 0.95, same_top1
    assert min(rho) >= 0.99, rho


def test_fp32_is_exactly_the_built_model(small_model):
    model = copy.deepcopy(small_model)
    apply_precision(model, "fp32", "cpu")
    inputs = _inputs()
    with torch.inference_mode():
        assert torch.equal(model(*inputs)["saliency_scores"], small_model(*inputs)["saliency_scores"])


# --- the query's text side once per rerank call ---------------------------------------------------------------------

def test_one_sentence_for_all_windows_equals_it_repeated(small_model):
    """A rerank batch gives the query's sentence once ([1, Lt, Dt]); the outputs equal those of the same sentence
    repeated per window, with windows of different lengths (padded) in the batch."""
    txt, txt_mask, vid, vid_mask = _inputs()
    txt_mask[:, 9:] = 0  # a 9-word sentence padded to 12
    vid_mask[3, 40:] = 0
    vid_mask[7, 10:] = 0
    repeated = (txt[:1].expand_as(txt).clone(), txt_mask[:1].expand_as(txt_mask).clone(), vid, vid_mask)
    with torch.inference_mode():
        want = small_model(*repeated)
        got = small_model(txt[:1], txt_mask[:1], vid, vid_mask)
    for key in ("pred_logits", "pred_spans", "saliency_scores", "t2vattnvalues", "pred_event_spans"):
        assert got[key].shape == want[key].shape
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    with pytest.raises(Exception, match="2 sentences for 16 videos"):
        small_model(txt[:2], txt_mask[:2], vid, vid_mask)


# --- compact checkpoints ------------------------------------------------------------------------------------------

SPEC = {"clip_model": "x", "video_kinds": ["clip"], "video_dims": [64], "text_dim": 64, "clip_seconds": 2.0}


def _fp32_size(model) -> int:
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())


def test_compact_checkpoint_round_trip(small_model, tmp_path):
    path = tmp_path / "small.ckpt"
    save_checkpoint(str(path), small_model, DataConfig(), SPEC, "custom")
    blocks = sum(p.numel() for p in small_model.llm.blocks.parameters())
    # random blocks hold bf16 values: stored in 2 bytes each, everything else as it was
    assert os.path.getsize(path) <= _fp32_size(small_model) - 2 * blocks + 200_000
    loaded, ckpt = load_checkpoint(str(path))
    assert ckpt["llm"]["stored_as"] == "bfloat16"
    assert loaded.llm.blocks[0].attention.wq.weight.dtype == torch.float32  # the config's dtype again
    inputs = _inputs()
    with torch.inference_mode():  # lossless: the same numbers as before saving
        assert torch.equal(loaded(*inputs)["saliency_scores"], small_model(*inputs)["saliency_scores"])
    quantized, _ = load_checkpoint(str(path), precision="int8")
    assert quantized.precision == "int8"
    assert min(spearmanr(a["saliency"], b["saliency"])[0]
               for a, b in zip(_predict(quantized, inputs), _predict(small_model, inputs))) >= 0.99


def test_int8_from_a_memory_mapped_checkpoint_equals_int8_in_memory(small_model, tmp_path):
    """Loading maps the file and releases each quantized layer's pages: the numbers are those of quantizing the
    model in memory; released pages read back unchanged from the file, heap tensors are left alone."""
    from model.inference.checkpoint import read_checkpoint
    from model.inference.file_pages import _in_private_file_mapping, release_file_pages
    from model.inference.precision import apply_precision

    path = tmp_path / "small.ckpt"
    save_checkpoint(str(path), small_model, DataConfig(), SPEC, "custom")
    mapped, _ = load_checkpoint(str(path), precision="int8")
    in_memory = copy.deepcopy(small_model)
    apply_precision(in_memory, "int8", "cpu")
    inputs = _inputs()
    with torch.inference_mode():
        assert torch.equal(mapped(*inputs)["saliency_scores"], in_memory(*inputs)["saliency_scores"])
        assert torch.equal(mapped(*inputs)["pred_spans"], in_memory(*inputs)["pred_spans"])
    big = read_checkpoint(str(path))["state"]["llm.blocks.0.feed_forward.w1.weight"]  # 196 k bf16: whole pages
    before = big.clone()
    lo = big.data_ptr()
    assert _in_private_file_mapping(lo, lo + 1) and not _in_private_file_mapping(before.data_ptr(), before.data_ptr() + 1)
    release_file_pages(big)
    assert torch.equal(big, before)
    heap = before.clone()
    release_file_pages(heap)
    assert torch.equal(heap, before)


def test_blocks_that_are_not_half_values_stay_fp32(small_model, tmp_path):
    """Weights with full fp32 mantissas (the authors' golden random blocks, a fine-tuned copy) are not rounded:
    checkpoint storage never changes a prediction; such files load as version-1 files always did."""
    model = copy.deepcopy(small_model)
    with torch.no_grad():
        for p in model.llm.blocks.parameters():
            p.add_(torch.randn_like(p) * 1e-4)
    path = tmp_path / "full.ckpt"
    save_checkpoint(str(path), model, DataConfig(), SPEC, "custom")
    loaded, ckpt = load_checkpoint(str(path))
    assert ckpt["llm"]["stored_as"] == "float32"
    for a, b in zip(loaded.llm.blocks.parameters(), model.llm.blocks.parameters()):
        assert torch.equal(a, b)


# --- CLIP ---------------------------------------------------------------------------------------------------------

def test_world_clip_bf16_embeddings_agree_with_fp32():
    args = (str(world.WORLD_CLIP_CONFIG), str(world.WORLD_CLIP_WEIGHTS))
    fp32 = ClipEncoder.load(*args, device="cpu", precision="fp32")
    bf16 = ClipEncoder.load(*args, device="cpu", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(24, fp32.image_size, fp32.image_size, 3), dtype=np.uint8)
    a, b = fp32.encode_frames_uint8(frames), bf16.encode_frames_uint8(frames)
    assert (a * b).sum(1).min() >= 0.999
    ta, tb = fp32.encode_text(["a red circle moves left", "two squares"]), bf16.encode_text(["a red circle moves left",
                                                                                            "two squares"])
    assert (ta * tb).sum(1).min() >= 0.999
    auto = ClipEncoder.load(*args, device="cpu", precision="auto")
    assert auto.precision == ("bf16" if detect_hardware("cpu").native_bf16 else "fp32")


def test_rewriting_a_memory_mapped_checkpoint_keeps_the_open_one_readable(small_model, tmp_path):
    """A checkpoint read (memory-mapped) and written back to the same path with one change (what the rule fit
    and the world reranker's clean-up do): the new file holds the change and every weight, and the tensors still
    mapped from the old file read their old values (writing in place would truncate the mapping under them)."""
    from model.inference.checkpoint import read_checkpoint, write_checkpoint

    path = str(tmp_path / "small.ckpt")
    save_checkpoint(path, small_model, DataConfig(), SPEC, "custom")
    ckpt = read_checkpoint(path)
    big = ckpt["state"]["llm.blocks.0.feed_forward.w1.weight"]
    before = big.clone()
    ckpt["model_config"].setdefault("extra", {})["note"] = "rewritten"
    write_checkpoint(ckpt, path)
    assert torch.equal(big, before)  # the old mapping is intact
    again = read_checkpoint(path)
    assert again["model_config"]["extra"]["note"] == "rewritten"
    assert set(again["state"]) == set(ckpt["state"])
    assert all(torch.equal(again["state"][k], v) for k, v in ckpt["state"].items())
    assert [p.name for p in tmp_path.iterdir()] == ["small.ckpt"]  # no temporary file left
