"""LLMEPET: CG-DETR with frozen LLaMA blocks in its fusion path and pseudo-event regulation (arXiv 2407.15051).

Data flow of ``LLMEPET.forward`` (B videos, Lv clips, Lt words, Nd dummy tokens, Q span queries, D hidden):

  clips [B,Lv,Dv] --proj--> vid;   words [B,Lt,Dt] --proj--> txt
  dummy tokens + txt --dummy_encoder--> sentence-aware dummies (attention sinks for unrelated clips)
  vid attends to [dummies; txt] --t2v_encoder--> vid'  (+ clip-to-word attention, the "t2v" saliency)
  saliency token = top-k learned prompts by attention-weighted similarity + mean clip  --t2v (no keys)-->
  [saliency token; vid'] --encoder--> --LLM blocks--> memory; memory_local = clips + global token
  learned (center, width) anchors --decoder over memory_local--> span / class heads; event head on layer 0
  saliency score = <proj(clip memory), proj(global token)> / sqrt(D)

Training-only parts: the moment / non-moment token encoders, the sentence token encoder (for the CG-DETR
contrastive and distillation losses), the "negative" pass (each sentence paired with the next sample's video)
and pseudo-events. Predictions never use them; ``forward`` runs them only when it gets ``targets`` (and the
negative pass only in training mode, or when ``negative_pass=True``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.errors import ModelError
from model.net.llm_blocks import LLMBlocks, load_llm_layers
from model.net.transformer import (MLP, ClipSinePosition, Decoder, Encoder, EncoderLayer, T2VEncoder, T2VLayer,
                                   TextPositionTable, inverse_sigmoid)
from model.pseudo_events import pseudo_event_spans_cxw


class InputProjection(nn.Module):
    """LayerNorm -> Dropout -> Linear (-> ReLU)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, relu: bool):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, out_dim)
        self.relu = relu

    def forward(self, x):
        x = self.linear(self.dropout(self.norm(x)))
        return F.relu(x) if self.relu else x


def _projection_stack(in_dim: int, cfg: ModelConfig) -> nn.Sequential:
    dims = [in_dim] + [cfg.hidden_dim] * cfg.n_input_proj
    return nn.Sequential(*(InputProjection(dims[i], dims[i + 1], cfg.input_dropout, relu=i < cfg.n_input_proj - 1)
                           for i in range(cfg.n_input_proj)))


class RelevanceHead(nn.Module):
    """How well each clip matches the sentence: a learned bilinear match between the sentence's last token (where
    CLIP pools a sentence) and each clip's features, read from the inputs, beside the fusion path. Trained
    (model.training.criterion, loss_relevance) towards 1 on the moment's clips and 0 on every other clip, those of
    negative windows included, so its values compare across windows and videos: the reranker's ranking score.

    forward(src_txt [Bt, Lt, Dt], txt_valid [Bt, Lt] bool, clips [B, Lv, Dv] (no TEF)) -> logits [B, Lv];
    Bt is B or 1 (one sentence for every window)."""

    def __init__(self, txt_dim: int, vid_dim: int, dim: int):
        super().__init__()
        self.txt = nn.Linear(txt_dim, dim)
        self.vid = nn.Linear(vid_dim, dim)
        # cosine -> logit: a temperature and an offset (start: cosine 0.5 is even odds)
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.tensor(-5.0))

    def forward(self, src_txt, txt_valid, clips):
        last = txt_valid.sum(1).clamp(min=1) - 1  # valid words come first
        sentence = F.normalize(self.txt(src_txt[torch.arange(len(src_txt), device=src_txt.device), last]), dim=-1)
        per_clip = F.normalize(self.vid(clips), dim=-1)  # [B, Lv, R]
        return self.scale * (per_clip * sentence[:, None]).sum(-1) + self.bias


def source_video_ids(vids: list[str], has_window_suffix: bool) -> list[str]:
    """The video each sample comes from: QVHighlights vids "<id>_<start>_<end>" lose the window suffix."""
    if not has_window_suffix:
        return list(vids)
    out = []
    for v in vids:
        parts = v.split("_")
        out.append("_".join(parts[:max(1, len(parts) - 2)]))
    return out


def _seq_first(x):
    return x.transpose(0, 1)


class LLMEPET(nn.Module):
    def __init__(self, cfg: ModelConfig, llm_blocks_on_meta: bool = False):
        """``llm_blocks_on_meta``: allocate no storage for the LLM blocks (the caller assigns loaded weights)."""
        super().__init__()
        self.cfg = cfg
        d, nd = cfg.hidden_dim, cfg.num_dummies
        self.vid_proj = _projection_stack(cfg.vid_dim, cfg)
        self.txt_proj = _projection_stack(cfg.txt_dim, cfg)
        self.token_type = nn.Embedding(2, d)  # 0: word, 1: clip
        nn.init.normal_(self.token_type.weight, std=0.02)
        self.vid_pos = ClipSinePosition(d)
        self.relevance = RelevanceHead(cfg.txt_dim, cfg.vid_dim - cfg.tef_dims, cfg.relevance_dim) \
            if cfg.relevance_coef > 0 else None
        self.txt_pos = TextPositionTable(cfg.max_q_l if cfg.max_q_l > 0 else 100, d, cfg.input_dropout)

        # learned tokens
        self.dummy_tokens = nn.Parameter(torch.randn(nd, d))
        self.dummy_pos = nn.Parameter(torch.randn(nd, d))
        self.sentence_token = nn.Parameter(torch.randn(d))
        self.sentence_pos = nn.Parameter(torch.randn(d))
        self.moment_token = nn.Parameter(torch.randn(d))
        self.moment_pos = nn.Parameter(torch.randn(d))
        self.saliency_prompts = nn.Parameter(torch.randn(cfg.total_prompts, d))
        self.saliency_pos = nn.Parameter(torch.randn(1, d))

        def encoder(n, heads=cfg.nheads):
            return Encoder(EncoderLayer(d, heads, cfg.dim_feedforward, cfg.dropout), n)

        self.dummy_encoder = encoder(cfg.dummy_layers, cfg.text_encoder_heads)
        self.sentence_encoder = encoder(cfg.sent_layers, cfg.text_encoder_heads)
        self.moment_encoder = encoder(cfg.moment_layers)
        self.t2v_encoder = T2VEncoder(T2VLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, nd), cfg.t2v_layers,
                                      cross_sample_mask=cfg.t2v_cross_sample_mask)
        self.encoder = encoder(cfg.enc_layers)
        self.decoder = Decoder(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.dec_layers)
        for module in (self.moment_encoder, self.t2v_encoder, self.encoder, self.decoder):
            for p in module.parameters():  # the authors' Transformer init
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.llm = LLMBlocks(d, cfg.llm_dim, cfg.n_llm_layers, cfg.llm_heads, cfg.llm_kv_heads, cfg.llm_ffn_dim,
                             cfg.llm_norm_eps, attention=cfg.llm_attention, head_dim=cfg.llm_head_dim or None,
                             blocks_on_meta=llm_blocks_on_meta)

        # heads
        self.query_anchors = nn.Embedding(cfg.num_queries, 2)  # (center, width) before sigmoid
        self.class_head = nn.Linear(d, 2)  # 0: foreground, 1: background
        self.span_head = MLP(d, d, 2, 3)
        self.event_head = MLP(d, d, 2, 3)
        nn.init.zeros_(self.event_head.layers[-1].weight)
        nn.init.zeros_(self.event_head.layers[-1].bias)
        self.saliency_proj_clip = nn.Linear(d, d)
        self.saliency_proj_global = nn.Linear(d, d)
        if cfg.contrastive_align_loss:
            self.align_proj_query = nn.Linear(d, cfg.contrastive_hdim)
            self.align_proj_txt = nn.Linear(d, cfg.contrastive_hdim)
            self.align_proj_vid = nn.Linear(d, cfg.contrastive_hdim)

    # ------------------------------------------------------------------------------------------------------
    def _fuse(self, vid, vid_valid, vid_pos, keys, keys_valid, keys_pos, ctx, decode=True):
        """T2V -> saliency token -> encoder -> LLM blocks (-> decoder). Batch-first inputs:
        vid / vid_pos [B,Lv,D], vid_valid [B,Lv], keys / keys_pos [B,Nd+Lt,D], keys_valid [B,Nd+Lt], ctx [B,D].

        Returns dict: memory_local [B,Lv,D], memory_global [B,D], t2v_attn [B,Lv,Nd+Lt] and, if ``decode``,
        hs [layers,B,Q,D], references [layers,B,Q,2].
        """
        cfg = self.cfg
        b, lv, _ = vid.shape
        v, pv = _seq_first(vid), _seq_first(vid_pos)
        vid_pad = ~vid_valid
        v_t2v, attn = self.t2v_encoder(v, _seq_first(keys), pv, _seq_first(keys_pos), vid_pad, ~keys_valid)

        # Saliency token: prompts weighted by their similarity to (clip - mean clip), each clip weighted by how
        # much of its attention goes to real words; top-k prompts summed, plus the mean clip.
        sim = torch.softmax(F.normalize(vid - ctx[:, None], dim=2) @ F.normalize(self.saliency_prompts, dim=1).T,
                            dim=-1)  # [B, Lv, P]
        importance = attn[:, :, cfg.num_dummies:].sum(2).detach() * vid_valid
        importance = importance / importance.sum(1, keepdim=True) * lv
        sim = (sim * importance[:, :, None]).mean(1)  # [B, P]
        top_val, top_idx = sim.topk(cfg.num_prompts, dim=1)
        token = (top_val[:, :, None] * self.saliency_prompts[top_idx]).sum(1) + ctx  # [B, D]
        token = self.t2v_encoder.forward_without_keys(token[None])  # [1, B, D]

        src = torch.cat([token, v_t2v], dim=0)  # [1+Lv, B, D]
        pad = torch.cat([vid_pad.new_zeros(b, 1), vid_pad], dim=1)
        pos = torch.cat([self.saliency_pos[None].expand(1, b, -1), pv], dim=0)
        memory = self.llm(self.encoder(src, pad, pos), pad)
        memory_global = memory[0]
        memory_local = memory[1:] + memory_global[None]
        out = dict(memory_local=_seq_first(memory_local), memory_global=memory_global, t2v_attn=attn)
        if decode:
            anchors = self.query_anchors.weight[:, None].expand(-1, b, -1)
            out["hs"], out["references"] = self.decoder(memory_local, vid_pad, pv, anchors)
        return out

    def _saliency(self, memory_local, memory_global):
        return (self.saliency_proj_clip(memory_local) * self.saliency_proj_global(memory_global)[:, None]).sum(-1) \
            / math.sqrt(self.cfg.hidden_dim)

    def forward(self, src_txt, src_txt_mask, src_vid, src_vid_mask, targets=None, vid=None, negative_pass=None):
        """
        Args:
            src_txt [B, Lt, Dt], src_txt_mask [B, Lt] (1 = valid word); or [1, Lt, Dt], [1, Lt]: one sentence for
                all B videos, its text side (projection, dummy encoder) computed once and shared
            src_vid [B, Lv, Dv] (features + TEF), src_vid_mask [B, Lv] (1 = valid clip; valid clips first)
            targets: training targets (see criterion.SetCriterion); their ``relevant_clips`` (or
                ``saliency_all_labels``) [B, Lv] > 0 marks the moment's clips for the moment-token encoders.
            vid: list of B video ids; needed for the negative pass (samples of the same source video are not
                negatives of each other).
            negative_pass: run the shuffled-pair pass; default: in training mode when ``targets`` and ``vid``.
        Returns dict:
            pred_logits [B, Q, 2], pred_spans [B, Q, 2] (normalised center, width), saliency_scores [B, Lv],
            pred_event_spans [B, Q, 2], t2vattnvalues [B, Lv], relevance_scores [B, Lv] (logits; with the relevance
            head), aux_outputs (per earlier decoder layer:
            pred_logits, pred_spans), video_mask [B, Lv]; with targets also the CG-DETR training tensors and
            pseudo_event_spans (list of [K_i, 2]); with the negative pass saliency_scores_neg, t2vattnvalues_neg,
            real_neg_mask.
        """
        cfg = self.cfg
        nd = cfg.num_dummies
        b, bt = src_vid.shape[0], src_txt.shape[0]
        if bt not in (1, b):
            raise ModelError(f"{bt} sentences for {b} videos: give one per video, or one for all")
        vid_valid, txt_valid = src_vid_mask.bool(), src_txt_mask.bool()
        vid_feat = self.vid_proj(src_vid) + self.token_type.weight[1]
        txt = self.txt_proj(src_txt) + self.token_type.weight[0]
        vid_pos = self.vid_pos(src_vid_mask)
        txt_pos = self.txt_pos(txt) if cfg.use_txt_pos else torch.zeros_like(txt)

        # Dummy tokens read the sentence first, so what they absorb depends on it.
        dummies = self.dummy_tokens[None].expand(bt, -1, -1)
        dummy_pos = self.dummy_pos[None].expand(bt, -1, -1)
        dummy_valid = txt_valid.new_ones(bt, nd)
        encoded = self.dummy_encoder(_seq_first(torch.cat([dummies, txt], 1)),
                                     ~torch.cat([dummy_valid, txt_valid], 1),
                                     _seq_first(torch.cat([dummy_pos, txt_pos], 1)))
        dummy_ctx = _seq_first(encoded[:nd])  # [Bt, Nd, D]
        if bt < b:  # one sentence for every video (a rerank call): its text side ran once, shared by all
            txt, txt_valid, txt_pos, dummy_ctx, dummy_pos, dummy_valid = (
                t.expand(b, *t.shape[1:]) for t in (txt, txt_valid, txt_pos, dummy_ctx, dummy_pos, dummy_valid))
        keys = torch.cat([dummy_ctx, txt], 1)
        keys_valid = torch.cat([dummy_valid, txt_valid], 1)
        keys_pos = torch.cat([dummy_pos, txt_pos], 1)

        n_valid = vid_valid.sum(1, keepdim=True)
        ctx = ((vid_feat * vid_valid[:, :, None]).sum(1) / n_valid).detach()  # mean valid clip [B, D]

        fused = self._fuse(vid_feat, vid_valid, vid_pos, keys, keys_valid, keys_pos, ctx)
        hs, references = fused["hs"], fused["references"]
        logits = self.class_head(hs)
        spans = (self.span_head(hs) + inverse_sigmoid(references)).sigmoid()
        attn = fused["t2v_attn"]
        out = dict(
            pred_logits=logits[-1], pred_spans=spans[-1],
            pred_event_spans=self.event_head(hs[0]).sigmoid(),
            saliency_scores=self._saliency(fused["memory_local"], fused["memory_global"]),
            t2vattnvalues=(attn[:, :, nd:] * txt_valid[:, None]).sum(2).clamp(0, 1),
            cate_attn_weights=attn, txt_mask=keys_valid, dummy_tokens=dummy_ctx,
            global_rep_tokens=self.saliency_prompts, video_mask=src_vid_mask,
            aux_outputs=[dict(pred_logits=a, pred_spans=s) for a, s in zip(logits[:-1], spans[:-1])],
        )
        if self.relevance is not None:
            clips = src_vid[..., :src_vid.shape[-1] - cfg.tef_dims]  # the features without TEF: no position cue
            out["relevance_scores"] = self.relevance(src_txt, txt_valid, clips)
        if cfg.contrastive_align_loss:
            # the encoder memory keeps no word tokens, so the text side is empty (as in the authors' code)
            out["proj_queries"] = F.normalize(self.align_proj_query(hs[-1]), dim=-1)
            out["proj_txt_mem"] = F.normalize(self.align_proj_txt(fused["memory_local"][:, :0]), dim=-1)
            out["proj_vid_mem"] = F.normalize(self.align_proj_vid(fused["memory_local"]), dim=-1)
            for i, aux in enumerate(out["aux_outputs"]):
                aux.update(proj_queries=F.normalize(self.align_proj_query(hs[i]), dim=-1),
                           proj_txt_mem=out["proj_txt_mem"])

        if targets is not None:
            out.update(self._training_tensors(targets, vid_feat, vid_valid, vid_pos, txt, txt_valid, txt_pos,
                                              dummy_ctx, dummy_pos))
            event_source = vid_feat if cfg.pseudo_events_from == "projected" \
                else src_vid[..., :src_vid.shape[-1] - cfg.tef_dims]
            out["pseudo_event_spans"] = self.pseudo_events(event_source, vid_valid)
        if negative_pass is None:
            negative_pass = self.training and targets is not None
        out.update(saliency_scores_neg=None, t2vattnvalues_neg=None, real_neg_mask=None)
        if negative_pass and vid is not None:
            out.update(self._negative_pass(vid, vid_feat, vid_valid, vid_pos, keys, keys_valid, keys_pos, ctx))
        return out

    def _training_tensors(self, targets, vid, vid_valid, vid_pos, txt, txt_valid, txt_pos, dummy_ctx, dummy_pos):
        """Moment / non-moment token encodings and sentence tokens (CG-DETR training inputs)."""
        b, nd = vid.shape[0], self.cfg.num_dummies
        relevant = targets.get("relevant_clips", targets.get("saliency_all_labels"))
        moment_mask = relevant.clamp(0, 1).bool()  # [B, Lv]
        one = vid_valid.new_ones(b, 1)

        def with_token(token, pos, x, x_pos, valid, encoder):
            enc = encoder(_seq_first(torch.cat([token.expand(b, 1, -1), x], 1)), ~torch.cat([one, valid], 1),
                          _seq_first(torch.cat([pos.expand(b, 1, -1), x_pos], 1)))
            return enc[0], enc[1:]  # [B, D], [L, B, D]

        sentence_txt, words = with_token(self.sentence_token, self.sentence_pos, txt, txt_pos, txt_valid,
                                         self.sentence_encoder)
        sentence_dummy, dummy_words = with_token(self.sentence_token, self.sentence_pos, dummy_ctx, dummy_pos,
                                                 one.expand(b, nd), self.sentence_encoder)
        memory_moment, moment_frames = with_token(self.moment_token, self.moment_pos, vid, vid_pos,
                                                  vid_valid & moment_mask, self.moment_encoder)
        nmemory_moment, nmoment_frames = with_token(self.moment_token, self.moment_pos, vid, vid_pos,
                                                    vid_valid & ~moment_mask, self.moment_encoder)
        word_memory = torch.cat([dummy_words, words], 0).permute(1, 2, 0)  # [B, D, Nd+Lt]
        moment_frames, nmoment_frames = _seq_first(moment_frames), _seq_first(nmoment_frames)
        return dict(
            memory_moment=memory_moment, nmmemory_moment=nmemory_moment,
            sentence_txt=sentence_txt, sentence_dummy=sentence_dummy,
            moment2txt_similarity=moment_frames @ word_memory, nmoment2txt_similarity=nmoment_frames @ word_memory,
            moment_mask=moment_mask,
            src_vid=torch.where(moment_mask[:, :, None], moment_frames, nmoment_frames),
        )

    @staticmethod
    @torch.no_grad()
    def pseudo_events(feats, valid):
        """Pseudo-event targets [K_i, 2] (normalised center, width) per video, on its valid clips only.

        (The authors run one batched search whose boundary pairing wraps across videos - a negative-width span
        when the batch size is odd - and whose threshold and novelty include the padding.)
        feats [B, Lv, D], valid [B, Lv] -> list of B tensors.
        """
        feats = feats.detach().float()
        return [pseudo_event_spans_cxw(feats[i, :int(n)]) for i, n in enumerate(valid.sum(1))]

    def _negative_pass(self, vids, vid, vid_valid, vid_pos, keys, keys_valid, keys_pos, ctx):
        """Each video with the NEXT sample's sentence (skipping pairs from one source video): saliency
        and clip-to-word attention that the saliency losses push towards 'irrelevant'."""
        src = source_video_ids(vids, self.cfg.vid_has_window_suffix)
        shifted = src[1:] + src[:1]
        real = torch.tensor([a != c for a, c in zip(src, shifted)], device=vid.device)
        if not bool(real.any()):
            return dict(real_neg_mask=real)
        neg_keys = torch.roll(keys, -1, 0)[real]
        neg_valid = torch.roll(keys_valid, -1, 0)[real]
        # positions stay those of the original pairing (they do not depend on content)
        fused = self._fuse(vid[real], vid_valid[real], vid_pos[real], neg_keys, neg_valid, keys_pos[real],
                           ctx[real], decode=False)
        attn = fused["t2v_attn"][:, :, self.cfg.num_dummies:]
        words_valid = neg_valid[:, self.cfg.num_dummies:]
        return dict(saliency_scores_neg=self._saliency(fused["memory_local"], fused["memory_global"]),
                    t2vattnvalues_neg=(attn * words_valid[:, None]).sum(2).clamp(0, 1),
                    src_txt_mask_neg=neg_valid, real_neg_mask=real)


def _llm_dtype(cfg: ModelConfig, device) -> torch.dtype:
    if cfg.llm_dtype == "bfloat16" or (cfg.llm_dtype == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return torch.float32


def build_model(cfg: ModelConfig, llm_weights: bool = True, device="cpu") -> LLMEPET:
    """Build LLMEPET from ``cfg``; read the chosen LLM layers when ``llm_weights`` (callers that load a full
    checkpoint right after pass False). LLM shapes come from the LLM itself; ``model.cfg`` records them.

    ``cfg.llm == "random"`` keeps randomly initialised LLM blocks (tests, synthetic world only).
    """
    spec, weights = None, None
    if llm_weights and cfg.n_llm_layers:
        if not cfg.llm:
            raise ModelError("no LLM given: pass --llm (a transformers LLaMA-family id/dir, or a Meta "
                             "consolidated.00.pth; the paper: LLaMA-7B layers 14:17), or --llm-layers 0:0 to train "
                             "without LLM blocks (the paper's ablation)")
        if cfg.llm != "random":
            first, end = cfg.llm_layer_range()
            spec, weights = load_llm_layers(cfg.llm, first, end)
            cfg = cfg.replace(llm_dim=spec["llm_dim"], llm_heads=spec["llm_heads"],
                              llm_kv_heads=spec["llm_kv_heads"], llm_ffn_dim=spec["llm_ffn_dim"],
                              llm_norm_eps=spec["llm_norm_eps"],
                              llm_head_dim=0 if spec["head_dim"] * spec["llm_heads"] == spec["llm_dim"]
                              else spec["head_dim"])
    model = LLMEPET(cfg, llm_blocks_on_meta=weights is not None)  # no random init of ~0.6B parameters
    if weights is not None:
        model.llm.blocks.load_state_dict(weights, strict=True, assign=True)
        model.llm.freeze()
    model.llm.blocks.to(_llm_dtype(cfg, device))
    model.llm.norm.to(_llm_dtype(cfg, device))
    return model.to(device)
