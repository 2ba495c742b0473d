"""Evaluate every pruning method at every keep ratio: accuracy, compute and latency.

The Flickr8k protocol (Hodosh et al. 2013) on the TEST split (1,000 images x 5
captions for Flickr8k; ``--eval-limit`` for quick runs). For each (method, keep ratio,
placement) row: tokens per stage, fvcore GMACs, Recall@1/5/10 both ways, hard-negative pair
accuracy, object-patch recall (synthetic data), lossy-ness against ``none``, and
latency at batch 1 and 32 measured interleaved with the baseline. Metric
definitions live in `training.metrics`; ``--placements paper shared`` adds the placement
ablation. On synthetic data ``metrics.json``'s ``"oracle"`` holds the split's R@1 ceiling
(`training.oracle`), and the report compares methods at matched GMACs (`training.compare`).

Checkpoints: ``learned`` and ``text_guided`` run ``CKPT/pruned/`` (its trained keep predictors, on
its image tower, which ``training.train``'s finetune phase fine-tunes under ``learned``); every other
method runs ``CKPT/baseline/``. Text embeddings always come from the baseline's text
tower (the pruned model's is frozen, hence identical).

``--backbone SOURCE`` evaluates a HuggingFace CLIP (folder or Hub id) instead, with its
own preprocessing and tokenizer, or a keep-predictor add-on that ``training.train
--backbone`` wrote, which adds ``learned`` (`vlm_demo.addon`). One model serves every
method. A plain CLIP has no trained predictors, so ``learned`` is left out unless asked
for, and asking for it is an error that gives the training command.

Shape legend: N images, T captions, E embedding width, S image side, k kept patches.

Usage::

    python -m training.evaluate --checkpoints checkpoints --out checkpoints [--eval-limit 200]
    python -m training.evaluate --backbone ADDON_OR_CLIP --out results/clip [--data DIR]

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from training import compare
from training import metrics as M
from training import oracle
from training.data import EvalData, eval_data, load_objects, load_splits
from vlm_demo import addon, cli, flops
from vlm_demo.atomic import atomic_path, write_text_atomic
from vlm_demo.latency import LatencyProtocol, fixed_threads, interleaved
from vlm_demo.model import DualEncoder, load_checkpoint, load_optional
from vlm_demo import pruning
from vlm_demo.pruning import BASELINE, PruneSpec, Trace
from vlm_demo.tokenizer import TextTokenizer
from vlm_demo.transforms import Preprocess, crop_box

logger = logging.getLogger(__name__)

DEFAULT_KEEP_RATIOS = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1)
DEFAULT_PLACEMENTS = ("paper", "shared")  # each method's paper default (the main one), then the ablation at the
# config's stages: methods whose blocks do not move are evaluated once and their rows copied
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


def read_training(folder: Path) -> dict[str, Any]:
    """A checkpoint folder's training.json ({} without one); a clear ValueError for one that is not JSON."""
    path = folder / "training.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg}); re-save the checkpoint.") from None


def resolve_data(
    data: str | os.PathLike | None, recorded: Any, checkpoints: Path, record: str = "training.json"
) -> Path:
    """The dataset root: `data` if given, else the one training recorded (in `record`, e.g. ``baseline/training.json``).

    Training records the root relative to its output folder (the checkpoints folder), or
    only the folder's name when the data lies elsewhere; older checkpoints recorded it
    absolute, or relative to where training ran. All of these are tried.
    """
    if data is not None:
        root = Path(data)
        if not root.is_dir():
            raise ValueError(f"--data {root} is not a folder.")
        return root
    if not recorded:
        raise ValueError(f"{record} records no dataset root; pass --data DIR.")
    root = Path(recorded)
    for candidate in (checkpoints / root, root, checkpoints.parent / root):
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


def _validate_placements(placements: Sequence[str]) -> list[str]:
    bad = [p for p in placements if p not in pruning.PLACEMENTS]
    if bad or not placements:
        raise ValueError(f"Placements must be some of {', '.join(pruning.PLACEMENTS)}, got {list(placements)}.")
    return list(dict.fromkeys(placements))


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
def _encode_text(model: DualEncoder, tokenizer: TextTokenizer, texts: Sequence[str], batch: int = 512) -> torch.Tensor:
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


LATENCY = LatencyProtocol(warmup=3, repeats=15)  # each row's timing, per batch size; --latency-repeats sets repeats


def evaluate(
    checkpoints: str | os.PathLike,
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    *,
    backbone: str | None = None,
    methods: Sequence[str] | None = None,
    keep_ratios: Sequence[float] = DEFAULT_KEEP_RATIOS,
    placements: Sequence[str] = DEFAULT_PLACEMENTS,
    limit: int | None = None,
    latency_repeats: int = LATENCY.repeats,
    latency_budget_s: float | None = None,
    batch_size: int = 100,
    seed: int = 0,
    latency: bool = True,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the baseline and every pruning method; write metrics.json, report.md, tradeoff.png.

    Args:
        checkpoints: folder with ``baseline/`` and (for ``learned``) ``pruned/``; unused with `backbone`.
        out: output folder (created).
        data: dataset root; None uses the ``data`` recorded in ``baseline/training.json`` (or the add-on's).
        backbone: a HuggingFace CLIP (folder or Hub id) or a keep-predictor add-on to evaluate instead of
            `checkpoints`.
        methods: methods to evaluate; ``none`` is always added (it is the reference). None: every method
            the model can run.
        keep_ratios: keep ratios; ``none`` gets one row, at 1.0.
        placements: where the stages sit (`vlm_demo.pruning.PLACEMENTS`): every method is
            evaluated at each; the first is the one the report's main tables show. A method
            whose blocks are the same at two placements (``learned`` always runs its trained
            stages) is evaluated once, and its row copied with ``same_as_placement``.
        limit: evaluate the first `limit` test images only (None: all).
        latency_repeats: measured calls per variant and batch size (after `LATENCY.warmup` warm-up calls).
        latency_budget_s: stop timing a row's batch size once its measured calls took this long
            (at least `LATENCY.min_repeats` of them; None: always `latency_repeats`).
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
    t_start = time.perf_counter()
    explicit = methods is not None
    methods, keep_ratios = _validate(pruning.names() if methods is None else methods, keep_ratios)
    placements = _validate_placements(placements)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if latency and latency_repeats < 1:
        raise ValueError(f"latency_repeats must be at least 1, got {latency_repeats}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}.")
    protocol = LATENCY.replace(repeats=latency_repeats, budget_s=latency_budget_s) if latency else None
    # One thread count for the whole run (encoding and latency alike); restored afterwards.
    with fixed_threads(threads):
        torch.manual_seed(seed)
        if backbone is None:
            models = _load_models(Path(checkpoints), methods, explicit)
        else:
            models = _load_backbone(backbone, methods, explicit)
        methods = [m for m in methods if models.can_serve(pruning.get(m))]
        opts = _Options(
            methods, keep_ratios, limit, protocol, batch_size, seed, torch.get_num_threads(), progress, placements
        )
        recorded = models.base_training.get("data") or models.pruned_training.get("data")
        test = _load_test(resolve_data(data, recorded, models.folder, models.record), models, opts)
        table = _Rows(models, test, opts)
        rows = table.run()
    result = _metrics(models, test, rows, opts)
    result["pair_by_kind"] = table.reference_by_kind
    result["seconds"] = time.perf_counter() - t_start
    result = _json_safe(result)
    write_outputs(result, out)
    logger.info("Wrote metrics.json, report.md and tradeoff.png to %s in %.1f s.", out, result["seconds"])
    return result


@dataclass(frozen=True)
class _Options:
    """What `evaluate` was asked for, validated."""

    methods: list[str]  # none first, then the registry's order
    keep_ratios: list[float]  # descending
    limit: int | None  # first test images only
    latency: LatencyProtocol | None  # None: latency not measured
    batch_size: int  # images per encoding batch
    seed: int  # of random pruning
    threads: int  # torch threads of the run
    progress: bool  # progress bars
    placements: list[str] = field(default_factory=lambda: list(DEFAULT_PLACEMENTS))  # the first is the main one


@dataclass
class _Models:
    """The checkpoints an evaluation runs, and what their training recorded (``training.json``)."""

    base: DualEncoder
    tokenizer: TextTokenizer
    base_training: dict[str, Any]
    pruned: DualEncoder | None = None  # loaded only when a requested method needs the keep predictors
    pruned_training: dict[str, Any] = field(default_factory=dict)
    folder: Path = Path(".")  # what a recorded dataset root is relative to: the checkpoints or the add-on
    record: str = "training.json"  # the file that records the dataset root, for messages
    preprocess: Preprocess | None = None  # a CLIP's resize, crop and normalisation; None: the shipped square resize
    backbone: dict[str, Any] | None = None  # a HuggingFace CLIP's source, revision and commit; None: the shipped model
    others: dict[str, DualEncoder] = field(default_factory=dict)  # the other checkpoints loaded (dynamicvit/), by name
    others_training: dict[str, dict[str, Any]] = field(default_factory=dict)  # and what their training recorded

    def _loaded(self) -> dict[str, DualEncoder]:
        """The loaded checkpoints by `MethodInfo.checkpoint`."""
        pruned = {} if self.pruned is None else {"pruned": self.pruned}
        return {"baseline": self.base, **pruned, **self.others}

    def serving(self, info: pruning.MethodInfo) -> DualEncoder:
        """The checkpoint a method runs on (`MethodInfo.checkpoint`)."""
        model = self._loaded().get(info.checkpoint)
        assert model is not None, f"{info.name} needs the {info.checkpoint} checkpoint, which was not loaded"
        return model

    def can_serve(self, info: pruning.MethodInfo) -> bool:
        """Whether the checkpoint `info` runs on is loaded."""
        return info.checkpoint in self._loaded()

    def training(self, info: pruning.MethodInfo) -> dict[str, Any]:
        """What the training of the checkpoint `info` runs on recorded."""
        recorded = {"baseline": self.base_training, "pruned": self.pruned_training, **self.others_training}
        return recorded.get(info.checkpoint, {})


def _load_models(checkpoints: Path, methods: Sequence[str], explicit: bool = True) -> _Models:
    base_dir, pruned_dir = checkpoints / "baseline", checkpoints / "pruned"
    base, tokenizer = load_checkpoint(base_dir)
    record = base_dir / "training.json"
    models = _Models(base, tokenizer, read_training(base_dir), folder=checkpoints, record=str(record))
    for name in sorted({pruning.get(m).checkpoint for m in methods} & set(pruning.OPTIONAL_CHECKPOINTS)):
        _load_other(models, checkpoints, name, [m for m in methods if pruning.get(m).checkpoint == name], explicit)
    need_pruned = [m for m in methods if pruning.get(m).checkpoint == "pruned"]
    if need_pruned:
        if not pruned_dir.is_dir():
            raise ValueError(f"{pruned_dir} is missing: train the pruned model, or leave {need_pruned} out of --methods.")
        models.pruned, _ = load_checkpoint(pruned_dir)
        models.pruned_training = read_training(pruned_dir)
        if models.pruned.cfg.vision != base.cfg.vision or models.pruned.cfg.pruning.stages != base.cfg.pruning.stages:
            raise ValueError(f"{pruned_dir} and {base_dir} have different image encoders; re-train the pruned model.")
    return models


def _load_other(models: _Models, checkpoints: Path, name: str, methods: list[str], explicit: bool) -> None:
    """Load ``CHECKPOINTS/name`` (dynamicvit/) into `models.others`, if it is there and was trained from this
    baseline. Missing or stale, it is an error when its methods were asked for by name, else they are left out."""
    folder = checkpoints / name
    problem = ""
    if not folder.is_dir():
        problem = f"{folder} is missing"
    else:
        try:
            models.others[name] = load_optional(folder, name, models.base)
            models.others_training[name] = read_training(folder)
        except ValueError as e:  # unreadable, or not made from this baseline
            problem = str(e)
    if problem:
        hint = f"train it: python -m training.{name} --checkpoints {checkpoints}"
        if explicit:
            raise ValueError(f"{problem}; {hint}, or leave {', '.join(methods)} out of --methods.")
        logger.info("Leaving out %s: %s (%s).", ", ".join(methods), problem, hint)


def _load_backbone(source: str, methods: Sequence[str], explicit: bool) -> _Models:
    """A HuggingFace CLIP, or an add-on with its backbone: one model serves every method it can run."""
    b = addon.load_backbone(source)
    need = [m for m in methods if pruning.get(m).checkpoint == "pruned"]  # an add-on's predictors
    if need and not b.has_predictors:
        train = f"train them with `{addon.train_command(source)}` and evaluate DIR"
        if explicit:
            raise ValueError(f"{source} has no trained keep predictors, which {', '.join(need)} needs: {train}, "
                             "or leave it out of --methods.")  # fmt: skip
        logger.info("Leaving out %s: %s has no trained keep predictors (%s).", ", ".join(need), source, train)
    model, folder = b.clip.model, b.addon or b.ref.folder
    return _Models(
        model, b.clip.tokenizer, {}, pruned=model if b.has_predictors else None, pruned_training=b.training,
        folder=folder, record=str(folder / addon.ADDON_FILE) if b.addon else f"The CLIP {source}",
        preprocess=b.clip.preprocess, backbone=b.ref.to_dict(),
    )  # fmt: skip


@dataclass
class _TestSet:
    """The test split with its caption embeddings and, from ``objects.json``, its ground truth."""

    root: Path
    data: EvalData
    text_emb: torch.Tensor  # (T, E) every caption
    pos_emb: torch.Tensor  # (N, E) caption #0 of each image
    synthetic: bool  # objects.json was found
    box_size: float  # the image side the boxes are measured in
    neg_emb: torch.Tensor | None = None  # (N, E) hard negatives; rows without one are ignored
    have_neg: torch.Tensor | None = None  # (N,) bool: the image has a hard negative; None if none has
    have_boxes: torch.Tensor | None = None  # (N,) bool: the image has object boxes; None if none has
    boxes: list[list[list[float]]] = field(default_factory=list)  # per image, [x0, y0, x1, y1] boxes
    oracle: dict[str, float] | None = None  # the R@1 ceiling (`training.oracle`); None without ground truth
    neg_kinds: list[str] = field(default_factory=list)  # per image, what its hard negative changed ("swap_color")

    def pair_acc(self, img: torch.Tensor, neg_img: torch.Tensor | None = None) -> float | None:
        """Hard-negative pair accuracy of (N, E) image embeddings (`neg_img`: pruned with the negatives)."""
        if self.have_neg is None or self.neg_emb is None:
            return None
        m = self.have_neg
        return M.pair_accuracy(img[m], self.pos_emb[m], self.neg_emb[m], None if neg_img is None else neg_img[m])

    def pair_by_kind(self, img: torch.Tensor) -> dict[str, dict[str, float]] | None:
        """Pair accuracy of (N, E) image embeddings per kind of hard negative: what the model tells apart."""
        if self.have_neg is None or self.neg_emb is None or not self.neg_kinds:
            return None
        out = {}
        for kind in sorted({k for k in self.neg_kinds if k}):
            m = self.have_neg & torch.tensor([k == kind for k in self.neg_kinds])
            out[kind] = {"images": int(m.sum()), "pair_acc": M.pair_accuracy(img[m], self.pos_emb[m], self.neg_emb[m])}
        return out

    def obj_recall(self, kept: torch.Tensor, grid: int) -> float | None:
        """Share of object patches among (N, k') kept positions; None without boxes."""
        if self.have_boxes is None:
            return None
        return M.object_recall(kept, self.boxes, grid, self.box_size)


def _load_test(root: Path, models: _Models, opts: _Options) -> _TestSet:
    """Load and embed the test split (captions once, with the baseline's text tower)."""
    size = models.base.cfg.vision.image_size
    split = load_splits(root)["test"]
    if len(split) == 0:
        raise ValueError(f"The test split of {root} has no images.")
    ed = eval_data(split, models.preprocess or size, opts.limit, opts.progress)
    text_emb = _encode_text(models.base, models.tokenizer, ed.captions)  # (T, E)
    first: dict[int, int] = {}
    for c, i in enumerate(ed.caption_to_image.tolist()):
        first.setdefault(i, c)
    pos_emb = text_emb[[first.get(i, 0) for i in range(len(ed.names))]]  # (N, E)
    objects = load_objects(root)
    test = _TestSet(root, ed, text_emb, pos_emb, synthetic=objects is not None, box_size=float(size))
    if objects is not None:
        _add_ground_truth(test, objects, models)
    return test


def _add_ground_truth(test: _TestSet, objects: dict[str, Any], models: _Models) -> None:
    """Hard negatives (pair accuracy) and boxes (object recall) of the test images, from objects.json."""
    records = [objects["images"].get(n) for n in test.data.names]
    have_neg = torch.tensor([bool(r and r.get("hard_negative")) for r in records])
    have_boxes = torch.tensor([bool(r and "objects" in r) for r in records])
    negs = [r["hard_negative"] if ok else "" for r, ok in zip(records, have_neg.tolist())]
    test.neg_kinds = [r.get("hard_negative_kind", "") if ok else "" for r, ok in zip(records, have_neg.tolist())]
    test.neg_emb = _encode_text(models.base, models.tokenizer, negs)  # (N, E); rows without a negative are ignored
    # The boxes are in pixels of the square synthetic image. The shipped model sees all of it (resized), a CLIP
    # may see a centre crop: the boxes move into the part the model sees, whose side is then the boxes' scale.
    side = objects.get("image_size", test.box_size)
    left, top, right, _ = crop_box((round(side), round(side)), models.preprocess or Preprocess(round(side)))
    test.boxes = [
        [[x0 - left, y0 - top, x1 - left, y1 - top] for x0, y0, x1, y1 in (o["box"] for o in r["objects"])]
        if ok else []
        for r, ok in zip(records, have_boxes.tolist())
    ]  # fmt: skip
    test.box_size = float(right - left)
    test.have_neg = have_neg if bool(have_neg.any()) else None
    test.have_boxes = have_boxes if bool(have_boxes.any()) else None
    ed = test.data
    try:
        owner = ed.caption_to_image.tolist()
        test.oracle = oracle.ground_truth_ceiling(ed.captions, owner, ed.names, objects["images"])
    except oracle.CaptionError as e:
        logger.warning("No R@1 ceiling: a test caption is not the generator's (%s).", e)


class _Rows:
    """The table: one row per (method, keep ratio, placement), ``none`` first as every row's reference.

    The baseline prunes nowhere, so it has one row, whatever the placements.
    """

    def __init__(self, models: _Models, test: _TestSet, opts: _Options):
        self.models, self.test, self.opts = models, test, opts
        # Costs from pruned/'s config where loaded: it has the keep predictors the trained methods run, as built;
        # dynamicvit's from its own checkpoint's, which flops derives (`vlm_demo.pruning.checkpoint_config`).
        self.cfg = (models.pruned or models.base).cfg
        self.base_gmacs = flops.gmacs(self.cfg, BASELINE, 1.0, 1)
        self.reference: _Pass | None = None  # the baseline's pass, reused by rows that compute the same
        self.reference_pair: float | None = None
        self.reference_by_kind: dict[str, dict[str, float]] | None = None  # the baseline's pair accuracy per kind
        self.rows: list[dict[str, Any]] = []
        # A fixed batch of real test images for latency (tiled when the split is smaller than the batch).
        lat_idx = torch.arange(LATENCY_BATCH) % len(test.data.names)
        self.lat_images = {1: test.data.images[:1], LATENCY_BATCH: test.data.images[lat_idx]}
        self.lat_text = {1: test.pos_emb[:1], LATENCY_BATCH: test.pos_emb[lat_idx]}

    def run(self) -> list[dict[str, Any]]:
        placements = self.opts.placements
        grid_rows = [(BASELINE, 1.0, placements[0])]
        pruned = [m for m in self.opts.methods if pruning.get(m).prunes]
        grid_rows += [(m, r, p) for p in placements for m in pruned for r in self.opts.keep_ratios]
        with logging_redirect_tqdm():
            bar = tqdm(grid_rows, desc="evaluate", unit="row", disable=not self.opts.progress)
            for method, r, p in bar:
                bar.set_postfix_str(f"{method} {r:g} {p}")
                self.rows.append(self._copy(method, r, p) or self._row(method, r, p))
                logger.info(_row_line(self.rows[-1]))
            bar.close()
        return self.rows

    def _blocks(self, method: str, placement: str) -> list[int]:
        return list(pruning.blocks_for(self.cfg, method, placement))  # dynamicvit's: its own checkpoint's

    def _copy(self, method: str, r: float, placement: str) -> dict[str, Any] | None:
        """The row of an earlier placement that puts `method`'s stages at the same blocks, relabelled; else None."""
        blocks = self._blocks(method, placement)
        for row in self.rows:
            if row["method"] == method and row["keep_ratio"] == r and row["stage_blocks"] == blocks:
                return {**row, "placement": placement, "same_as_placement": row["placement"]}
        return None

    def _row(self, method: str, r: float, placement: str) -> dict[str, Any]:
        info = pruning.get(method)
        model = self.models.serving(info)
        # An inactive spec on the baseline is the baseline itself: reuse its embeddings and timings.
        reuse = model is self.models.base and not (info.prunes and r < 1.0) and self.reference is not None
        recalls, pair, kept, tokens = self._accuracy(method, r, model, reuse, placement)
        g = flops.gmacs(self.cfg, method, r, 1, placement=placement)
        row: dict[str, Any] = {
            "method": method,
            "keep_ratio": r,
            "placement": placement,  # the baseline's one row serves every placement
            "stage_blocks": self._blocks(method, placement),
            "same_as_placement": None,  # the placement whose row this one copies (the same blocks)
            "checkpoint": info.checkpoint,  # a backbone's are one model
            "tokens": tokens,
            "gmacs": g,
            "gmacs_ratio": g / self.base_gmacs,
        }
        for k in RECALL_KS:
            for d in ("i2t", "t2i"):
                row[f"r{k}_{d}"] = None if recalls is None else recalls[f"r{k}_{d}"]
        for k in RECALL_KS:
            row[f"mean_r{k}"] = _mean(row[f"r{k}_i2t"], row[f"r{k}_t2i"])
        row["pair_acc"] = pair
        row["object_recall"] = None if kept is None else self.test.obj_recall(kept, self.cfg.vision.grid)
        kept_ratio = r if info.prunes and r < 1.0 else 1.0
        row["object_recall_random"] = M.random_expectation(kept_ratio, self.cfg.vision.num_patches)
        row["lossyness"] = M.lossyness(row["mean_r1"], self.rows[0]["mean_r1"] if self.rows else row["mean_r1"])
        row["same_as_baseline"] = reuse  # the row runs exactly the baseline's computation
        row.update(self._latency(model, method, r, reuse, placement))
        return row

    def _accuracy(
        self, method: str, r: float, model: DualEncoder, reuse: bool, placement: str
    ) -> tuple[dict[str, float] | None, float | None, torch.Tensor | None, list[int]]:
        """(retrieval recalls, pair accuracy, (N, k') kept positions, tokens per stage) of one row."""
        info = pruning.get(method)
        if reuse:
            ref = self.reference
            assert ref is not None
            # The method's stages, none of them pruning.
            tokens = flops.tokens_per_stage(self.cfg, method, r, placement=placement)
            return None if info.needs_caption else self._recalls(ref.emb), self.reference_pair, ref.kept, tokens
        if info.needs_caption:
            return None, *self._query_aware(method, r, model, placement)
        seed, where = self.opts.seed, placement
        run = self._encode(
            model, lambda s, e: PruneSpec(method, r, seed=seed + s, stages=where), f"{method} {r:g} {where}"
        )
        pair = self.test.pair_acc(run.emb)
        if not info.prunes:
            self.reference, self.reference_pair = run, pair
            self.reference_by_kind = self.test.pair_by_kind(run.emb)
        return self._recalls(run.emb), pair, run.kept, run.tokens

    def _query_aware(
        self, method: str, r: float, model: DualEncoder, placement: str
    ) -> tuple[float | None, torch.Tensor | None, list[int]]:
        """One pass per (image, caption) pair, so no retrieval recalls: (pair accuracy, kept, tokens)."""
        test, seed, where = self.test, self.opts.seed, placement
        if test.have_neg is None and test.have_boxes is None:
            return None, None, flops.tokens_per_stage(self.cfg, method, r, placement=placement)
        with_pos = self._encode(
            model, lambda s, e: PruneSpec(method, r, text=test.pos_emb[s:e], seed=seed, stages=where),
            f"{method} {r:g} {where} (caption)",
        )  # fmt: skip
        pair = None
        if test.have_neg is not None and test.neg_emb is not None:
            neg_emb = test.neg_emb
            with_neg = self._encode(
                model, lambda s, e: PruneSpec(method, r, text=neg_emb[s:e], seed=seed, stages=where),
                f"{method} {r:g} {where} (negative)",
            )  # fmt: skip
            pair = test.pair_acc(with_pos.emb, with_neg.emb)
        return pair, with_pos.kept, with_pos.tokens

    def _encode(self, model: DualEncoder, spec_for: Callable[[int, int], PruneSpec], desc: str) -> _Pass:
        return _encode_images(model, self.test.data.images, spec_for, self.opts.batch_size, desc, self.opts.progress)

    def _recalls(self, emb: torch.Tensor) -> dict[str, float]:
        return M.recall_at_k(emb @ self.test.text_emb.T, self.test.data.caption_to_image, RECALL_KS)

    def _latency(
        self, model: DualEncoder, method: str, r: float, reuse: bool, placement: str
    ) -> dict[str, Any]:
        """The row's latency fields: measured, copied from the baseline row (`reuse`), or null."""
        keys = [f"{key}_bs{bs}" for bs in self.lat_images for key in LATENCY_KEYS]
        if self.opts.latency is None:
            return dict.fromkeys(keys)
        if reuse:
            return {key: self.rows[0][key] for key in keys}  # the same code path: not timed twice
        base, result = self.models.base, {}
        for bs, x in self.lat_images.items():
            text = self.lat_text[bs] if pruning.get(method).needs_caption else None
            spec = PruneSpec(method, r, text=text, seed=self.opts.seed, stages=placement)
            variants = {"baseline": lambda: base.encode_image(x), "method": lambda: model.encode_image(x, spec)}
            t = interleaved(variants, self.opts.latency)
            b, m = t["baseline"], t["method"]
            result[f"latency_ms_bs{bs}"] = m.median_ms
            result[f"latency_iqr_ms_bs{bs}"] = m.iqr_ms
            result[f"baseline_latency_ms_bs{bs}"] = b.median_ms
            result[f"latency_ratio_bs{bs}"] = m.median_ms / b.median_ms if b.median_ms > 0 else None
        return result


def _metrics(models: _Models, test: _TestSet, rows: list[dict[str, Any]], opts: _Options) -> dict[str, Any]:
    """The metrics.json dict (before `_json_safe`)."""
    return {
        "dataset": {
            "root": str(test.root),
            "split": "test",
            "images": len(test.data.names),
            "captions": len(test.data.captions),
            "limit": opts.limit,
            "synthetic": test.synthetic,
            "pair_images": None if test.have_neg is None else int(test.have_neg.sum()),
        },
        "model": {**_config_summary(models.base), "backbone": models.backbone},
        "oracle": test.oracle,
        "training": _training_summary(models),
        "machine": _machine(opts.threads),
        "options": {
            "methods": opts.methods,
            "keep_ratios": opts.keep_ratios,
            "placements": opts.placements,
            "latency_repeats": None if opts.latency is None else opts.latency.repeats,
            "latency_budget_s": None if opts.latency is None else opts.latency.budget_s,
            "latency_batch_sizes": [1, LATENCY_BATCH],
            "batch_size": opts.batch_size,
            "seed": opts.seed,
        },
        "units": {
            "gmacs": "giga multiply-accumulates per image (fvcore; FLOPs = 2 x MACs)",
            "recall": "percent",
            "oracle": "percent, the expected R@1 of a ground-truth oracle with random tie-breaking (training.oracle)",
            "pair_acc": "percent",
            "pair_by_kind": "the baseline's pair accuracy, percent, per kind of hard negative (what it changed)",
            "object_recall": "fraction",
            "lossyness": "fraction, 1 - mean R@1 / mean R@1 of none",
            "latency": "milliseconds per call, median",
        },
        "rows": rows,
    }


def _training_summary(models: _Models) -> dict[str, Any]:
    """Training time and epochs per checkpoint, keyed by the methods each serves (none; learned, text_guided)."""
    by_method = {BASELINE: models.base_training}
    by_method.update((m, models.training(pruning.get(m))) for m in pruning.names() if models.can_serve(pruning.get(m))
                     and pruning.get(m).needs_predictor)  # fmt: skip
    return {
        "seconds_per_epoch": {m: t.get("seconds_per_epoch") for m, t in by_method.items()},
        "epochs": {m: t.get("epochs") for m, t in by_method.items()},
        "preset": models.base_training.get("preset") or models.pruned_training.get("preset"),
        "baseline": models.base_training,
        "pruned": models.pruned_training,
        **models.others_training,
    }


# ----------------------------------------------------------------------------- outputs


def _fmt(value: Any, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _row_line(row: dict[str, Any]) -> str:
    return (
        f"{row['method']:>13s} keep {row['keep_ratio']:.2f} {row['placement']} tokens {row['tokens']} "
        f"GMACs {row['gmacs']:.4f} ({row['gmacs_ratio']:.2f}x) mean R@1 {_fmt(row['mean_r1'])} "
        f"pair {_fmt(row['pair_acc'])} obj {_fmt(row['object_recall'], '.2f')} "
        f"bs32 {_fmt(row['latency_ms_bs32'], '.1f')} ms ({_fmt(row['latency_ratio_bs32'], '.2f')}x)"
    )


def _backbone_note(backbone: dict[str, Any] | None) -> str:
    """`` of the HuggingFace CLIP `owner/name` (revision r, commit c)`` for a backbone's report; "" otherwise."""
    if not backbone:
        return ""
    pins = [f"{k} {backbone[k]}" for k in ("revision", "commit") if backbone.get(k)]
    return f" of the HuggingFace CLIP `{backbone['source']}`" + (f" ({', '.join(pins)})" if pins else "")


def _finetune_note(finetune: dict[str, Any] | None) -> str:
    """The pruned checkpoint's image-tower fine-tune (`training.train`'s finetune phase), if it had one."""
    if not finetune:
        return ""
    return f"; then `pruned/`'s image tower fine-tuned, {finetune['steps']} steps in {finetune['seconds']:.1f} s"


def _trained_part(method: str) -> str:
    """What a method's training trained, for the report's seconds per epoch."""
    info = pruning.REGISTRY.get(method)
    checkpoint = info.checkpoint if info else "baseline" if method == BASELINE else "pruned"  # a method since removed
    return {"baseline": "baseline", "pruned": "keep predictors"}.get(checkpoint, "predictors and image tower")


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
        f"ViT width {mod['vision_width']} x {mod['vision_depth']} blocks, keep predictors before blocks "
        f"{', '.join(str(s) for s in mod['pruning_stages'])} (the `shared` placement); "
        f"{mod['params'] / 1e6:.2f} M parameters"
        + _backbone_note(mod.get("backbone"))
        + ".",
        f"- **Machine:** {mach['platform']} ({mach['processor']}), {mach['cpu_count']} CPUs, "
        f"torch {mach['torch']} with {mach['torch_threads']} threads.",
        "- **Training, seconds per epoch:** "
        + ", ".join(f"{m} ({_trained_part(m)}) {_fmt(v)}" for m, v in spe.items())
        + _finetune_note((tr.get("pruned") or {}).get("finetune"))
        + ".",
        f"- **Evaluation took** {m.get('seconds', 0):.0f} s.",
        f"- {compare.ceiling_line(m)}",
        "",
    ]
    placements = compare.placements(m)
    lines += ["## At matched GMACs", "", compare.MATCHED_NOTE, ""]
    for p in placements:
        lines += [f"**{compare.placement_label(m, p).capitalize()}:**", "", *compare.matched_table(m, p), ""]
    lines += [
        f"## Every measured row ({compare.placement_label(m, placements[0])})",
        "",
        "| method | keep | tokens | GMACs | GMACs ratio | R@1 i2t | R@1 t2i | mean R@1 | R@5 / R@10 mean "
        "| pair acc | obj recall (random) | lossy-ness | ms bs1 | ms bs32 | latency ratio bs32 |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in compare.rows_at(m, placements[0]):
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
        "## Placement ablation",
        "",
        "Where the stages sit: `paper` is each method's paper default for this depth (EViT inside blocks at 1/4, "
        "1/2 and 3/4, ToMe in every block), `shared` every method at the keep predictors' blocks. `learned` always "
        "runs the stages its predictors were trained for; a row marked (= paper) runs the same blocks as the paper "
        "placement and is copied from it. The baseline's row serves every placement.",
        "",
        *compare.ablation_table(m),
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
    with atomic_path(path) as tmp:
        plots.tradeoff_figure(m).savefig(tmp, dpi=110)
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
    p = cli.parser("python -m training.evaluate", __doc__)
    models = p.add_mutually_exclusive_group()
    models.add_argument("--checkpoints", default="checkpoints",
                        help="folder that holds baseline/, pruned/ and (optionally) dynamicvit/")  # fmt: skip
    models.add_argument("--backbone", default=None, metavar="SOURCE",
                        help="evaluate a HuggingFace CLIP (a folder or Hub id owner/name[@revision]), or the keep-"
                             "predictor add-on that python -m training.train --backbone wrote (default: none, use "
                             "--checkpoints)")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder for metrics.json, report.md, tradeoff.png (required)")
    p.add_argument("--data", default=None,
                   help="dataset root (default: the one recorded in baseline/training.json, or the "
                        "add-on's)")  # fmt: skip
    p.add_argument(
        "--methods", nargs="+", default=None, choices=pruning.names(), metavar="METHOD",
        help=f"methods to evaluate, of {', '.join(pruning.names())} (default: all that the model can run; "
        f"{BASELINE} is always included)",
    )  # fmt: skip
    p.add_argument(
        "--keep-ratios", nargs="+", type=float, default=list(DEFAULT_KEEP_RATIOS), metavar="RATIO",
        help=f"keep ratios in (0, 1] (default: {' '.join(f'{r:g}' for r in DEFAULT_KEEP_RATIOS)})",
    )  # fmt: skip
    p.add_argument(
        "--placements", nargs="+", default=list(DEFAULT_PLACEMENTS), choices=pruning.PLACEMENTS, metavar="PLACEMENT",
        help="where the stages sit, each evaluated: paper (each method's paper default), shared (every method at the "
        "config's pruning.stages); the first is the report's main one (default: paper shared)",
    )  # fmt: skip
    p.add_argument("--eval-limit", type=cli.positive_int, default=None,
                   help="evaluate only the first N test images (default: all)")  # fmt: skip
    p.add_argument("--latency-repeats", type=cli.positive_int, default=LATENCY.repeats,
                   help="timed calls per variant and batch size")  # fmt: skip
    p.add_argument(
        "--latency-budget", type=cli.positive_float, default=None,
        help=f"seconds of timing per row and batch size, then it stops, after at least {LATENCY.min_repeats} calls "
        "(default: no budget, always --latency-repeats)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=cli.positive_int, default=100, help="images per encoding batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method")
    p.add_argument("--threads", type=cli.positive_int, default=None,
                   help="torch threads (default: torch's current setting)")  # fmt: skip
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # The old spellings, hidden.
    hidden = {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
    p.add_argument("--limit", dest="eval_limit", type=cli.positive_int, **hidden)
    p.add_argument("--no-progress", dest="quiet", action="store_true", **hidden)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the metrics dict (also written to OUT/metrics.json).

    A user's mistake (a missing folder, a bad keep ratio) exits with code 2 and one ``error:`` line.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)
    with cli.user_errors(parser):
        return evaluate(
            args.checkpoints,
            args.out,
            args.data,
            backbone=args.backbone,
            methods=args.methods,
            keep_ratios=args.keep_ratios,
            placements=args.placements,
            limit=args.eval_limit,
            latency_repeats=args.latency_repeats,
            latency_budget_s=args.latency_budget,
            batch_size=args.batch_size,
            seed=args.seed,
            latency=not args.no_latency,
            threads=args.threads,
            progress=not args.quiet,
        )

if __name__ == "__main__":
    main()
