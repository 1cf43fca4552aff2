"""Training LLMEPET (`vmr train`), as the authors' train.py: AdamW on the trainable parameters, StepLR dropping
the learning rate 10x every ``lr_drop`` epochs, gradient clipping at ``grad_clip``, validation with the official
metrics every ``eval_epoch`` epochs, the best checkpoint kept by their criterion (QVHighlights: MR-full-mAP;
Charades-STA / TACoS: MR-full-mIoU; otherwise the mean of R1@0.5 and R1@0.7), early stop after ``max_es_cnt``
evaluations without improvement.

Differences, on purpose: their loop also evaluates before every epoch only to log it (skipped); the last epoch is
always evaluated; on CUDA the forward/loss run under bf16 autocast (``amp``); ``--resume`` restores optimizer,
scheduler and epoch from our checkpoint (their --resume_all).

Settings (model.training.settings): defaults, the dataset's preset, ``--config`` JSON, ``--set KEY=VALUE``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time

import numpy as np
import torch
from tqdm import tqdm

from model.config import ModelConfig
from model.data.dataset import MomentDataset, load_annotations
from model.data.providers import PublicFeatureDir, check_feature_spec
from model.data.sample import DataConfig, collate, to_device
from model.errors import ModelError
from model.inference.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from model.inference.features import resolve_device
from model.inference.metrics import evaluate
from model.inference.predict import make_provider, predict_annotations
from model.net.llmepet import build_model
from model.training.criterion import build_criterion
from model.training.settings import TrainConfig, build_settings, negative_ratio, relevance_weight

def best_score(metrics: dict, dataset: str) -> float:
    """The authors' model-selection criterion."""
    brief = metrics["brief"]
    if dataset == "qvhighlights":
        return brief["MR-full-mAP"]
    if dataset in ("charades", "tacos"):
        return brief["MR-full-mIoU"]
    return (brief["MR-full-R1@0.7"] + brief["MR-full-R1@0.5"]) / 2


def describe_negatives(ds: MomentDataset, ratio: float, why: str) -> str:
    """The line `vmr train` prints about negative windows (which recipe this run uses)."""
    if not ds.negatives:
        return f"negative windows: none ({why})"
    n = sum(1 for e in ds.entries if e[1] == "negative")
    return (f"negative windows: {ratio:g} per annotation ({n} an epoch) from {ds.negatives.describe()} ({why}); "
            f"target: no moment, saliency 0")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ training
class Trainer:
    """Owns the model, criterion, optimizer, schedule and data of one training run."""

    def __init__(self, model, criterion, train_ds: MomentDataset, val_anns: list[dict] | None, provider,
                 data_cfg: DataConfig, train_cfg: TrainConfig, dataset: str, feature_spec: dict, out_path: str,
                 device: torch.device):
        self.model, self.criterion = model, criterion
        self.train_ds, self.val_anns, self.provider = train_ds, val_anns, provider
        self.data_cfg, self.cfg, self.dataset = data_cfg, train_cfg, dataset
        self.feature_spec, self.out_path, self.device = feature_spec, out_path, device
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.wd)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, train_cfg.lr_drop)
        self.start_epoch, self.best, self.es_count = 0, -math.inf, 0
        self.history: list[dict] = []
        workers = train_cfg.num_workers
        if workers < 0:
            public = isinstance(provider, PublicFeatureDir)
            workers = min(4, max(0, (os.cpu_count() or 1) - 1)) if device.type == "cuda" and public else 0
        self.workers = workers
        self.generator = torch.Generator().manual_seed(train_cfg.seed)
        self.loader = torch.utils.data.DataLoader(train_ds, batch_size=train_cfg.bsz, shuffle=True,
                                                  collate_fn=collate, num_workers=workers, generator=self.generator,
                                                  worker_init_fn=_seed_worker,
                                                  pin_memory=device.type == "cuda")
        use_amp = train_cfg.amp and device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if use_amp else None

    # -- state for --resume
    def train_state(self, epoch: int) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": epoch, "best": self.best if math.isfinite(self.best) else None, "es_count": self.es_count,
                "train_config": dataclasses.asdict(self.cfg)}

    def restore(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best = -math.inf if state.get("best") is None else float(state["best"])
        self.es_count = int(state.get("es_count", 0))

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        self.criterion.train()
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.cfg.n_epoch}", disable=not self.cfg.progress,
                   leave=False)
        for batch in bar:
            inputs, targets = to_device(batch, self.device)
            vids = [m["vid"] for m in batch["meta"]]
            with self._autocast():
                outputs = self.model(**inputs, targets=targets, vid=vids)
            # Losses in float32, outside autocast: CUDA autocast refuses binary_cross_entropy, and bf16 sums of
            # many small terms lose precision.
            losses = self.criterion(outputs, targets)  # the criterion computes in float32
            total = self.criterion.total(losses)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            n += 1
            sums["loss_overall"] = sums.get("loss_overall", 0.0) + float(total.detach())
            for k, v in losses.items():
                w = self.criterion.weight_dict.get(k)
                if w is not None:
                    sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * w
            bar.set_postfix(loss=f"{sums['loss_overall'] / n:.4f}")
        self.scheduler.step()
        return {k: v / max(n, 1) for k, v in sums.items()}

    def validate(self) -> dict:
        rows = predict_annotations(self.model, self.val_anns, self.provider, self.data_cfg, self.dataset,
                                   batch_size=self.cfg.eval_bsz, device=self.device, num_workers=self.workers,
                                   progress=self.cfg.progress)
        return evaluate(rows, self.val_anns)

    def save(self, path: str, epoch: int, metrics: dict | None) -> None:
        save_checkpoint(path, self.model, self.data_cfg, self.feature_spec, self.dataset,
                        train_state=self.train_state(epoch), metrics=metrics, embed_llm=self.cfg.embed_llm)

    def fit(self) -> dict:
        """Train from ``start_epoch`` to ``n_epoch``; returns a summary (best score, epochs, history)."""
        if self.start_epoch:  # a resumed run must not replay the first epochs' shuffles and label draws
            self.generator.manual_seed(self.cfg.seed + self.start_epoch)
            self.train_ds.rng.seed(self.cfg.seed + self.start_epoch)
        latest = _latest_path(self.out_path)
        log_path = _log_path(self.out_path)
        last = self.cfg.n_epoch - 1
        epoch = self.start_epoch - 1
        for epoch in range(self.start_epoch, self.cfg.n_epoch):
            t0, lr = time.time(), self.optimizer.param_groups[0]["lr"]
            losses = self.train_epoch(epoch)
            record = {"epoch": epoch + 1, "lr": lr, "seconds": time.time() - t0, **losses}
            if (epoch + 1) % self.cfg.eval_epoch == 0 or epoch == last:
                brief = None
                if self.val_anns:
                    metrics = self.validate()
                    brief = dict(metrics["brief"])
                    score = best_score(metrics, self.dataset)
                    record.update(val=brief, score=score)
                    improved = score > self.best
                else:  # no validation set: the latest model is the one we keep
                    improved = True
                if improved:
                    self.best = score if self.val_anns else self.best
                    self.es_count = 0
                    self.save(self.out_path, epoch, brief)
                else:
                    self.es_count += 1
                self.save(latest, epoch, brief)
                if self.cfg.progress:
                    tqdm.write(_describe(record))
                if self.cfg.max_es_cnt != -1 and self.es_count > self.cfg.max_es_cnt:
                    record["early_stop"] = True
                    self.history.append(record)
                    _append_jsonl(log_path, record)
                    break
            self.history.append(record)
            _append_jsonl(log_path, record)
        return {"best_score": None if not math.isfinite(self.best) else self.best, "epochs": epoch + 1,
                "history": self.history, "checkpoint": self.out_path}


def _seed_worker(worker_id: int) -> None:
    """Each DataLoader worker draws its own labels (a forked copy of the dataset's RNG would repeat them);
    torch seeds workers from the loader's generator, so runs stay reproducible."""
    info = torch.utils.data.get_worker_info()
    info.dataset.rng.seed(torch.initial_seed() % 2**32)


def _latest_path(out_path: str) -> str:
    root, ext = os.path.splitext(out_path)
    return f"{root}.latest{ext or '.pt'}"


def _log_path(out_path: str) -> str:
    return os.path.splitext(out_path)[0] + ".log.jsonl"


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _describe(record: dict) -> str:
    s = f"epoch {record['epoch']}: loss {record.get('loss_overall', float('nan')):.4f}"
    if "val" in record:
        b = record["val"]
        s += "  " + "  ".join(f"{k} {b[k]:.2f}" for k in ("MR-full-R1@0.5", "MR-full-R1@0.7", "MR-full-mAP",
                                                         "MR-full-mIoU", "HL-min-VeryGood-mAP") if k in b)
    return s


# ------------------------------------------------------------------------------------------------ entry point
def build_run(train_path: str, val_path: str | None, features_dir: str | None, out_path: str, dataset: str,
              config_path: str | None = None, overrides: list[str] = (), llm: str | None = None,
              llm_layers: str | None = None, resume: str | None = None, device: str = "auto",
              provider=None, print_recipe: bool = False) -> Trainer:
    """Everything `vmr train` sets up before the first epoch (tests use it to drive training directly)."""
    dev = resolve_device(device)
    resumed = read_checkpoint(resume) if resume else None
    base = None
    if resumed is not None:
        if resumed.get("dataset") != dataset:
            raise ModelError(f"--resume checkpoint was trained for {resumed.get('dataset')}, not {dataset}")
        base = {"model": resumed["model_config"], "data": resumed["data_config"],
                "train": resumed.get("train_state", {}).get("train_config", {})}
    model_over, data_cfg, train_cfg = build_settings(dataset, config_path, list(overrides), base)
    if llm:
        model_over["llm"] = llm
    if llm_layers:
        model_over["llm_layers"] = llm_layers
    set_seed(train_cfg.seed)

    src = make_provider(features_dir, data_cfg, train_cfg.clip_model or None, provider)
    spec = src.feature_spec()
    if resumed is not None and resumed["feature_spec"] != spec:
        check_feature_spec(resumed["feature_spec"], spec, "the training features")
    if float(spec.get("clip_seconds", data_cfg.clip_length)) != float(data_cfg.clip_length):
        raise ModelError(f"features have {spec['clip_seconds']}-s clips but clip_length is {data_cfg.clip_length} "
                         f"(--set clip_length={spec['clip_seconds']})")
    if hasattr(src, "v_feat_dirs"):
        data_cfg.v_feat_dirs = list(src.v_feat_dirs)
    model_over["txt_dim"] = int(spec["text_dim"])
    model_over["vid_dim"] = int(sum(spec["video_dims"])) + (2 if data_cfg.use_tef else 0)
    model_over["tef_dims"] = 2 if data_cfg.use_tef else 0
    model_over.setdefault("max_q_l", data_cfg.max_q_l)
    model_over.setdefault("max_v_l", data_cfg.max_v_l)

    train_anns = load_annotations(train_path)
    val_anns = load_annotations(val_path) if val_path else None
    for a in val_anns or []:
        if not a.get("relevant_windows"):
            raise ModelError(f"--val {val_path}: qid {a['qid']!r} has no relevant_windows (a test split cannot "
                             f"validate)")
    ratio, why = negative_ratio(train_cfg, dataset, isinstance(src, PublicFeatureDir))
    model_over["relevance_coef"], relevance_why = relevance_weight(model_over, ratio)
    if resumed is not None:
        model, _ = load_checkpoint(resume, device=dev)
        model.train()
    else:
        cfg = ModelConfig().replace(**model_over)
        model = build_model(cfg, llm_weights=True, device=dev)
    train_ds = MomentDataset(train_anns, src, data_cfg, load_labels=True, seed=train_cfg.seed, neg_ratio=ratio,
                             neg_sources=train_cfg.neg_sources)
    model.cfg.extra["negatives"] = {"ratio": ratio, "sources": list(train_ds.negatives.sources)
                                    if train_ds.negatives else []}  # recorded in the checkpoint
    if train_cfg.progress or print_recipe:
        print(describe_negatives(train_ds, ratio, why))
        coef = model.cfg.relevance_coef
        print(f"relevance head: {f'loss weight {coef:g}' if coef > 0 else 'none'} ({relevance_why})")
    criterion = build_criterion(model.cfg).to(dev)
    trainer = Trainer(model, criterion, train_ds, val_anns, src, data_cfg, train_cfg, dataset, spec, out_path, dev)
    if resumed is not None and "train_state" in resumed:
        trainer.restore(resumed["train_state"])
    return trainer


def train_from_cli(train_path: str, val_path: str | None, index_dir: str | None, features_dir: str | None,
                   out_path: str, dataset: str = "qvhighlights", config_path: str | None = None,
                   overrides: list[str] = (), llm: str | None = None, llm_layers: str | None = None,
                   resume: str | None = None, device: str = "auto", provider=None) -> dict:
    """`vmr train`: train on ``train_path`` annotations, keep the best checkpoint at ``out_path``.

    ``provider`` is the feature source the CLI builds for ``--index`` (model/ does not read indexes itself).
    """
    if index_dir is not None and provider is None:
        raise ModelError("--index needs a feature provider from the index; this build of vmr cannot read one here")
    trainer = build_run(train_path, val_path, features_dir, out_path, dataset, config_path, overrides, llm,
                        llm_layers, resume, device, provider, print_recipe=True)
    summary = trainer.fit()
    best = summary["best_score"]
    print(f"trained {summary['epochs']} epochs; best checkpoint {out_path}"
          + (f" (score {best:.2f})" if best is not None else ""))
    return summary
