"""model.predict / postprocess / checkpoint: submission rows as the authors post-process them, checkpoints that
round-trip exactly and refuse the wrong features or LLM weights, batch order in the authors' LLM mode, long videos."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.checkpoint import llm_blocks_sha256, load_checkpoint, read_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.data import DataConfig, MomentDataset, collate
from model.errors import ModelError
from model.llmepet import build_model
from model.postprocess import clean_windows, decode_outputs, merge_windows, temporal_nms
from model.predict import predict_annotations, predict_from_cli

TINY = dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1, dec_layers=2, t2v_layers=1, dummy_layers=1,
            moment_layers=1, sent_layers=1, num_dummies=3, total_prompts=3, num_queries=5, llm="random", llm_dim=32,
            llm_heads=4, llm_kv_heads=4, llm_ffn_dim=64, llm_layers="0:1", txt_dim=8, vid_dim=18,
            vid_has_window_suffix=False)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ArrayProvider:
    def __init__(self, videos, texts, clip_model="ViT-B-32:openai", dim=16, tdim=8):
        self.videos, self.texts, self.clip_model, self.dim, self.tdim = videos, texts, clip_model, dim, tdim

    def video_features(self, vid):
        return self.videos[vid]

    def text_features(self, query):
        return self.texts[query]

    def feature_spec(self):
        return {"clip_model": self.clip_model, "video_kinds": ["clip"], "video_dims": [self.dim],
                "text_dim": self.tdim, "clip_seconds": 2.0}


def make_world(n=7, seed=0, lengths=None):
    rng = np.random.default_rng(seed)
    videos, texts, anns = {}, {}, []
    for i in range(n):
        t = lengths[i] if lengths else int(rng.integers(10, 30))
        videos[f"v{i}"] = rng.normal(size=(t, 16)).astype(np.float32)
        texts[f"q{i}"] = rng.normal(size=(int(rng.integers(2, 6)), 8)).astype(np.float32)
        anns.append({"qid": i, "query": f"q{i}", "vid": f"v{i}", "duration": 2 * t, "relevant_windows": [[0, 4]]})
    return ArrayProvider(videos, texts), anns


def tiny_model(seed=0, **over):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**TINY, **over})).eval()


def test_decode_and_clean_follow_the_authors_postprocessing():
    outputs = {"pred_logits": torch.tensor([[[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]]]),
               "pred_spans": torch.tensor([[[0.5, 0.2], [0.05, 0.3], [0.9, 0.4]]]),
               "saliency_scores": torch.tensor([[0.123456789, -1.0, 3.3333333, 9.0]])}
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    (pred,) = decode_outputs(outputs, mask, [{"duration": 150.0}])
    scores = [w[2] for w in pred["windows"]]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(0.8808, abs=1e-4)
    assert pred["windows"][0][:2] == [60.0, 90.0]
    assert pred["windows"][2][:2] == [0.0, 30.0]  # clamped at 0
    assert pred["windows"][1][:2] == [105.0, 150.0]  # clamped at the duration
    assert pred["saliency"] == [float(np.float16(0.123456789)), -1.0, float(np.float16(3.3333333))]  # valid, fp16
    assert clean_windows([[3.1, 7.0, 0.123456], [-2.0, 151.2, 0.5]], 2.0, 150.0) == \
        [[4.0, 8.0, 0.1235], [0.0, 150.0, 0.5]]
    assert clean_windows([[1.4, 2.6, 0.5]], 1.0, None) == [[1.0, 3.0, 0.5]]


def test_nms_and_window_merge():
    rows = [[0, 10, 0.9], [1, 10, 0.8], [20, 30, 0.7], [0, 9, 0.6]]
    assert temporal_nms(rows, 0.7, 10) == [[0, 10, 0.9], [20, 30, 0.7]]
    merged = merge_windows([(0.0, {"windows": [[0.0, 4.0, 0.5]], "saliency": [1.0, 1.0, 1.0]}),
                            (4.0, {"windows": [[0.0, 4.0, 0.9]], "saliency": [3.0, 3.0, 3.0]})], 5, 2.0)
    assert merged["windows"] == [[4.0, 8.0, 0.9], [0.0, 4.0, 0.5]]
    assert merged["saliency"] == [1.0, 1.0, 2.0, 3.0, 3.0]


def test_save_load_identical_outputs_and_weights_only(tmp_path):
    provider, anns = make_world()
    model = tiny_model()
    data_cfg = DataConfig()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, data_cfg, provider.feature_spec(), "custom")
    raw = torch.load(path, map_location="cpu", weights_only=True)  # nothing but plain data and tensors
    assert raw["llm"] == {"mode": "embedded"} and raw["feature_spec"]["clip_model"] == "ViT-B-32:openai"
    loaded, ckpt = load_checkpoint(path, features=provider.feature_spec())
    batch = collate([MomentDataset(anns, provider, data_cfg, load_labels=False)[i] for i in range(4)])
    with torch.no_grad():
        a, b = model(**batch["inputs"]), loaded(**batch["inputs"])
    for key in ("pred_logits", "pred_spans", "saliency_scores"):
        assert torch.equal(a[key], b[key])
    rows_a = predict_annotations(model, anns, provider, data_cfg, "custom", batch_size=3, progress=False)
    rows_b = predict_annotations(loaded, anns, provider, data_cfg, ckpt["dataset"], batch_size=3, progress=False)
    assert rows_a == rows_b


def test_feature_spec_mismatch_refused(tmp_path):
    provider, anns = make_world()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, tiny_model(), DataConfig(), provider.feature_spec(), "custom")
    other = ArrayProvider(provider.videos, provider.texts, clip_model="ViT-L-14:openai")
    with pytest.raises(ModelError, match="does not match the index x: clip_model ViT-L-14:openai"):
        load_checkpoint(path, features=other.feature_spec(), what="the index x")
    (tmp_path / "anns.jsonl").write_text("\n".join(json.dumps(a) for a in anns))
    with pytest.raises(ModelError, match="clip_model"):
        predict_from_cli(path, "idx", None, str(tmp_path / "anns.jsonl"), str(tmp_path / "p.jsonl"), device="cpu",
                         provider=other)
    rows = predict_from_cli(path, "idx", None, str(tmp_path / "anns.jsonl"), str(tmp_path / "p.jsonl"), device="cpu",
                            provider=provider)
    assert len(rows) == len(anns) and (tmp_path / "p.jsonl").read_text().count("\n") == len(anns)
    # not a vmr checkpoint
    torch.save({"model": {}}, tmp_path / "authors.ckpt")
    with pytest.raises(ModelError, match="convert-checkpoint"):
        read_checkpoint(str(tmp_path / "authors.ckpt"))


def _tiny_hf_llama(path, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


def test_llm_blocks_stored_as_verified_reference(tmp_path):
    llm_dir = tmp_path / "llm"
    _tiny_hf_llama(llm_dir, seed=0)
    provider, anns = make_world(n=3)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**TINY, "llm": str(llm_dir), "llm_layers": "1:2"})).eval()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, DataConfig(), provider.feature_spec(), "custom")
    raw = read_checkpoint(path)
    assert raw["llm"]["mode"] == "reference" and raw["llm"]["sha256"] == llm_blocks_sha256(model)
    assert not any(k.startswith("llm.blocks.") for k in raw["state"])  # the frozen blocks are not copied
    loaded, _ = load_checkpoint(path)
    rows = [predict_annotations(m, anns, provider, DataConfig(), "custom", progress=False) for m in (model, loaded)]
    assert rows[0] == rows[1]
    _tiny_hf_llama(llm_dir, seed=1)  # the LLM on disk changed
    with pytest.raises(ModelError, match="differ from those"):
        load_checkpoint(path)


def test_batch_mode_predicts_in_file_order_batches():
    """With the authors' LLM attention across the batch, a prediction depends on its batch: predict must form
    batches of consecutive annotations in file order."""
    provider, anns = make_world(n=7, lengths=[12] * 7)
    model = tiny_model(llm_attention="batch")
    data_cfg = DataConfig()
    full = predict_annotations(model, anns, provider, data_cfg, "custom", batch_size=3, progress=False)
    chunks = []
    for s in range(0, 7, 3):
        chunks += predict_annotations(model, anns[s:s + 3], provider, data_cfg, "custom", batch_size=3,
                                      progress=False)
    assert full == chunks
    single = predict_annotations(model, anns, provider, data_cfg, "custom", batch_size=1, progress=False)
    assert single != full  # the batch's other samples do change the result in this mode
    timewise = tiny_model(llm_attention="time")
    assert predict_annotations(timewise, anns, provider, data_cfg, "custom", batch_size=1, progress=False) == \
        predict_annotations(timewise, anns, provider, data_cfg, "custom", batch_size=3, progress=False)


def test_long_video_is_covered_by_windows():
    provider, anns = make_world(n=2, lengths=[200, 20])
    rows = predict_annotations(tiny_model(), anns, provider, DataConfig(max_v_l=75), "custom", batch_size=4,
                               progress=False)
    long_row = rows[0]
    assert len(long_row["pred_saliency_scores"]) == 200
    windows = long_row["pred_relevant_windows"]
    assert 0 < len(windows) <= 5 and all(0 <= w[0] <= w[1] <= 400 for w in windows)
    assert [w[2] for w in windows] == sorted((w[2] for w in windows), reverse=True)
    assert len(rows[1]["pred_saliency_scores"]) == 20
