"""Evaluate every pruning method at every keep ratio: accuracy, compute and latency.

The Flickr8k protocol (Hodosh et al. 2013) on the TEST split (1,000 images x 5
captions for Flickr8k; ``--limit`` for quick runs). For each (method, keep ratio)
row: tokens per stage, fvcore GMACs, Recall@1/5/10 both ways, hard-negative pair
accuracy, object-patch recall (synthetic data), lossy-ness against ``none``, and
latency at batch 1 and 32 measured interleaved with the baseline. Metric
definitions live in `training.metrics`.

Checkpoints: ``learned`` runs the fine-tuned ``CKPT/pruned/`` model; every other
method runs ``CKPT/baseline/``. Text embeddings always come from the baseline's text
tower (the pruned model's is frozen, hence identical).

Shape legend: N images, T captions, E embedding width, S image side, k kept patches.

Usage::

    python -m training.evaluate --checkpoints checkpoints --out checkpoints [--limit 200]

Writes ``OUT/metrics.json``, ``OUT/report.md`` and ``OUT/tradeoff.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from training import metrics as M
from training.data import EvalData, eval_data, load_objects, load_splits, write_text_atomic
from vlm_demo import flops
from vlm_demo.latency import fixed_threads, interleaved
from vlm_demo.model import DualEncoder, load_checkpoint
from vlm_demo import pruning
from vlm_demo.pruning import BASELINE, PruneSpec, Trace
from vlm_demo.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_KEEP_RATIOS = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1)
LATENCY_BATCH = 32  # the throughput batch; batch 1 is a user's latency
RECALL_KS = (1, 5, 10)
LATENCY_KEYS = ("latency_ms", "latency_iqr_ms", "baseline_latency_ms", "latency_ratio")  # each with _bs1, _bs32


@dataclass
class _Pass:
    """One encoding pass over the evaluation images."""

    emb: torch.Tensor  # (N, E) normalised image embeddings
    kept: torch.Tensor  # (N, k') original patch positions kept by the last stage (-1: fused token)
    tokens: list[int]  # patch tokens per group of blocks (`Trace.tokens_per_stage`)


# ----------------------------------------------------------------------------- loading


def _read_training(folder: Path) -> dict[str, Any]:
    path = folder / "training.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg}); re-save the checkpoint.") from None


def _resolve_data(data: str | os.PathLike | None, recorded: Any, checkpoints: Path) -> Path:
    if data is not None:
        root = Path(data)
        if not root.is_dir():
            raise ValueError(f"--data {root} is not a folder.")
        return root
    if not recorded:
        raise ValueError(
            f"{checkpoints / 'baseline' / 'training.json'} records no dataset root; pass --data DIR."
        )
    root = Path(recorded)
    # A relative path was relative to where training ran; try the checkpoints' parent too.
    for candidate in (root, checkpoints.parent / root):
        if candidate.is_dir():
            return candidate
    raise ValueError(f"The dataset recorded at training time ({recorded}) is not here; pass --data DIR.")


def _validate(methods: Sequence[str], keep_ratios: Sequence[float]) -> tuple[list[str], list[float]]:
    for m in methods:
        pruning.get(m)  # a clear error for an unknown name
    bad = [r for r in keep_ratios if not 0.0 < float(r) <= 1.0]
    if bad or not keep_ratios:
        raise ValueError(f"Keep ratios must be in (0, 1], got {list(keep_ratios)}.")
    # The none row is the reference of lossy-ness and of every ratio, so it is always evaluated.
    ordered = [BASELINE] + [m for m in pruning.names(prunes_only=True) if m in methods]
    return ordered, sorted({float(r) for r in keep_ratios}, reverse=True)


def _config_summary(model: DualEncoder) -> dict[str, Any]:
    cfg = model.cfg
    v = cfg.vision
    return {
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "grid": v.grid,
        "num_patches": v.num_patches,
        "vision_width": v.width,
        "vision_depth": v.depth,
        "vision_heads": v.heads,
        "text_width": cfg.text.width,
        "text_depth": cfg.text.depth,
        "context_length": cfg.text.context_length,
        "embed_dim": cfg.embed_dim,
        "pruning_stages": list(cfg.pruning.stages),
        "params": sum(p.numel() for p in model.parameters()),
        "params_image_encoder": sum(p.numel() for p in model.visual.parameters()),
        "params_text_encoder": sum(p.numel() for p in model.text.parameters()),
    }


def _machine(threads: int) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
    }


# ----------------------------------------------------------------------------- encoding


@torch.inference_mode()
def _encode_text(model: DualEncoder, tokenizer: Tokenizer, texts: Sequence[str], batch: int = 512) -> torch.Tensor:
    """(T, E) normalised caption embeddings from the baseline's text tower."""
    out = [model.encode_text(tokenizer.encode_batch(texts[i : i + batch])) for i in range(0, len(texts), batch)]
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim)


def _final_kept(trace: Trace, batch: int) -> torch.Tensor:
    if trace.stages:
        return trace.stages[-1].kept.cpu()
    return torch.arange(trace.num_patches).expand(batch, -1)  # nothing was pruned


@torch.inference_mode()
def _encode_images(
    model: DualEncoder,
    images: torch.Tensor,
    spec_for: Callable[[int, int], PruneSpec],
    batch_size: int,
    desc: str,
    progress: bool,
) -> _Pass:
    """Encode `images` in batches; `spec_for(start, end)` gives each batch's `PruneSpec`."""
    embs, kept, tokens = [], [], None
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", leave=False, disable=not progress):
        end = min(start + batch_size, len(images))
        z, trace = model.encode_image_with_trace(images[start:end], spec_for(start, end))
        embs.append(z)
        kept.append(_final_kept(trace, end - start))
        tokens = trace.tokens_per_stage()
    return _Pass(emb=torch.cat(embs), kept=torch.cat(kept), tokens=tokens or [])


def _tokens_per_stage(model: DualEncoder, method: str, keep_ratio: float, fuse: bool) -> list[int]:
    """What `Trace.tokens_per_stage` reports, without running the model."""
    per_block = flops.tokens_per_block(model.cfg, method, keep_ratio, fuse)
    return [per_block[0] - 1] + [per_block[s] - 1 for s in model.cfg.pruning.stages]


# ----------------------------------------------------------------------------- evaluation


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null, so that metrics.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _mean(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def evaluate(
    checkpoints: str | os.PathLike,
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    *,
    methods: Sequence[str] | None = None,
    keep_ratios: Sequence[float] = DEFAULT_KEEP_RATIOS,
    limit: int | None = None,
    latency_repeats: int = 15,
    batch_size: int = 100,
    seed: int = 0,
    latency: bool = True,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the baseline and every pruning method; write metrics.json, report.md, tradeoff.png.

    Args:
        checkpoints: folder with ``baseline/`` and (for ``learned``) ``pruned/``.
        out: output folder (created).
        data: dataset root; None uses the ``data`` recorded in ``baseline/training.json``.
        methods: methods to evaluate; ``none`` is always added (it is the reference).
        keep_ratios: keep ratios; ``none`` gets one row, at 1.0.
        limit: evaluate the first `limit` test images only (None: all).
        latency_repeats: measured calls per variant and batch size.
        batch_size: images per encoding batch.
        seed: seed of ``random`` (the batch starting at image i uses ``seed + i``).
        latency: measure latency; False leaves the latency fields null.
        threads: torch threads for the whole run (None keeps the current count); restored
            afterwards. On a shared machine, 1 avoids OpenMP threads spinning against other jobs.
        progress: show progress bars.

    Returns:
        The metrics dict that was written to ``metrics.json``.

    Raises:
        ValueError: for a missing checkpoint or dataset, bad options, or an empty test split.
    """
    methods, keep_ratios = _validate(pruning.names() if methods is None else methods, keep_ratios)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if latency and latency_repeats < 1:
        raise ValueError(f"latency_repeats must be at least 1, got {latency_repeats}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}.")
    # One thread count for the whole run (encoding and latency alike); restored afterwards.
    with fixed_threads(threads):
        return _evaluate(
            Path(checkpoints), Path(out), data, methods, keep_ratios, limit, latency_repeats, batch_size, seed,
            latency, torch.get_num_threads(), progress,
        )  # fmt: skip


def _evaluate(
    checkpoints: Path,
    out: Path,
    data: str | os.PathLike | None,
    methods: list[str],
    keep_ratios: list[float],
    limit: int | None,
    latency_repeats: int,
    batch_size: int,
    seed: int,
    latency: bool,
    threads: int,
    progress: bool,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    torch.manual_seed(seed)

    base_dir, pruned_dir = checkpoints / "baseline", checkpoints / "pruned"
    base, tokenizer = load_checkpoint(base_dir)
    base_training = _read_training(base_dir)
    pruned: DualEncoder | None = None
    pruned_training: dict[str, Any] = {}
    need_pruned = [m for m in methods if pruning.get(m).needs_predictor]
    if need_pruned:
        if not pruned_dir.is_dir():
            raise ValueError(f"{pruned_dir} is missing: train the pruned model, or leave {need_pruned} out of --methods.")
        pruned, _ = load_checkpoint(pruned_dir)
        pruned_training = _read_training(pruned_dir)
        if pruned.cfg.vision != base.cfg.vision or pruned.cfg.pruning.stages != base.cfg.pruning.stages:
            raise ValueError(f"{pruned_dir} and {base_dir} have different image encoders; re-train the pruned model.")
    cfg = base.cfg
    grid, P = cfg.vision.grid, cfg.vision.num_patches

    root = _resolve_data(data, base_training.get("data"), checkpoints)
    test = load_splits(root)["test"]
    if len(test) == 0:
        raise ValueError(f"The test split of {root} has no images.")
    ed: EvalData = eval_data(test, cfg.vision.image_size, limit, progress)
    N = len(ed.names)
    objects = load_objects(root)

    # Captions once, with the baseline's text tower.
    text_emb = _encode_text(base, tokenizer, ed.captions)  # (T, E)
    first_caption = [0] * N
    seen: set[int] = set()
    for c, i in enumerate(ed.caption_to_image.tolist()):
        if i not in seen:
            seen.add(i)
            first_caption[i] = c
    pos_emb = text_emb[first_caption]  # (N, E) caption #0 of each image

    # Ground truth from objects.json: hard negatives (pair accuracy) and boxes (object recall).
    have_neg = have_boxes = None
    neg_emb = None
    boxes: list[list[list[float]]] = []
    box_size = float(cfg.vision.image_size)
    if objects is not None:
        records = [objects["images"].get(n) for n in ed.names]
        have_neg = torch.tensor([bool(r and r.get("hard_negative")) for r in records])
        have_boxes = torch.tensor([bool(r and "objects" in r) for r in records])
        negs = [r["hard_negative"] if ok else "" for r, ok in zip(records, have_neg.tolist())]
        neg_emb = _encode_text(base, tokenizer, negs)  # (N, E); rows without a negative are ignored
        boxes = [[o["box"] for o in r["objects"]] if ok else [] for r, ok in zip(records, have_boxes.tolist())]
        # Images are resized (never cropped) to a square, so boxes keep their place relative to the grid.
        box_size = float(objects.get("image_size", cfg.vision.image_size))
        if not bool(have_neg.any()):
            have_neg = None
        if not bool(have_boxes.any()):
            have_boxes = None

    def pair_acc(img: torch.Tensor, neg_img: torch.Tensor | None = None) -> float | None:
        if have_neg is None or neg_emb is None:
            return None
        m = have_neg
        return M.pair_accuracy(img[m], pos_emb[m], neg_emb[m], None if neg_img is None else neg_img[m])

    def obj_recall(kept: torch.Tensor) -> float | None:
        if have_boxes is None:
            return None
        return M.object_recall(kept, boxes, grid, box_size)

    # A fixed batch of real test images for latency (tiled when the split is smaller than 32).
    lat_idx = torch.arange(LATENCY_BATCH) % N
    lat_images = {1: ed.images[:1], LATENCY_BATCH: ed.images[lat_idx]}
    lat_text = {1: pos_emb[:1], LATENCY_BATCH: pos_emb[lat_idx]}

    def measure(model: DualEncoder, method: str, keep_ratio: float, fuse: bool) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for bs, x in lat_images.items():
            text = lat_text[bs] if pruning.get(method).needs_caption else None
            spec = PruneSpec(method, keep_ratio, text=text, seed=seed, fuse=fuse)
            timings = interleaved(
                {"baseline": lambda: base.encode_image(x), "method": lambda: model.encode_image(x, spec)},
                repeats=latency_repeats,
                warmup=3,
                threads=threads,
            )
            b, m = timings["baseline"], timings["method"]
            result[f"latency_ms_bs{bs}"] = m.median_ms
            result[f"latency_iqr_ms_bs{bs}"] = m.iqr_ms
            result[f"baseline_latency_ms_bs{bs}"] = b.median_ms
            result[f"latency_ratio_bs{bs}"] = m.median_ms / b.median_ms if b.median_ms > 0 else None
        return result

    grid_rows = [(BASELINE, 1.0)] + [(m, r) for m in methods if pruning.get(m).prunes for r in keep_ratios]
    base_gmacs = flops.gmacs(cfg, BASELINE, 1.0, 1)
    reference: _Pass | None = None
    reference_pair: float | None = None
    rows: list[dict[str, Any]] = []
    with logging_redirect_tqdm():
        bar = tqdm(grid_rows, desc="evaluate", unit="row", disable=not progress)
        for method, r in bar:
            bar.set_postfix_str(f"{method} {r:g}")
            info = pruning.get(method)
            model = pruned if info.needs_predictor else base
            assert model is not None
            fuse = info.fusion == "stage" and cfg.pruning.fuse_dropped
            spec_active = info.prunes and r < 1.0
            row: dict[str, Any] = {
                "method": method,
                "keep_ratio": r,
                "checkpoint": "pruned" if model is pruned else "baseline",
            }
            recalls: dict[str, float] | None = None
            pair: float | None = None
            kept: torch.Tensor | None = None
            tokens = _tokens_per_stage(model, method, r, fuse)
            reuse = model is base and not spec_active and reference is not None
            if reuse:
                # An inactive spec on the baseline is the baseline itself: reuse its embeddings.
                assert reference is not None
                if not info.needs_caption:
                    recalls = M.recall_at_k(reference.emb @ text_emb.T, ed.caption_to_image, RECALL_KS)
                pair, kept, tokens = reference_pair, reference.kept, reference.tokens
            elif info.needs_caption:
                # Query-aware: one pass per (image, caption) pair, so no retrieval recalls.
                if have_neg is not None or have_boxes is not None:
                    with_pos = _encode_images(
                        model, ed.images,
                        lambda s, e: PruneSpec(method, r, text=pos_emb[s:e], seed=seed),
                        batch_size, f"{method} {r:g} (caption)", progress,
                    )  # fmt: skip
                    kept, tokens = with_pos.kept, with_pos.tokens
                    if have_neg is not None and neg_emb is not None:
                        with_neg = _encode_images(
                            model, ed.images,
                            lambda s, e: PruneSpec(method, r, text=neg_emb[s:e], seed=seed),
                            batch_size, f"{method} {r:g} (negative)", progress,
                        )  # fmt: skip
                        pair = pair_acc(with_pos.emb, with_neg.emb)
            else:
                run = _encode_images(
                    model, ed.images,
                    lambda s, e: PruneSpec(method, r, seed=seed + s, fuse=fuse),
                    batch_size, f"{method} {r:g}", progress,
                )  # fmt: skip
                recalls = M.recall_at_k(run.emb @ text_emb.T, ed.caption_to_image, RECALL_KS)
                pair, kept, tokens = pair_acc(run.emb), run.kept, run.tokens
                if not info.prunes:
                    reference, reference_pair = run, pair

            g = flops.gmacs(cfg, method, r, 1, fuse)
            row["tokens"] = tokens
            row["gmacs"] = g
            row["gmacs_ratio"] = g / base_gmacs
            for k in RECALL_KS:
                for d in ("i2t", "t2i"):
                    row[f"r{k}_{d}"] = None if recalls is None else recalls[f"r{k}_{d}"]
            row["mean_r1"] = _mean(row["r1_i2t"], row["r1_t2i"])
            row["mean_r5"] = _mean(row["r5_i2t"], row["r5_t2i"])
            row["mean_r10"] = _mean(row["r10_i2t"], row["r10_t2i"])
            row["pair_acc"] = pair
            row["object_recall"] = None if kept is None else obj_recall(kept)
            row["object_recall_random"] = M.random_expectation(r if spec_active else 1.0, P)
            row["lossyness"] = M.lossyness(row["mean_r1"], rows[0]["mean_r1"] if rows else row["mean_r1"])
            # True when the row runs exactly the baseline's computation (an inactive spec on baseline/).
            row["same_as_baseline"] = reuse
            lat_keys = [f"{key}_bs{bs}" for bs in lat_images for key in LATENCY_KEYS]
            if latency and reuse:
                row.update({key: rows[0][key] for key in lat_keys})  # the same code path: not timed twice
            elif latency:
                row.update(measure(model, method, r, fuse))
            else:
                row.update(dict.fromkeys(lat_keys))
            rows.append(row)
            logger.info(_row_line(row))
        bar.close()

    result = {
        "dataset": {
            "root": str(root),
            "split": "test",
            "images": N,
            "captions": len(ed.captions),
            "limit": limit,
            "synthetic": objects is not None,
            "pair_images": None if have_neg is None else int(have_neg.sum()),
        },
        "model": _config_summary(base),
        "training": {
            "seconds_per_epoch": {
                "none": base_training.get("seconds_per_epoch"),
                "learned": pruned_training.get("seconds_per_epoch"),
            },
            "epochs": {"none": base_training.get("epochs"), "learned": pruned_training.get("epochs")},
            "preset": base_training.get("preset"),
            "baseline": base_training,
            "pruned": pruned_training,
        },
        "machine": _machine(threads),
        "options": {
            "methods": methods,
            "keep_ratios": keep_ratios,
            "latency_repeats": latency_repeats if latency else None,
            "latency_batch_sizes": [1, LATENCY_BATCH],
            "batch_size": batch_size,
            "seed": seed,
        },
        "units": {
            "gmacs": "giga multiply-accumulates per image (fvcore; FLOPs = 2 x MACs)",
            "recall": "percent",
            "pair_acc": "percent",
            "object_recall": "fraction",
            "lossyness": "fraction, 1 - mean R@1 / mean R@1 of none",
            "latency": "milliseconds per call, median",
        },
        "rows": rows,
    }
    result["seconds"] = time.perf_counter() - t_start
    result = _json_safe(result)
    write_outputs(result, out)
    logger.info("Wrote metrics.json, report.md and tradeoff.png to %s in %.1f s.", out, result["seconds"])
    return result


# ----------------------------------------------------------------------------- outputs


def _fmt(value: Any, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _row_line(row: dict[str, Any]) -> str:
    return (
        f"{row['method']:>13s} keep {row['keep_ratio']:.2f} tokens {row['tokens']} "
        f"GMACs {row['gmacs']:.4f} ({row['gmacs_ratio']:.2f}x) mean R@1 {_fmt(row['mean_r1'])} "
        f"pair {_fmt(row['pair_acc'])} obj {_fmt(row['object_recall'], '.2f')} "
        f"bs32 {_fmt(row['latency_ms_bs32'], '.1f')} ms ({_fmt(row['latency_ratio_bs32'], '.2f')}x)"
    )


def render_report(m: dict[str, Any]) -> str:
    """The markdown report of a metrics dict (as `evaluate` returns it)."""
    ds, mach, tr, mod = m["dataset"], m["machine"], m["training"], m["model"]
    kind = "synthetic (generated, with object ground truth)" if ds["synthetic"] else "real captions"
    spe = tr["seconds_per_epoch"]
    lines = [
        "# Token pruning: accuracy against cost",
        "",
        f"- **Dataset:** `{ds['root']}`, {kind}; split **{ds['split']}**, {ds['images']} images x "
        f"{ds['captions']} captions" + (f" (limited to the first {ds['limit']})" if ds.get("limit") else "") + ".",
        f"- **Model:** {mod['image_size']} px images, {mod['patch_size']} px patches "
        f"({mod['num_patches']} patch tokens), "
        f"ViT width {mod['vision_width']} x {mod['vision_depth']} blocks, pruning before blocks "
        f"{', '.join(str(s) for s in mod['pruning_stages'])}; {mod['params'] / 1e6:.2f} M parameters.",
        f"- **Machine:** {mach['platform']} ({mach['processor']}), {mach['cpu_count']} CPUs, "
        f"torch {mach['torch']} with {mach['torch_threads']} threads.",
        f"- **Training, seconds per epoch:** none (baseline) {_fmt(spe.get('none'))}, "
        f"learned (pruned fine-tune) {_fmt(spe.get('learned'))}.",
        f"- **Evaluation took** {m.get('seconds', 0):.0f} s.",
        "",
        "| method | keep | tokens | GMACs | GMACs ratio | R@1 i2t | R@1 t2i | mean R@1 | R@5 / R@10 mean "
        "| pair acc | obj recall (random) | lossy-ness | ms bs1 | ms bs32 | latency ratio bs32 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in m["rows"]:
        obj = "-" if r["object_recall"] is None else f"{r['object_recall']:.2f} ({r['object_recall_random']:.2f})"
        r5r10 = "-" if r["mean_r5"] is None else f"{r['mean_r5']:.1f} / {r['mean_r10']:.1f}"
        lines.append(
            f"| {r['method']} | {r['keep_ratio']:g} | {'/'.join(str(t) for t in r['tokens'])} "
            f"| {r['gmacs']:.4f} | {r['gmacs_ratio']:.2f} | {_fmt(r['r1_i2t'])} | {_fmt(r['r1_t2i'])} "
            f"| {_fmt(r['mean_r1'])} | {r5r10} | {_fmt(r['pair_acc'])} | {obj} | {_fmt(r['lossyness'], '.3f')} "
            f"| {_fmt(r['latency_ms_bs1'], '.2f')} | {_fmt(r['latency_ms_bs32'], '.1f')} "
            f"| {_fmt(r['latency_ratio_bs32'], '.2f')} |"
        )
    lines += [
        "",
        "**How to read this.** *GMACs* are fvcore counts of multiply-accumulates for one image through "
        "the image encoder (FLOPs = 2 x MACs), including attention and each method's scoring cost; "
        "*tokens* are the patch tokens each group of blocks sees (CLS excluded), split at the pruning stages. "
        "Recall@K follows the Flickr8k protocol (image->text: any of the image's captions in the top K; "
        "text->image: the caption's image in the top K), in percent, with ties counted against the model. "
        "*Lossy-ness* is 1 - mean R@1 / mean R@1 of `none` (negative: better than the baseline). "
        "*Pair acc* is the share of images closer to their true caption than to a one-attribute hard negative; "
        "`text_guided` prunes each image once per caption, so it has no retrieval recalls, and its pair "
        "accuracy scores each caption against the image pruned with it. *Obj recall* is the share of "
        "ground-truth object patches (at least half covered by an object box) still kept after the last "
        "stage, with what random pruning keeps in expectation in brackets; ToMe keeps a patch when its "
        "token still represents a merged group. Latency is the median wall time per call, measured "
        "interleaved with the baseline in the same run (so machine noise hits both), after warm-up, with "
        "a fixed thread count; the ratio is method / baseline from that run (rows that run exactly the "
        "baseline's computation, any method at keep 1 on the baseline checkpoint, reuse its embeddings and "
        "timings). At batch 1 a model this small is bound by per-operator overhead, not arithmetic, so it "
        "speeds up much less than its GMACs fall, and the scoring ops of a method can even make it slower. "
        "Batch 32 amortises that overhead and is the fairer measure of throughput; where its ratio still "
        "stays above the GMACs ratio, the model is too small for arithmetic to dominate on this machine.",
        "",
    ]
    return "\n".join(lines)


def plot_tradeoff(m: dict[str, Any], path: str | os.PathLike) -> Path:
    """Save `vlm_demo.plots.tradeoff_figure` of `m` (every panel) as a PNG, atomically."""
    from vlm_demo import plots  # matplotlib loads only when a figure is drawn

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")  # same folder, so the rename is atomic
    try:
        plots.tradeoff_figure(m).savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_outputs(m: dict[str, Any], out: str | os.PathLike) -> None:
    """Write ``metrics.json``, ``report.md`` and ``tradeoff.png`` into `out` (each atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "metrics.json", json.dumps(m, indent=2, allow_nan=False) + "\n")
    write_text_atomic(out / "report.md", render_report(m))
    plot_tradeoff(m, out / "tradeoff.png")


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", default="checkpoints", help="holds baseline/ and pruned/ (default: checkpoints)")
    p.add_argument("--out", required=True, help="output folder for metrics.json, report.md, tradeoff.png")
    p.add_argument("--data", default=None, help="dataset root (default: the one recorded in baseline/training.json)")
    p.add_argument(
        "--methods", nargs="+", default=list(pruning.names()), choices=pruning.names(),
        help="methods to evaluate (default: all; none is always included)",
    )  # fmt: skip
    p.add_argument(
        "--keep-ratios", nargs="+", type=float, default=list(DEFAULT_KEEP_RATIOS),
        help="keep ratios in (0, 1] (default: 1 0.7 0.5 0.3 0.2 0.1)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N test images")
    p.add_argument("--latency-repeats", type=int, default=15, help="timed calls per variant and batch (default 15)")
    p.add_argument("--batch-size", type=int, default=100, help="images per encoding batch (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's current setting)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the metrics dict (also written to OUT/metrics.json)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    try:
        return evaluate(
            args.checkpoints,
            args.out,
            args.data,
            methods=args.methods,
            keep_ratios=args.keep_ratios,
            limit=args.limit,
            latency_repeats=args.latency_repeats,
            batch_size=args.batch_size,
            seed=args.seed,
            latency=not args.no_latency,
            threads=args.threads,
            progress=not args.no_progress,
        )
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
