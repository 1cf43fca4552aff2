"""Train the test world's tiny open_clip model so that its sentences and frames align.

    python -m world.train_clip [--steps 1500] [--out world/world_clip.pt]

Frames are rendered by ``world.scene``, passed through an h264 round trip (the indexer sees decoded video,
chroma-subsampled and compressed) and through the model's own open_clip preprocessing. The text side sees the
object captions of every template plus the empty-scene caption.

Loss: a frame may show two objects, so it is a multi-positive contrastive loss. Image -> text is a softmax over the
whole caption vocabulary (73 captions, one template drawn per object per step) averaged over the frame's positive
captions; text -> image is a softmax over the batch's frames averaged over the frames that show the caption.

The weights are saved as an fp16 state_dict (~3.5 MB, the 49408-token embedding dominates) that
``open_clip``'s checkpoint loader reads into the fp32 model. TEST WORLD ONLY.
"""
from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from world import WORLD_CLIP_CONFIG, WORLD_CLIP_WEIGHTS
from world.scene import ALL_OBJECTS, EMPTY_CAPTION, FRAME_SIZE, TEMPLATES, random_state, render_frame


def build_model(config_path=WORLD_CLIP_CONFIG):
    """The tiny CLIP from its open_clip config JSON, with its preprocessing and tokenizer."""
    import open_clip

    cfg = json.loads(open(config_path).read())
    model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    preprocess = open_clip.image_transform(cfg["vision_cfg"]["image_size"], is_train=False)
    context_length = cfg["text_cfg"]["context_length"]

    def tokenize(texts):
        return open_clip.tokenize(texts, context_length=context_length)

    return model, preprocess, tokenize


def h264_round_trip(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Encode uint8 RGB frames as h264 yuv420p in memory and decode them back (what the indexer will see)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=2)
        stream.width = stream.height = FRAME_SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    buf.seek(0)
    with av.open(buf, mode="r") as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def make_frames(n: int, seed: int, preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """n rendered frames after h264 and preprocessing, with their multi-hot object labels.

    Returns: (images [n, 3, S, S], labels [n, len(ALL_OBJECTS) + 1] float; the last column = empty scene).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    index = {obj: i for i, obj in enumerate(ALL_OBJECTS)}
    states = [random_state(rng) for _ in range(n)]
    frames = [render_frame(s, rng, background=int(rng.integers(25, 60))) for s in states]
    frames = h264_round_trip(frames)
    images = torch.stack([preprocess(Image.fromarray(f)) for f in frames])
    labels = torch.zeros(n, len(ALL_OBJECTS) + 1)
    for i, state in enumerate(states):
        if state:
            labels[i, [index[o] for o in state]] = 1.0
        else:
            labels[i, -1] = 1.0
    return images, labels


def captions(rng: np.random.Generator) -> list[str]:
    """The caption vocabulary for one step: one random template per object, then the empty caption."""
    return [obj.sentence(int(rng.integers(len(TEMPLATES)))) for obj in ALL_OBJECTS] + [EMPTY_CAPTION]


def multi_positive_loss(logits: torch.Tensor, positives: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over rows (dim=1) or columns (dim=0) with >= 1 positive of -mean log softmax at the positives."""
    log_prob = logits.log_softmax(dim=dim)
    n_pos = positives.sum(dim=dim)
    per = -(log_prob * positives).sum(dim=dim) / n_pos.clamp(min=1)
    return per[n_pos > 0].mean()


@torch.no_grad()
def evaluate(model, tokenize, images, labels) -> dict:
    """Top-1 caption accuracy (sentence template) on single-object frames, and top-k hit rate on two-object frames."""
    model.eval()
    texts = [obj.sentence(0) for obj in ALL_OBJECTS] + [EMPTY_CAPTION]
    txt = F.normalize(model.encode_text(tokenize(texts)), dim=-1)
    img = F.normalize(model.encode_image(images), dim=-1)
    sim = img @ txt.T
    n_obj = labels.sum(1)
    top1 = labels.gather(1, sim.argmax(1, keepdim=True))[:, 0]
    top2 = labels.gather(1, sim.topk(2, dim=1).indices).sum(1)
    model.train()
    return {"single_top1": float(top1[n_obj == 1].mean()), "pair_top2_both": float((top2[n_obj == 2] == 2).float().mean())}


def train(steps: int = 800, batch: int = 192, lr: float = 2e-3, seed: int = 0, out=WORLD_CLIP_WEIGHTS,
          n_frames: int = 8000) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, preprocess, tokenize = build_model()
    t0 = time.time()
    images, labels = make_frames(n_frames, seed, preprocess)
    val_images, val_labels = make_frames(2000, seed + 1, preprocess)
    print(f"frames ready in {time.time() - t0:.0f}s")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, n_frames, batch))
        img = F.normalize(model.encode_image(images[idx]), dim=-1)
        txt = F.normalize(model.encode_text(tokenize(captions(rng))), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T  # [B, 73]
        pos = labels[idx]
        loss = (multi_positive_loss(logits, pos, dim=1) + multi_positive_loss(logits, pos, dim=0)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} {evaluate(model, tokenize, val_images, val_labels)} "
                  f"{time.time() - t0:.0f}s", flush=True)
    metrics = evaluate(model, tokenize, val_images, val_labels)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, out)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", default=str(WORLD_CLIP_WEIGHTS))
    args = parser.parse_args()
    print(train(steps=args.steps, out=args.out))


if __name__ == "__main__":
    main()
