"""What runs inside Ray: the decode task (one segment of one video) and the actors that hold a model (CLIP, SlowFast).

Both are plain Python here; indexer.pipeline wraps them with ray.remote and its resource options. A decode task
never raises for a bad file: it returns the reason, so one broken file cannot fail the run.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import numpy as np

from indexer.decode import DecodeError, probe, sample_clip_frames
from indexer.discover import content_hash
from model.errors import ModelError
from store.clip_source import CLIPSource


@dataclass(frozen=True)
class CLIPChoice:
    """Which CLIP embeds the frames, as the user chose it.

    model: open_clip model name or a model-config JSON path; pretrained: open_clip tag, checkpoint path or None;
    device: "auto" | "cpu" | "cuda" (the actors' device is decided from the cluster, see indexer.pipeline);
    allow_random: random weights allowed (tests, benchmarks of speed only);
    precision: "fp32" | "bf16" | "auto" (bf16 where the device has it natively:
    model.inference.precision.clip_precision). An index records the precision it was built with (in ``source()``);
    re-indexing and queries use it.
    """
    model: str
    pretrained: str | None
    device: str = "auto"
    allow_random: bool = False
    precision: str = "auto"

    def source(self) -> dict:
        """How search reloads this CLIP (index meta ``clip_source``, store.clip_source)."""
        return CLIPSource.of(self.model, self.pretrained, self.precision).to_meta()


@functools.lru_cache(maxsize=4)
def _resizer(preprocess_json: str):
    # lazy: torch: decode tasks load this module in Ray workers that never need it
    from model.inference.features import frame_resizer

    return frame_resizer(json.loads(preprocess_json))


def decode_segment(abspath: str, video_id: int, first_clip: int, stop_clip: int | None, preprocess_json: str,
                   stored_hash: str | None = None, size: int | None = None, kinds: tuple = ("clip",),
                   clip_len: int = 2) -> tuple[dict, np.ndarray, np.ndarray]:
    """Frames of clips [first_clip, stop_clip) of one video (stop_clip None: to its end), for the named kinds.

    kinds: ("clip",) decodes only CLIP's frame a clip (indexer.decode, seeking past the rest); with "slowfast" every
    frame is decoded once and feeds both (indexer.frame_stream; ("slowfast",) alone: SlowFast's windows only, for a
    video whose CLIP vectors are stored). The first segment (first_clip == 0) also fingerprints the file and probes
    the container: when ``stored_hash`` equals the content hash the video is unchanged and nothing is decoded.
    Returns (info dict, CLIP frames uint8 [n, S, S, 3], SlowFast windows uint8 [m, 32, 224, 224, 3]).
    """
    info = {"video_id": video_id, "first_clip": first_clip, "n": 0, "sf_n": 0, "error": None, "node": _node_id(),
            "pid": os.getpid()}
    empty, no_windows = np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0, 32, 1, 1, 3), np.uint8)
    try:
        if first_clip == 0 and size == 0:
            info["error"] = "empty file (0 bytes)"
            return info, empty, no_windows
        if first_clip == 0:
            info["content_hash"] = content_hash(abspath, size)
            if stored_hash is not None and info["content_hash"] == stored_hash:
                info["unchanged"] = True
                return info, empty, no_windows
            meta = probe(abspath)
            info.update(est_duration=meta.duration, fps=meta.fps)
        if "slowfast" in kinds:
            from indexer.frame_stream import decode_kinds  # lazy: torch (the window's linspace), for SlowFast runs only

            resize = _resizer(preprocess_json) if "clip" in kinds else None
            frames, windows, sampled = decode_kinds(abspath, resize, first_clip, stop_clip, clip_len)
            info.update(sf_first=sampled.slowfast_first, sf_n=sampled.slowfast_n, sf_total=sampled.slowfast_total)
        else:
            (frames, sampled), windows = sample_clip_frames(abspath, _resizer(preprocess_json), first_clip,
                                                            stop_clip), no_windows
    except DecodeError as err:
        info["error"] = str(err)
        return info, empty, no_windows
    except OSError as err:
        info["error"] = f"cannot read: {err.strerror or err}"
        return info, empty, no_windows
    except Exception as err:  # noqa: BLE001 - any decoder surprise marks this file failed, not the run
        info["error"] = f"decode failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return info, empty, no_windows
    info.update(n=sampled.n, end_time=sampled.end_time, total_clips=sampled.total_clips, width=sampled.width,
                height=sampled.height, rotation=sampled.rotation, decoded=sampled.decoded, seeks=sampled.seeks)
    return info, frames, windows


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return None


class CLIPWorker:
    """Holds one CLIP model (``clip.device`` is the actor's own: "cpu" or "cuda"); embeds batches of resized
    frames from any number of videos. threads: torch threads (None: torch's default)."""

    def __init__(self, clip: CLIPChoice, threads: int | None = None):
        import torch

        # lazy: torch: only the CLIP actors load it, not the decode tasks
        from model.inference.features import ClipEncoder

        if threads:  # never more than the cores of the node the actor landed on
            torch.set_num_threads(max(1, min(int(threads), os.cpu_count() or 1)))
        # A model that cannot load (bad weights) is reported by describe() instead of raised: an actor that dies in
        # its constructor is restarted and its calls retried, each time failing the same way with pages of Ray
        # traceback. Retrying cannot fix a file.
        self.error = None
        try:
            self.encoder = ClipEncoder.load(clip.model, clip.pretrained, device=clip.device,
                                            allow_random=clip.allow_random, precision=clip.precision)
        except ModelError as err:
            self.error = str(err)

    def describe(self) -> dict:
        """What this actor loaded ({"error": one line} when it could not)."""
        import torch

        if self.error is not None:
            return {"error": self.error}
        enc = self.encoder
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in enc.preprocess_cfg.items()}
        return {"model_id": enc.model_id, "embed_dim": enc.embed_dim, "preprocess": cfg, "device": str(enc.device),
                "precision": enc.precision, "node": _node_id(), "torch_threads": torch.get_num_threads()}

    def embed(self, *frame_batches: np.ndarray) -> list[np.ndarray]:
        """One f32 [n_i, D] (L2-normalised) per uint8 [n_i, S, S, 3] argument; frames of all run as one batch."""
        sizes = [len(b) for b in frame_batches]
        batches = [b for b in frame_batches if len(b)]
        if not batches:
            return [np.zeros((0, self.encoder.embed_dim), np.float32) for _ in sizes]
        feats = self.encoder.encode_frames_uint8(np.concatenate(batches))
        out, start = [], 0
        for n in sizes:
            out.append(feats[start: start + n])
            start += n
        return out


SLOWFAST_BATCH = 4  # clips per SlowFast forward: ~1 GB of CPU activations at 224 x 224


class SlowFastWorker:
    """Holds SlowFastR50 with the weights of ``weights_path`` on ``device`` ("cpu" or "cuda"); turns batches of
    32-frame windows from any number of videos into 2304-d vectors. TF32 is off: the public features were computed
    in full fp32 (on a V100), and TF32 convolutions move them by ~1e-3."""

    def __init__(self, weights_path: str, device: str = "cpu", threads: int | None = None):
        import torch

        # lazy: torch: only the SlowFast actors load it, not the decode tasks
        from model.inference.slowfast_weights import build_slowfast

        if threads:
            torch.set_num_threads(max(1, min(int(threads), os.cpu_count() or 1)))
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        self.error, self.device = None, torch.device(device)
        try:  # reported by describe(), not raised: see CLIPWorker
            self.model = build_slowfast(weights_path).to(self.device)
        except ModelError as err:
            self.error = str(err)

    def describe(self) -> dict:
        import torch

        if self.error is not None:
            return {"error": self.error}
        return {"device": str(self.device), "node": _node_id(), "torch_threads": torch.get_num_threads()}

    def embed(self, *window_batches: np.ndarray) -> list[np.ndarray]:
        """One f32 [n_i, 2304] per uint8 [n_i, 32, 224, 224, 3] argument (slowfast_frames.normalise, then the net)."""
        import torch

        from indexer.slowfast_frames import normalise  # lazy: torch, as above

        out = []
        for windows in window_batches:
            feats = [np.zeros((0, 2304), np.float32)]
            for i in range(0, len(windows), SLOWFAST_BATCH):
                with torch.inference_mode():
                    x = normalise(windows[i: i + SLOWFAST_BATCH].copy()).to(self.device)  # Ray hands read-only arrays
                    feats.append(self.model(x).float().cpu().numpy())
            out.append(np.concatenate(feats))
        return out
