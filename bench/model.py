"""Model benchmark: LLMEPET forward (prediction) and training-step time and peak memory.

The paper's configuration (QVHighlights script: hidden 256, 6 encoder / 6 decoder layers, 45 dummies, 10 queries,
3 LLM layers) on QVHighlights-sized inputs (75 clips of CLIP+TEF 514-d, 32 tokens of 512-d), with a small
random LLaMA-shaped LLM (on CPU: width 512; on GPU also the LLaMA-7B width 4096 in bf16). Measured:

  predict       eval(), no targets: what ``vmr predict`` / search reranking run
  predict+neg   eval() but with the negative (shuffled-pair) pass the authors' inference also runs
  train step    train(): forward with targets and the negative pass, all losses, backward, AdamW step

CPU runs use one intra-op thread. Memory: CUDA peak allocated per measurement; on CPU the process's peak RSS after each measurement (monotone, so
measurements run from the smallest to the largest).

Full mode adds an ablation of pseudo-event regulation (the event-span loss, on by default here, never active in the
authors' released code): a tiny model trained twice, identically seeded, with and without it, on synthetic videos
made of scenes (the query names one scene's content; the moment is that scene), validated on held-out videos.
"""
from __future__ import annotations

import resource
import time

import torch

from model.config import ModelConfig, dataset_defaults
from model.training.criterion import build_criterion
from model.net.llmepet import build_model

N_CLIPS, N_TOKENS, TXT_DIM, VID_DIM = 75, 32, 512, 514


def llama_ffn(dim: int) -> int:
    hidden = int(2 * 4 * dim / 3)
    return 256 * ((hidden + 255) // 256)


def _inputs(b: int, device):
    g = torch.Generator().manual_seed(0)
    txt = torch.randn(b, N_TOKENS, TXT_DIM, generator=g)
    vid = torch.randn(b, N_CLIPS, VID_DIM, generator=g)
    tm, vm = torch.ones(b, N_TOKENS), torch.ones(b, N_CLIPS)
    for i in range(b):  # a realistic mix of lengths
        tm[i, 8 + (i * 5) % (N_TOKENS - 8):] = 0
        vm[i, 30 + (i * 7) % (N_CLIPS - 30):] = 0
    sal = torch.zeros(b, N_CLIPS)
    spans, pos, neg = [], [], []
    for i in range(b):
        n = int(vm[i].sum())
        a, e = n // 3, n // 2
        sal[i, a:e + 1] = 2.0
        spans.append({"spans": torch.tensor([[(a + e + 1) / 2 / n, (e + 1 - a) / n]], device=device)})
        pos.append([a, e])
        neg.append([0, n - 1])
    targets = dict(span_labels=spans, saliency_pos_labels=torch.tensor(pos, device=device),
                   saliency_neg_labels=torch.tensor(neg, device=device), saliency_all_labels=sal.to(device))
    vids = [f"video{i // 2}_0.0_150.0" for i in range(b)]
    return [t.to(device) for t in (txt, tm, vid, vm)], targets, vids


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _timed(fn, device, reps: int) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], _peak_mb(device)


def measure(llm_dim: int, batch: int, device, reps: int, attention: str = "time", llm_dtype: str = "auto") -> dict:
    cfg = ModelConfig(llm="random", llm_dim=llm_dim, llm_heads=max(1, llm_dim // 128),
                      llm_kv_heads=max(1, llm_dim // 128), llm_ffn_dim=llama_ffn(llm_dim),
                      compat="authors" if attention == "batch" else "vmr",
                      llm_dtype=llm_dtype, txt_dim=TXT_DIM, vid_dim=VID_DIM).replace(**dataset_defaults("qvhighlights"))
    torch.manual_seed(0)
    model = build_model(cfg, device=device)
    criterion = build_criterion(cfg).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    (txt, tm, vid, vm), targets, vids = _inputs(batch, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def predict():
        model.eval()
        with torch.no_grad(), amp:
            model(txt, tm, vid, vm)

    def predict_with_negative():
        model.eval()
        with torch.no_grad(), amp:
            model(txt, tm, vid, vm, targets=targets, vid=vids, negative_pass=True)

    def train_step():
        model.train()
        with amp:
            losses = criterion(model(txt, tm, vid, vm, targets=targets, vid=vids), targets)
            total = criterion.total(losses)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    row = dict(llm_dim=llm_dim, batch=batch, attention=attention, llm_dtype=str(model.llm.dtype).split(".")[-1],
               params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
               params_frozen=sum(p.numel() for p in model.parameters() if not p.requires_grad))
    for name, fn in (("predict", predict), ("predict+neg", predict_with_negative), ("train step", train_step)):
        seconds, peak = _timed(fn, device, reps)
        row[name] = dict(seconds=seconds, peak_mb=peak, windows_per_s=batch / seconds)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _table(rows: list[dict], device) -> str:
    mem = "peak alloc MB" if device.type == "cuda" else "peak RSS MB"
    lines = [f"| LLM width | LLM dtype | attention | batch | predict s (win/s) | predict+neg s | train step s | "
             f"{mem} (predict / train) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, n, t = r["predict"], r["predict+neg"], r["train step"]
        lines.append(f"| {r['llm_dim']} | {r['llm_dtype']} | {r['attention']} | {r['batch']} | "
                     f"{p['seconds']:.3f} ({p['windows_per_s']:.0f}) | {n['seconds']:.3f} | {t['seconds']:.3f} | "
                     f"{p['peak_mb']:.0f} / {t['peak_mb']:.0f} |")
    return "\n".join(lines)


class _Arrays:
    """A feature provider over in-memory arrays (the interface model.data expects)."""

    def __init__(self, videos, texts, dim):
        self.videos, self.texts, self.dim = videos, texts, dim

    def video_features(self, vid):
        return self.videos[vid]

    def text_features(self, query):
        return self.texts[query]

    def feature_spec(self):
        return {"clip_model": "synthetic", "video_kinds": ["clip"], "video_dims": [self.dim], "text_dim": self.dim,
                "clip_seconds": 2.0}


def scene_videos(n: int, seed: int, n_clips: int = 30, dim: int = 16, n_protos: int = 8):
    """Videos of 3-5 scenes (one prototype each, plus noise); each query describes one scene = the moment."""
    import numpy as np

    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(1234).normal(size=(n_protos, dim))
    videos, texts, anns = {}, {}, []
    for i in range(n):
        k = int(rng.integers(3, 6))
        cuts = np.sort(rng.choice(np.arange(3, n_clips - 2), size=k - 1, replace=False))
        bounds = [0, *cuts.tolist(), n_clips]
        if min(np.diff(bounds)) < 2:
            bounds = [round(j * n_clips / k) for j in range(k + 1)]
        scene_protos = rng.choice(n_protos, size=k, replace=False)
        feats = rng.normal(size=(n_clips, dim)) * 0.4
        for j in range(k):
            feats[bounds[j]:bounds[j + 1]] += protos[scene_protos[j]]
        target = int(rng.integers(0, k))
        vid, query = f"s{seed}_{i}", f"s{seed}_{i}_q"
        videos[vid] = feats.astype(np.float32)
        texts[query] = (protos[scene_protos[target]][None].repeat(3, 0)
                        + rng.normal(size=(3, dim)) * 0.2).astype(np.float32)
        anns.append({"qid": f"{seed}_{i}", "query": query, "vid": vid, "duration": 2.0 * n_clips,
                     "relevant_windows": [[2.0 * bounds[target], 2.0 * bounds[target + 1]]]})
    return videos, texts, anns


def event_loss_ablation(out_dir: str, epochs: int = 90) -> list[dict]:
    import os

    from model.data.dataset import MomentDataset
    from model.data.sample import DataConfig
    from model.training.settings import TrainConfig
    from model.training.train import Trainer

    videos, texts, train_anns = scene_videos(48, seed=1)
    v2, t2, val_anns = scene_videos(24, seed=2)
    provider = _Arrays({**videos, **v2}, {**texts, **t2}, 16)
    tiny = dict(hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=2, dec_layers=2, t2v_layers=1,
                dummy_layers=1, moment_layers=1, sent_layers=1, num_dummies=3, total_prompts=3, num_queries=5,
                llm="random", llm_dim=64, llm_heads=4, llm_kv_heads=4, llm_ffn_dim=128, llm_layers="0:2",
                txt_dim=16, vid_dim=18, vid_has_window_suffix=False)
    rows = []
    for event_loss in (True, False):
        torch.manual_seed(0)
        cfg = ModelConfig(event_coef=0.1 if event_loss else 0.0, **tiny)  # event_coef 0: the ablation
        data_cfg = DataConfig()
        tcfg = TrainConfig(bsz=8, eval_bsz=24, lr=2e-3, lr_drop=epochs * 3 // 4, n_epoch=epochs, eval_epoch=epochs,
                           grad_clip=1.0, seed=0, progress=False)
        trainer = Trainer(build_model(cfg), build_criterion(cfg), MomentDataset(train_anns, provider, data_cfg, seed=0),
                          val_anns, provider, data_cfg, tcfg, "custom", provider.feature_spec(),
                          os.path.join(out_dir, f"ablation_event_{event_loss}.pt"), torch.device("cpu"))
        t0 = time.perf_counter()
        summary = trainer.fit()
        val = summary["history"][-1]["val"]
        rows.append(dict(event_loss=event_loss, seconds=time.perf_counter() - t0,
                         **{k: val[k] for k in ("MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-mAP", "MR-full-mIoU")
                            if k in val}))
        for f in os.listdir(out_dir):
            if f.startswith(f"ablation_event_{event_loss}"):
                os.remove(os.path.join(out_dir, f))
    return rows


def run(out_dir: str, quick: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # one intra-op thread: on a shared, oversubscribed CPU the thread pool's synchronisation costs more than
        # it saves at these sizes (a 10x4x128 cos: 1.5 ms per 100 calls with 1 thread, 2.3 s with 2)
        torch.set_num_threads(1)
    if quick:
        plan = [dict(llm_dim=256, batch=4, reps=1)]
    elif device.type == "cuda":
        plan = [dict(llm_dim=512, batch=32, reps=5), dict(llm_dim=512, batch=32, reps=5, attention="batch"),
                dict(llm_dim=4096, batch=32, reps=5, llm_dtype="bfloat16"),
                dict(llm_dim=4096, batch=32, reps=3, llm_dtype="float32")]
    else:
        plan = [dict(llm_dim=512, batch=8, reps=2), dict(llm_dim=512, batch=32, reps=1),
                dict(llm_dim=512, batch=32, reps=1, attention="batch")]
    rows = [measure(p["llm_dim"], p["batch"], device, p["reps"], p.get("attention", "time"),
                    p.get("llm_dtype", "auto")) for p in plan]
    first = rows[0]
    saving = 1 - first["predict"]["seconds"] / first["predict+neg"]["seconds"]
    headline = (f"{device.type}: predict {first['predict']['windows_per_s']:.0f} windows/s, train step "
                f"{first['train step']['seconds']:.2f} s at batch {first['batch']} (LLM width {first['llm_dim']}); "
                f"skipping the negative pass saves {saving:.0%} of a prediction")
    md = (__doc__.split("\n\n", 1)[1] + "\n\n" + _table(rows, device)
          + f"\n\nTrainable parameters {first['params_trainable']:,}; frozen LLM parameters "
            f"{first['params_frozen']:,} (width {first['llm_dim']}).")
    result = {"markdown": md, "headline": headline, "rows": rows}
    if not quick:
        ablation = event_loss_ablation(out_dir)
        keys = [k for k in ablation[0] if k.startswith("MR-")]
        md += ("\n\n**Pseudo-event regulation ablation** (48 training / 24 held-out synthetic scene videos, tiny "
               "model, 90 epochs, one seed; 24 validation queries, so a difference of one query is 4.2 points):\n\n| event loss | " + " | ".join(keys) + " | train s |\n|---|"
               + "---|" * (len(keys) + 1) + "\n")
        for r in ablation:
            md += f"| {'on' if r['event_loss'] else 'off'} | " + " | ".join(f"{r[k]:.1f}" for k in keys) \
                + f" | {r['seconds']:.0f} |\n"
        result.update(markdown=md, ablation=ablation)
    return result


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    print(json.dumps(run("/tmp", "--quick" in sys.argv), indent=1, default=str)[:3000])
