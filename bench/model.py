"""Model benchmark: LLMEPET forward (prediction) and training-step time and peak memory.

The paper's configuration (QVHighlights script: hidden 256, 6 encoder / 6 decoder layers, 45 dummies, 10 queries,
3 LLM layers) on QVHighlights-sized inputs (75 clips of CLIP+TEF 514-d, 32 tokens of 512-d), with a small
random LLaMA-shaped LLM (on CPU: width 512; on GPU also the LLaMA-7B width 4096 in bf16). Measured:

  predict       eval(), no targets: what ``vmr predict`` / search reranking run
  predict+neg   eval() but with the negative (shuffled-pair) pass the authors' inference also runs
  train step    train(): forward with targets and the negative pass, all losses, backward, AdamW step

CPU runs use one intra-op thread. Memory: CUDA peak allocated per measurement; on CPU the process's peak RSS after each measurement (monotone, so
measurements run from the smallest to the largest).
"""
from __future__ import annotations

import resource
import time

import torch

from model.config import ModelConfig, dataset_defaults
from model.criterion import build_criterion
from model.llmepet import build_model

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
                      llm_kv_heads=max(1, llm_dim // 128), llm_ffn_dim=llama_ffn(llm_dim), llm_attention=attention,
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
        plan = [dict(llm_dim=512, batch=8, reps=3), dict(llm_dim=512, batch=32, reps=2),
                dict(llm_dim=512, batch=32, reps=2, attention="batch")]
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
    return {"markdown": md, "headline": headline, "rows": rows}


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    print(json.dumps(run("/tmp", "--quick" in sys.argv), indent=1, default=str)[:3000])
