"""LLMEPET training losses (CG-DETR's, plus the pseudo-event span loss).

Targets (a dict, as the authors' ``prepare_batch_inputs`` builds it):
    span_labels: list of B dicts {"spans": [n_i, 2] normalised (center, width)}
    saliency_pos_labels, saliency_neg_labels: [B, P] clip indices (hinge pairs)
    saliency_all_labels: [B, Lv] per-clip saliency (0 = outside the moment; padded with 0)
    relevant_clips: optional, defaults to saliency_all_labels (> 0 marks the moment's clips)
    negative: optional [B] bool: negative windows (model.data.negatives), the target "no moment here": no span (every
        decoder query is background), saliency 0 on every clip

Negative windows: the span, hinge and moment-token terms need a moment, so they read the positive samples only;
the class term sees every query of a negative as background; the saliency gets an absolute term on both kinds
(``loss_saliency``: sigmoid(saliency) pushed to 0 on a negative's clips and to 1 on a positive's moment clips,
the same on the clip-to-word attention), which makes saliency comparable across windows and videos.

Loss terms (``weight_dict`` weights them; aux_outputs add span/label terms per earlier decoder layer, "_i"):
    loss_span, loss_giou     matched span L1 and 1 - GIoU
    loss_label               foreground / background CE (background weight eos_coef)
    loss_saliency            hinge + rank-contrastive on saliency scores, negative-pair term, and the same on
                             the clip-to-word attention (+ BCE), weighted lw_wattn
    loss_ms_align            moment/non-moment token vs sentence/dummy-sentence contrast + clip classification
    loss_distill             clip-to-word attention distilled from moment-frame/word similarity
    loss_orthogonal_dummy    dummy tokens and saliency prompts kept mutually orthogonal
    loss_event_span, loss_event_giou   event head vs pseudo-events (pseudo-event regulation; cfg.event_loss)
    loss_relevance           the relevance head (cfg.relevance_coef > 0): BCE towards 1 on moment clips, 0 on every
                             other clip (negative windows' too); the two kinds averaged apart, then summed

Not implemented: the authors' "pos" loss. It compares the fixed sine position encodings of clips inside each
pseudo-event; no parameter receives a gradient from it, so it cannot change training (and their released code
never adds it to the loss list either).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.training.matcher import HungarianMatcher, Indices
from model.spans import generalized_temporal_iou, span_cxw_to_xx

FOREGROUND, BACKGROUND = 0, 1
RANK_TAU = 0.5
PAD_SCORE = -1e3


def _src_index(indices: Indices):
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


def rank_contrastive(scores, labels, valid):
    """CG-DETR's rank-wise contrast: for each saliency level r = 1..11, clips with label >= r are positives
    against all others in a softmax over the (padded-out) clips. scores / labels / valid [N, L]."""
    total = scores.new_zeros(())
    keep = ~(labels > 100)  # CG-DETR's "drop" of very high ranks; never active for real labels
    for r in range(1, 12):
        positive = labels >= r
        if not bool(positive.any()):
            continue
        has_positive = positive.sum(1) > 0
        logits = scores * keep / RANK_TAU + ~keep * PAD_SCORE
        logits = logits - logits.max(1, keepdim=True)[0]
        log_prob = logits - torch.log(logits.exp().sum(1, keepdim=True) + 1e-6)
        mean_pos = (positive * log_prob * valid).sum(1) / (positive.sum(1) + 1e-6)
        total = total + (-mean_pos * has_positive).mean()
    return total / 12


def _masked(scores, valid):
    return valid * scores + (1.0 - valid) * PAD_SCORE


def _positive_rows(targets: dict, b: int, device) -> torch.Tensor:
    """[B] bool: samples that hold a moment (all, unless the batch has negative windows)."""
    negative = targets.get("negative")
    return torch.ones(b, dtype=torch.bool, device=device) if negative is None else ~negative.to(device).bool()


def match(matcher: HungarianMatcher, pred_spans, target_spans: list, pred_logits=None) -> Indices:
    """The matcher's indices; a batch of negative windows only has no target to match (empty indices)."""
    if sum(len(t) for t in target_spans) == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return [(empty, empty) for _ in target_spans]
    return matcher(pred_spans, target_spans, pred_logits)


def _absolute_saliency(scores, attn, labels, valid, positive):
    """Absolute saliency targets, used when the batch holds negative windows: sigmoid(score) -> 0 on every clip
    of a negative window, -> 1 on the moment clips of a positive one (the same on the clip-to-word attention,
    already in [0, 1]). BCE averaged over those clips, then over samples: a long window weighs as a short one."""
    def mean_bce(bce, mask):
        return ((bce * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()

    moment = (labels > 0).float() * valid
    neg_rows = ~positive
    loss = scores.new_zeros(())
    loss_attn = scores.new_zeros(())
    if bool(neg_rows.any()):
        loss = loss + mean_bce(F.softplus(scores[neg_rows]), valid[neg_rows])
        loss_attn = loss_attn + mean_bce(-torch.log((1.0 - attn[neg_rows]).clamp(min=1e-6)), valid[neg_rows])
    if bool(positive.any()):
        loss = loss + mean_bce(F.softplus(-scores[positive]), moment[positive])
        loss_attn = loss_attn + mean_bce(-torch.log(attn[positive].clamp(min=1e-6)), moment[positive])
    return loss, loss_attn


def _hinge(scores, pos_idx, neg_idx, margin):
    if len(scores) == 0:
        return scores.new_zeros(())
    rows = torch.arange(len(scores), device=scores.device)[:, None]
    pos, neg = scores[rows, pos_idx], scores[rows, neg_idx]
    return (margin + neg - pos).clamp(min=0).sum() / (len(scores) * pos_idx.shape[1]) * 2


class SetCriterion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.matcher = HungarianMatcher(cfg.set_cost_class, cfg.set_cost_span, cfg.set_cost_giou)
        self.event_matcher = HungarianMatcher(0.0, cfg.set_cost_span, cfg.set_cost_giou)
        self.losses = ["spans", "labels", "saliency", "ms_align", "distill", "orthogonal_dummy"]
        if cfg.contrastive_align_loss:
            self.losses.append("contrastive_align")
        if cfg.event_loss:
            self.losses.append("event_spans")
        self.aux_losses = ["spans", "labels"] + (["contrastive_align"] if cfg.contrastive_align_loss else [])
        self.weight_dict = build_weight_dict(cfg)
        class_weight = torch.ones(2)
        class_weight[BACKGROUND] = cfg.eos_coef
        self.register_buffer("class_weight", class_weight)

    # --- moments ------------------------------------------------------------------------------------------
    def loss_spans(self, outputs, targets, indices):
        idx = _src_index(indices)
        src = outputs["pred_spans"][idx]
        if len(src) == 0:  # negative windows only: nothing to regress (zero, still in the graph)
            zero = outputs["pred_spans"].sum() * 0
            return {"loss_span": zero, "loss_giou": zero}
        tgt = torch.cat([t["spans"][j] for t, (_, j) in zip(targets["span_labels"], indices)]).to(src)
        giou = torch.diag(generalized_temporal_iou(span_cxw_to_xx(src), span_cxw_to_xx(tgt)))
        return {"loss_span": F.l1_loss(src, tgt, reduction="none").mean(), "loss_giou": (1 - giou).mean()}

    def loss_labels(self, outputs, targets, indices):
        logits = outputs["pred_logits"]  # [B, Q, 2]
        idx = _src_index(indices)
        classes = torch.full(logits.shape[:2], BACKGROUND, dtype=torch.int64, device=logits.device)
        classes[idx] = FOREGROUND
        loss = F.cross_entropy(logits.transpose(1, 2), classes, self.class_weight, reduction="none").mean()
        matched = logits[idx]
        with torch.no_grad():
            acc = (matched.argmax(-1) == FOREGROUND).float().mean() * 100 if len(matched) else logits.new_tensor(0.)
        return {"loss_label": loss, "class_error": 100 - acc}

    def loss_contrastive_align(self, outputs, targets, indices):
        logits = torch.einsum("bmd,bnd->bmn", outputs["proj_queries"], outputs["proj_txt_mem"]).sum(2) \
            / self.cfg.temperature  # [B, Q]
        positive = torch.zeros_like(logits, dtype=torch.bool)
        positive[_src_index(indices)] = True
        pos_term = logits.masked_fill(~positive, 0).sum(1)
        has = positive.sum(1) > 0  # negative windows have no matched query to align
        if not bool(has.any()):
            return {"loss_contrastive_align": logits.sum() * 0}
        loss = -pos_term[has] / positive.sum(1)[has] + logits[has].logsumexp(1)
        return {"loss_contrastive_align": loss.mean()}

    def loss_event_spans(self, outputs, targets, indices):
        """Event head vs pseudo-events (indices from the event matcher)."""
        idx = _src_index(indices)
        src = outputs["pred_event_spans"][idx]
        tgt = torch.cat([t[j] for t, (_, j) in zip(outputs["pseudo_event_spans"], indices)]).to(src)
        giou = torch.diag(generalized_temporal_iou(span_cxw_to_xx(src), span_cxw_to_xx(tgt)))
        return {"loss_event_span": F.l1_loss(src, tgt, reduction="none").mean(),
                "loss_event_giou": (1 - giou).mean()}

    # --- saliency -----------------------------------------------------------------------------------------
    def loss_saliency(self, outputs, targets, indices):
        if "saliency_pos_labels" not in targets:
            return {"loss_saliency": 0}
        cfg = self.cfg
        valid = outputs["video_mask"].float()
        labels = targets["saliency_all_labels"]
        pos_idx, neg_idx = targets["saliency_pos_labels"], targets["saliency_neg_labels"]
        scores, attn = outputs["saliency_scores"], outputs["t2vattnvalues"]
        scores_neg, attn_neg = outputs["saliency_scores_neg"], outputs["t2vattnvalues_neg"]
        positive = _positive_rows(targets, len(scores), scores.device)
        absolute = 0.0
        if "negative" in targets and not bool(positive.all()):
            abs_scores, abs_attn = _absolute_saliency(scores, attn, labels, valid, positive)
            absolute = abs_scores + cfg.lw_wattn * abs_attn

        def hinge(s):  # the hinge pairs are clips of a moment: positive samples only
            return _hinge(s[positive], pos_idx[positive], neg_idx[positive], cfg.saliency_margin)

        if scores_neg is None:  # no negative pass (batch of one, or one source video)
            loss = hinge(scores) + rank_contrastive(_masked(scores, valid), labels, valid)
            loss_attn = rank_contrastive(_masked(attn, valid), labels, valid) \
                + F.binary_cross_entropy(attn.reshape(-1), labels.clamp(0, 1).reshape(-1)) + hinge(attn)
            return {"loss_saliency": loss + cfg.lw_wattn * loss_attn + absolute}

        real = outputs["real_neg_mask"]
        valid_real = valid[real]
        valid_pair = valid_real.repeat(1, 2)
        labels_pair = torch.cat([labels[real], torch.zeros_like(labels)[real]], dim=1)

        def paired(s, s_neg):  # each video's clips with its own sentence, then with the other sentence
            return _masked(torch.cat([s[real], s_neg], dim=1), valid_pair)

        neg_pair = (-torch.log(1.0 - torch.sigmoid(scores_neg)) * valid_real).sum(1).mean()
        rank = rank_contrastive(paired(scores, scores_neg), labels_pair, valid_pair)
        false_neg = ~real
        # Pairs of one source video are contrasted without a negative. With exactly one such sample the
        # authors' code gains an extra axis and the term vanishes (softmax over a singleton); kept as zero.
        if int(false_neg.sum()) > 1:
            rank = rank + rank_contrastive(_masked(scores[false_neg], valid[false_neg]), labels[false_neg],
                                           valid[false_neg])
        loss = hinge(scores) + rank + neg_pair

        # The same on the clip-to-word attention (their false-negative attention term is added to a variable
        # that is not read afterwards, so it does not count; neither does it here).
        neg_pair_attn = (-torch.log(1.0 - attn_neg) * valid_real).sum(1).mean()
        loss_attn = rank_contrastive(paired(attn, attn_neg), labels_pair, valid_pair) \
            + F.binary_cross_entropy(attn.reshape(-1), labels.clamp(0, 1).reshape(-1)) \
            + neg_pair_attn + hinge(attn)
        return {"loss_saliency": loss + cfg.lw_wattn * loss_attn + absolute}

    # --- CG-DETR token losses -----------------------------------------------------------------------------
    def loss_ms_align(self, outputs, targets, indices):
        if outputs.get("memory_moment") is None:
            return {"loss_ms_align": 0.0}
        # the moment token of a negative window has no moment: the contrast reads the positive samples only
        positive = _positive_rows(targets, outputs["memory_moment"].shape[0], outputs["memory_moment"].device)
        moment = F.normalize(outputs["memory_moment"][positive], dim=1)
        nmoment = F.normalize(outputs["nmmemory_moment"][positive], dim=1)
        sentence = F.normalize(outputs["sentence_txt"][positive], dim=1)
        dummy = F.normalize(outputs["sentence_dummy"][positive], dim=1)
        b = moment.shape[0]
        if b == 0:
            return {"loss_ms_align": outputs["memory_moment"].sum() * 0}
        eye = torch.eye(b, device=moment.device)
        # moment token of video i matches sentence i, against all non-moment tokens
        sim = torch.cat([moment @ sentence.T, nmoment @ sentence.T], dim=1)  # [B, 2B]
        loss = F.cross_entropy(sim, torch.cat([eye, torch.zeros_like(eye)], 1).argmax(1))
        # against the dummy sentence, the target is the first other sample (or the first non-moment token)
        dsim = torch.cat([moment @ dummy.T, nmoment @ dummy.T], dim=1)
        loss = loss + F.cross_entropy(dsim, torch.cat([1 - eye, torch.ones_like(eye)], 1).argmax(1))
        # the moment token classifies the clips that belong to the moment
        relevant = targets.get("relevant_clips", targets["saliency_all_labels"]).clamp(0, 1)
        clip_logit = torch.sigmoid(outputs["memory_moment"][:, None] @ outputs["src_vid"].transpose(1, 2))
        clip_bce = F.binary_cross_entropy(clip_logit.reshape(-1), relevant.reshape(-1).float(), reduction="none")
        return {"loss_ms_align": loss + (clip_bce * outputs["video_mask"].reshape(-1)).mean()}

    def loss_distill(self, outputs, targets, indices):
        if outputs.get("moment2txt_similarity") is None:
            return {"loss_distill": 0.0}
        attn = outputs["cate_attn_weights"]  # [B, Lv, Nd+Lt]
        b, lv, _ = attn.shape
        teacher = outputs["moment2txt_similarity"].softmax(-1).detach().reshape(b * lv, -1)
        kl = F.kl_div(torch.log(attn + 1e-6).reshape(b * lv, -1), teacher, reduction="none").mean(1)
        moment = outputs["moment_mask"].int().reshape(-1)
        # (a batch without any moment clip would divide by zero in the authors' code; clamped here)
        return {"loss_distill": (kl * moment).sum() / moment.sum().clamp(min=1)}

    def loss_orthogonal_dummy(self, outputs, targets, indices):
        def off_diagonal_similarity(x):  # x [..., N, D]; gradient only through the left factor
            xn = x / x.norm(dim=-1, keepdim=True)
            sim = xn @ xn.transpose(-1, -2).detach()
            return (sim * (1 - torch.eye(x.shape[-2], device=x.device))).abs().mean()

        dummies = outputs["dummy_tokens"]  # [B, Nd, D]
        loss = off_diagonal_similarity(dummies) if dummies.shape[1] != 1 else 0.0
        return {"loss_orthogonal_dummy": loss + off_diagonal_similarity(outputs["global_rep_tokens"])}

    # ------------------------------------------------------------------------------------------------------
    def forward(self, outputs: dict, targets: dict) -> dict:
        """Returns the unweighted loss terms (and class_error); weight with ``weight_dict`` (``total``)."""
        # Losses in fp32 outside autocast: BCE is not autocast-safe, and bf16 outputs must meet fp32 targets.
        outputs = _to_float32(outputs)
        device_type = outputs["pred_spans"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self._losses(outputs, targets)

    def _losses(self, outputs: dict, targets: dict) -> dict:
        loss_fns = {"spans": self.loss_spans, "labels": self.loss_labels, "saliency": self.loss_saliency,
                    "ms_align": self.loss_ms_align, "distill": self.loss_distill,
                    "orthogonal_dummy": self.loss_orthogonal_dummy, "event_spans": self.loss_event_spans,
                    "contrastive_align": self.loss_contrastive_align}
        if self.cfg.saliency_loss_only:  # highlight-only data: no spans to match
            return self.loss_saliency(outputs, targets, None)
        target_spans = [t["spans"] for t in targets["span_labels"]]
        indices = match(self.matcher, outputs["pred_spans"], target_spans, outputs["pred_logits"])
        losses = {}
        for name in self.losses:
            if name == "event_spans":
                event_indices = self.event_matcher(outputs["pred_event_spans"], outputs["pseudo_event_spans"])
                losses.update(self.loss_event_spans(outputs, targets, event_indices))
            else:
                losses.update(loss_fns[name](outputs, targets, indices))
        if "relevance_scores" in outputs:
            moment = targets.get("relevant_clips", targets["saliency_all_labels"])
            losses["loss_relevance"] = relevance_loss(outputs["relevance_scores"], moment, outputs["video_mask"])
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = match(self.matcher, aux["pred_spans"], target_spans, aux["pred_logits"])
            for name in self.aux_losses:
                losses.update({f"{k}_{i}": v for k, v in loss_fns[name](aux, targets, aux_indices).items()})
        return losses

    def total(self, losses: dict) -> torch.Tensor:
        """Weighted sum of the terms that have a weight."""
        return sum(losses[k] * self.weight_dict[k] for k in losses if k in self.weight_dict)


def relevance_loss(logits, labels, valid) -> torch.Tensor:
    """BCE of the relevance logits [B, Lv]: -> 1 on moment clips (labels > 0), -> 0 on the other valid clips. Each
    kind is averaged over its clips per window, then over the windows that have such clips, so a short moment in
    a long window weighs as much as the rest of it and negative windows (no moment clip) count on the 0 side."""
    valid = valid.float()
    moment = (labels > 0).float() * valid
    other = valid - moment

    def side(bce, mask):
        has = mask.sum(1) > 0
        if not bool(has.any()):
            return bce.new_zeros(())
        return ((bce * mask).sum(1)[has] / mask.sum(1)[has]).mean()

    return side(F.softplus(-logits), moment) + side(F.softplus(logits), other)


def _to_float32(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_float32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float32(v) for v in x)
    return x


def build_weight_dict(cfg: ModelConfig) -> dict:
    w = {"loss_span": cfg.span_loss_coef, "loss_giou": cfg.giou_loss_coef, "loss_label": cfg.label_loss_coef,
         "loss_saliency": cfg.lw_saliency, "loss_ms_align": cfg.lw_ms_align, "loss_distill": cfg.lw_distill,
         "loss_orthogonal_dummy": cfg.lw_distill,  # the authors weight it with lw_distill
         "loss_event_span": cfg.event_coef * cfg.span_loss_coef,
         "loss_event_giou": cfg.event_coef * cfg.giou_loss_coef}
    if cfg.relevance_coef > 0:
        w["loss_relevance"] = cfg.relevance_coef
    if cfg.contrastive_align_loss:
        w["loss_contrastive_align"] = cfg.contrastive_align_loss_coef
    if cfg.aux_loss:
        for i in range(cfg.dec_layers - 1):
            w.update({f"{k}_{i}": v for k, v in list(w.items())
                      if k in ("loss_span", "loss_giou", "loss_label", "loss_contrastive_align")})
    return w


def build_criterion(cfg: ModelConfig) -> SetCriterion:
    return SetCriterion(cfg)
