"""model.inference.predict / postprocess / checkpoint: submission rows as the authors post-process them, checkpoints
that round-trip exactly and refuse the wrong features or LLM weights, batch order in the authors' LLM mode, long
videos."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_data import AUTHORS_REPO, SHARED_DATA
from providers import ArrayProvider
from model.inference.checkpoint import llm_blocks_sha256, load_checkpoint, read_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.data.dataset import MomentDataset
from model.data.sample import DataConfig, collate
from model.errors import ModelError
from model.net.llmepet import build_model
from model.inference.postprocess import clean_windows, decode_outputs, merge_windows
from model.inference.predict import predict_annotations, predict_from_cli

TINY = dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=1, dec_layers=2, t2v_layers=1, dummy_layers=1,
            moment_layers=1, sent_layers=1, num_dummies=3, total_prompts=3, num_queries=5, llm="random", llm_dim=32,
            llm_heads=4, llm_kv_heads=4, llm_ffn_dim=64, llm_layers="0:1", txt_dim=8, vid_dim=18,
            vid_has_window_suffix=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_window_merge():
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
    assert raw["llm"] == {"mode": "embedded", "stored_as": "bfloat16"}  # random blocks: bf16 values, stored in 2 bytes
    assert raw["feature_spec"]["clip_model"] == "ViT-B-32:openai"
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
    model = tiny_model(compat="authors")
    data_cfg = DataConfig()
    full = predict_annotations(model, anns, provider, data_cfg, "custom", batch_size=3, progress=False)
    chunks = []
    for s in range(0, 7, 3):
        chunks += predict_annotations(model, anns[s:s + 3], provider, data_cfg, "custom", batch_size=3,
                                      progress=False)
    assert full == chunks
    single = predict_annotations(model, anns, provider, data_cfg, "custom", batch_size=1, progress=False)
    assert single != full  # the batch's other samples do change the result in this mode
    timewise = tiny_model(compat="vmr")
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


# Runs in a child process (PYTHONPATH: this project, its tests/, then the authors' checkout): it imports the
# authors' dataset / inference code, with their unused heavy imports (sklearn, pandas, torchtext, tensorboard,
# fairscale) stubbed, and prints the differences as JSON.
PARITY_SCRIPT = r'''
import importlib.abc, importlib.machinery, json, sys, tempfile, types
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)

class Stub(types.ModuleType):
    def __getattr__(self, k):
        if k.startswith("__"):
            raise AttributeError(k)
        return Stub(k)
    def __call__(self, *a, **k):
        return self

class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    PREFIXES = ("torchtext", "pandas", "sklearn", "seaborn", "fairscale", "torch.utils.tensorboard", "tensorboard")
    def find_spec(self, name, path, target=None):
        if name.startswith(self.PREFIXES):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = Stub(spec.name); m.__path__ = []; return m
    def exec_module(self, m):
        pass

sys.meta_path.insert(0, StubFinder())
import llm_epet.postprocessing_llm as post
sys.modules["llm_epet.postprocessing_cg_detr"] = post  # their inference imports the module's old name
import llm_epet.inference as inference
from llm_epet.start_end_dataset import StartEndDataset, start_end_collate
from test_train import TINY, write_public_features
from model.config import ModelConfig
from model.data.dataset import MomentDataset
from model.data.providers import PublicFeatureDir
from model.data.sample import DataConfig
from model.net.llmepet import build_model
from model.inference.predict import predict_annotations

anns = [json.loads(l) for l in open(sys.argv[1] + "/qvhighlights/highlight_val_release.jsonl")][:40]
root = Path(tempfile.mkdtemp())
write_public_features(root, anns, slowfast_dim=64)
(root / "a.jsonl").write_text("\n".join(json.dumps(a) for a in anns))
dirs = [str(root / "slowfast_features"), str(root / "clip_features")]
theirs = StartEndDataset("hl", str(root / "a.jsonl"), dirs, str(root / "clip_text_features"), max_q_l=32,
                         max_v_l=75, ctx_mode="video_tef")
ours = MomentDataset(anns, PublicFeatureDir(str(root)), DataConfig(max_q_l=32, max_v_l=75))
diff = {"video": 0.0, "text": 0.0, "spans": 0.0, "saliency_all": 0.0, "hard_pairs_differ": 0}
for i in range(len(anns)):
    t, o = theirs[i]["model_inputs"], ours[i]
    diff["video"] = max(diff["video"], float((t["video_feat"] - o["video"]).abs().max()))
    diff["text"] = max(diff["text"], float((t["query_feat"] - o["text"]).abs().max()))
    if len(anns[i]["relevant_windows"]) <= 5:  # more windows: both take a random subset
        diff["spans"] = max(diff["spans"], float((t["span_labels"] - o["labels"]["spans"]).abs().max()))
    diff["saliency_all"] = max(diff["saliency_all"], float(np.abs(np.asarray(t["saliency_all_labels"])
                                                                   - o["labels"]["saliency_all"]).max()))
    diff["hard_pairs_differ"] += int(t["saliency_pos_labels"][0] != o["labels"]["saliency_pos"][0]
                                     or t["saliency_neg_labels"][0] != o["labels"]["saliency_neg"][0])

torch.manual_seed(0)
model = build_model(ModelConfig(**{**TINY, "txt_dim": 512, "vid_dim": 64 + 512 + 2, "compat": "authors"})).eval()
rows = predict_annotations(model, anns, PublicFeatureDir(str(root)), DataConfig(max_q_l=32, max_v_l=75),
                           "qvhighlights", batch_size=16, progress=False)
theirs.load_labels = False
loader = torch.utils.data.DataLoader(theirs, batch_size=16, collate_fn=start_end_collate, shuffle=False)

class DropQid(torch.nn.Module):  # their loop passes qid, which our forward does not take
    def __init__(self, m):
        super().__init__(); self.m = m
    def forward(self, qid=None, **kw):
        return self.m(**kw)

opt = types.SimpleNamespace(span_loss_type="l1", dset_name="hl", clip_length=2, v_feat_dim=578,
                            no_sort_results=False, debug=False, device="cpu", pin_memory=False)
their_rows, _ = inference.compute_mr_results(DropQid(model), loader, opt)
diff["rows_differ"] = sum(a != b for a, b in zip(rows, their_rows)) + abs(len(rows) - len(their_rows))
print("PARITY " + json.dumps(diff))
'''


@pytest.mark.skipif(not (AUTHORS_REPO.is_dir() and os.path.isdir(SHARED_DATA / "qvhighlights")),
                    reason="authors' code or shared data not present")
def test_same_samples_and_predictions_as_authors_code(tmp_path):
    """Our samples equal their StartEndDataset's (features, TEF, text, span and saliency targets), and
    `predict_annotations` writes exactly the rows their inference + post-processing write (batch LLM mode)."""
    script = tmp_path / "parity.py"
    script.write_text(PARITY_SCRIPT)
    project = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(project), str(project / "tests"), str(AUTHORS_REPO)])
    res = subprocess.run([sys.executable, str(script), str(SHARED_DATA)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("PARITY ")]
    assert line, res.stderr[-2000:]
    diff = json.loads(line[0][len("PARITY "):])
    assert diff == {"video": 0.0, "text": 0.0, "spans": 0.0, "saliency_all": 0.0, "hard_pairs_differ": 0,
                    "rows_differ": 0}
