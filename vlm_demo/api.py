"""The one entry point for inference: `load` a `Session`, then `Session.analyze`.

Which checkpoint serves which method is the registry's answer (`MethodInfo.checkpoint`): ``learned``
and ``text_guided`` (trained keep predictors) run the ``pruned/`` checkpoint, ``dynamicvit`` its own
``dynamicvit/`` (DynamicViT's predictors and fine-tuned tower, `training.dynamicvit`; offered when the
folder is there), the training-free ones ``baseline/``. Every checkpoint shares the baseline's text tower
(it is frozen in every fine-tune; `load` checks ``dynamicvit/``'s, and leaves one from another baseline
out), so every image embedding is scored against the same caption embedding.

A HuggingFace CLIP (a folder or Hub id, see `vlm_demo.hf_clip`) loads as one model
serving both sides. It has no trained keep predictors (``Session.has_predictors`` is
False), so neither ``learned`` nor ``text_guided`` is among `Session.methods`, and asking for one raises a
ValueError that gives the command that trains them; the add-on folder that command
writes (`vlm_demo.addon`) loads with its backbone and has them.

A `Session` is read-only after `load`: requests keep their state local, so one
session can serve many threads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import addon, flops, hf_clip, overlay
from .flops import Placement
from .images import load_image
from .latency import LatencyProtocol, Timing, interleaved
from .model import DualEncoder, load_checkpoint, load_optional
from . import pruning
from .pruning import BASELINE, PruneSpec, Trace
from .tokenizer import TextTokenizer
from .transforms import Preprocess, to_batch, to_tensor, visible_region

log = logging.getLogger(__name__)

CAPTION_BANK_FILE = "caption_bank.json"
METRICS_FILE = "metrics.json"
SHIPPED_HUB_FILES = ("baseline/*", "pruned/*", *(f"{c}/*" for c in pruning.OPTIONAL_CHECKPOINTS), CAPTION_BANK_FILE,
                     METRICS_FILE)  # what `load` reads of a Hub repo  # fmt: skip
MAX_CAPTION_CHARS = 10_000


@dataclass
class Side:
    """One model's figures for one image and caption."""

    score: float  # cosine of the image and caption embeddings
    tokens: int  # patch tokens after the last stage (a fused token included)
    tokens_per_stage: list[int]  # patch tokens seen by each group of blocks
    gmacs: float  # fvcore GMACs of the image encoder, batch 1
    latency_ms: float  # median, batch 1, measured interleaved with the other side
    latency_iqr_ms: float  # inter-quartile range of the same samples
    latency_repeats: int  # measured passes behind the median (the time budget may stop short of the protocol's)
    top_captions: list[tuple[str, float]] = field(default_factory=list)  # best captions of the test-set bank
    bank_rank: int | None = None  # 1 + bank captions this image scores above the caption (1: the caption wins)
    bank_probability: float | None = None  # the caption's softmax probability against the bank, at logit_scale


@dataclass
class Analysis:
    """The result of `Session.analyze`; `to_dict` is the JSON readout."""

    method: str
    keep_ratio: float
    placement: str | list[int]  # where the stages sat: "paper", "shared" or block indices
    caption: str
    baseline: Side
    pruned: Side
    trace: Trace
    overlays: dict[str, Image.Image]  # "kept", "stages", and "heatmap" / "groups" where they apply
    latency_bs32: dict[str, Timing] | None = None  # "baseline" / "pruned" at batch 32, if measured
    caption_truncated: bool = False  # the caption was longer than the text encoder's context

    def to_dict(self) -> dict[str, Any]:
        def side(s: Side, with_stages: bool) -> dict[str, Any]:
            d = {
                "score": round(s.score, 6),
                "tokens": s.tokens,
                "gmacs": round(s.gmacs, 6),
                "latency_ms": round(s.latency_ms, 4),
                "latency_iqr_ms": round(s.latency_iqr_ms, 4),
                "latency_repeats": s.latency_repeats,
                "top_captions": [[c, round(v, 4)] for c, v in s.top_captions],
                "bank_rank": s.bank_rank,
                "bank_probability": None if s.bank_probability is None else round(s.bank_probability, 6),
            }
            if with_stages:
                d["tokens_per_stage"] = s.tokens_per_stage
            return d

        out = {
            "method": self.method,
            "keep_ratio": self.keep_ratio,
            "placement": self.placement,
            "baseline": side(self.baseline, True),
            "pruned": side(self.pruned, True),
            "score_delta": round(self.pruned.score - self.baseline.score, 6),
            "gmacs_ratio": round(self.pruned.gmacs / self.baseline.gmacs, 4),
            "latency_ratio": round(self.pruned.latency_ms / self.baseline.latency_ms, 4),
            "caption_truncated": self.caption_truncated,
        }
        if self.latency_bs32 is not None:
            out["latency_bs32_ms"] = {k: round(v.median_ms, 3) for k, v in self.latency_bs32.items()}
        return out


@dataclass
class MethodSummary:
    """One method's result for the side-by-side comparison."""

    method: str
    score: float
    tokens_per_stage: list[int]
    gmacs: float
    overlay: Image.Image
    keep_ratio: float  # the nominal keep ratio it ran at (matched to `gmacs_ratio` when `compare` was given one)
    gmacs_ratio: float  # its GMACs over the baseline's

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "overlay"}


SWEEP_STOPS = tuple(round(0.04 * i, 2) for i in range(1, 26))  # the slider's 25 stops, 0.04 apart


@dataclass
class SweepStop:
    """One keep ratio of a `Sweep`."""

    keep_ratio: float
    score: float  # cosine of the pruned image embedding and the caption's, as `analyze` reports it
    tokens: int  # patch tokens after the last stage (a fused token included)
    tokens_per_stage: list[int]  # patch tokens before the first stage and after each one
    gmacs: float  # fvcore GMACs of the image encoder, batch 1
    kept: list[int]  # original patch positions that survive the last stage; -1 is a fused token
    trace: Trace = field(repr=False)  # for overlays; left out of `to_dict`

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep_ratio": self.keep_ratio,
            "score": round(self.score, 6),
            "tokens": self.tokens,
            "tokens_per_stage": self.tokens_per_stage,
            "gmacs": round(self.gmacs, 6),
            "kept": self.kept,
        }


@dataclass
class Sweep:
    """Every slider stop for one image, caption and method (see `Session.sweep`)."""

    method: str
    placement: str | list[int]  # where the stages sat (see `Analysis.placement`)
    caption: str
    image: Image.Image = field(repr=False)  # what the model saw of the upload (CLIP: the centre crop)
    baseline_score: float
    baseline_gmacs: float
    stops: list[SweepStop]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "placement": self.placement,
            "baseline": {"score": round(self.baseline_score, 6), "gmacs": round(self.baseline_gmacs, 6)},
            "stops": [s.to_dict() for s in self.stops],
        }


# `Session.latency` at batch 1: at most 1 s of measuring per request, so a model 100x costlier than the shipped
# one still answers in time (with at least 3 interleaved pairs); `latency_repeats` overrides the repeats.
LATENCY_BS1 = LatencyProtocol(warmup=2, repeats=10, budget_s=1.0, min_repeats=3)
LATENCY_BS32 = LatencyProtocol(warmup=1, repeats=3)  # `Session.analyze(batch32=True)`: each call is ~30x the work


@dataclass
class _Request:
    """One validated image and caption, decoded and encoded once."""

    image: Image.Image  # RGB, as `vlm_demo.images.load_image` returns it
    caption: str  # stripped
    truncated: bool  # longer than the text encoder's context
    pixels: torch.Tensor  # (1, 3, S, S)
    text: torch.Tensor  # (1, E) normalised caption embedding


class Session:
    """Both checkpoints, loaded once. Build with `load`.

    Args:
        baseline: the baseline model.
        pruned: the model fine-tuned with learned pruning.
        tokenizer: the shared tokenizer.
        source: where the checkpoints came from (for display).
        caption_bank: captions to rank for `top_captions` (e.g. the test split).
        metrics: the evaluation's metrics.json, if shipped.
        preprocess: how images become pixels; None is the shipped model's square resize.
        has_predictors: whether `pruned` has trained keep predictors (False for a plain HuggingFace CLIP);
            without them the methods that need one are refused.
        train_hint: the command that trains the missing predictors, for that refusal's message.
        others: the other checkpoints, by folder name (``dynamicvit``); a method whose checkpoint is
            missing is not offered.
    """

    def __init__(
        self,
        baseline: DualEncoder,
        pruned: DualEncoder,
        tokenizer: TextTokenizer,
        source: str = "",
        caption_bank: list[str] | None = None,
        metrics: dict[str, Any] | None = None,
        preprocess: Preprocess | None = None,
        has_predictors: bool = True,
        train_hint: str = "",
        others: dict[str, DualEncoder] | None = None,
    ):
        self.baseline, self.pruned, self.tokenizer = baseline.eval(), pruned.eval(), tokenizer
        self.source, self.metrics = source, metrics
        self.cfg = pruned.cfg  # the towers' and, for costs, the keep predictors as built (in pruned/)
        self.preprocess = preprocess or Preprocess(self.cfg.vision.image_size)
        self._latency: dict[tuple[str, float, LatencyProtocol, str], dict[str, Timing]] = {}
        self.has_predictors = has_predictors
        self.others = {name: m.eval() for name, m in (others or {}).items()}
        # The checkpoints this session serves, by `MethodInfo.checkpoint`; pruned/ only with trained predictors.
        pruned_ok = {"pruned": self.pruned} if has_predictors else {}
        self._serving = {"baseline": self.baseline, **pruned_ok, **self.others}
        self.train_hint = train_hint or addon.train_command(source or "SOURCE")
        self.device = next(baseline.parameters()).device
        self.caption_bank = list(caption_bank or [])
        self._bank = self._embed_ids(tokenizer.encode_batch(self.caption_bank)) if self.caption_bank else None

    # ------------------------------------------------------------------ embeddings

    def methods(self, prunes_only: bool = False, image_only: bool = False) -> tuple[str, ...]:
        """The registered methods this session can run, filtered as `vlm_demo.pruning.names` filters.

        A method that needs trained keep predictors is in only when the session has its checkpoint.
        """
        names = pruning.names(prunes_only=prunes_only, image_only=image_only)
        return tuple(m for m in names if pruning.get(m).checkpoint in self._serving)

    def method_info(self, method: str) -> pruning.MethodInfo:
        """The registry's entry for `method`.

        Raises:
            ValueError: for an unknown method, or one that needs keep predictors this session does not have
                (the message gives the command that trains them).
        """
        info = pruning.get(method)
        if info.checkpoint in pruning.OPTIONAL_CHECKPOINTS and info.checkpoint not in self._serving:
            raise ValueError(
                f"{method!r} runs its own checkpoint, {info.checkpoint}/, and {self.source or 'this model'} has none "
                f"(or one trained from another baseline). Train it from a checkpoints folder's baseline/ (not a "
                f"HuggingFace CLIP): `python -m training.{info.checkpoint} --checkpoints DIR`. "
                f"This model runs {', '.join(self.methods())}."
            )
        if info.checkpoint == "pruned" and not self.has_predictors:
            raise ValueError(
                f"{method!r} needs trained keep predictors, and {self.source or 'this model'} has none. "
                f"Train them: `{self.train_hint}`, then load DIR. "
                f"This model runs {', '.join(self.methods())}."
            )
        return info

    def model_for(self, method: str) -> DualEncoder:
        """The checkpoint that serves `method` (refused as `method_info` refuses)."""
        return self._serving[self.method_info(method).checkpoint]

    @torch.inference_mode()
    def _embed_ids(self, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        parts = [self.baseline.encode_text(ids[i : i + chunk].to(self.device)) for i in range(0, len(ids), chunk)]
        return torch.cat(parts) if parts else torch.empty(0, self.cfg.embed_dim)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(N, E) L2-normalised caption embeddings."""
        if isinstance(texts, str):
            raise ValueError("embed_texts takes a list of captions, not one string.")
        return self._embed_ids(self.tokenizer.encode_batch(texts)).cpu().numpy()

    @torch.inference_mode()
    def embed_images(
        self, images: list[Any], method: str = BASELINE, keep_ratio: float = 1.0, batch_size: int = 64, seed: int = 0
    ) -> np.ndarray:
        """(N, E) L2-normalised image embeddings under a pruning method.

        Args:
            images: paths, bytes or PIL images.
            method: a method that needs no caption (``pruning.names(image_only=True)``); for the others use
                `analyze`.
            keep_ratio: see `vlm_demo.pruning`.
            batch_size: images per forward pass; every image in a pass keeps the same count.
            seed: seed of ``random``.
        """
        if self.method_info(method).needs_caption:
            others = ", ".join(self.methods(image_only=True))
            raise ValueError(f"{method} needs a caption: use analyze(), or one of {others}.")
        model, spec = self.model_for(method), PruneSpec(method, keep_ratio, seed=seed)
        out = []
        for i in range(0, len(images), batch_size):
            pixels = to_batch([load_image(im) for im in images[i : i + batch_size]], self.preprocess).to(self.device)
            out.append(model.encode_image(pixels, spec))
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, self.cfg.embed_dim), np.float32)

    def standing(self, embedding: torch.Tensor, score: float) -> tuple[int | None, float | None]:
        """Where a caption with cosine `score` stands among the bank's captions for one (E,) image embedding.

        A readout a person can read, beside the raw cosine (whose range depends on the
        model): the caption's rank against every bank caption (1 = none scores higher),
        and its probability when the model picks one caption out of the bank plus it,
        a softmax at the model's own ``logit_scale`` as in its contrastive training.

        Returns:
            (rank, probability), or (None, None) without a caption bank.
        """
        if self._bank is None:
            return None, None
        sims = self._bank @ embedding.to(self._bank.dtype)  # (N,)
        rank = 1 + int((sims > score).sum())
        scale = float(self.baseline.logit_scale.detach().exp().clamp(max=100))  # CLIP clamps the scale at 100
        logits = torch.cat([torch.tensor([score], dtype=sims.dtype, device=sims.device), sims]) * scale
        return rank, float(logits.softmax(0)[0])

    def top_captions(self, embedding: torch.Tensor, k: int = 3) -> list[tuple[str, float]]:
        """The `k` captions of the bank closest to one (E,) image embedding, with cosines."""
        if self._bank is None:
            return []
        sims = self._bank @ embedding.to(self._bank.dtype)
        values, idx = sims.topk(min(k, len(self.caption_bank)))
        return [(self.caption_bank[i], float(v)) for v, i in zip(values.tolist(), idx.tolist())]

    # ------------------------------------------------------------------ analysis

    def check_caption(self, caption: str) -> tuple[str, bool]:
        """Validate a caption; returns it stripped and whether it will be truncated."""
        if not isinstance(caption, str):
            raise ValueError("The caption must be text.")
        caption = caption.strip()
        if not caption:
            raise ValueError("Enter a caption describing the image, e.g. 'a red circle at the top left'.")
        if len(caption) > MAX_CAPTION_CHARS:
            raise ValueError(f"The caption is {len(caption):,} characters; keep it under {MAX_CAPTION_CHARS:,}.")
        fit = self.tokenizer.fit(caption)
        if not fit.readable:
            raise ValueError("The caption has no words the model can read (letters or digits); try plain English.")
        return caption, fit.truncated

    @torch.inference_mode()
    def analyze(
        self,
        image: Any,
        caption: str,
        method: str = "learned",
        keep_ratio: float = 0.5,
        latency_repeats: int = LATENCY_BS1.repeats,
        style: str = "dim",
        batch32: bool = False,
        seed: int = 0,
        placement: Placement = None,
    ) -> Analysis:
        """Score one image and caption with the full and the pruned model, and measure both.

        Args:
            image: a path, bytes or PIL image (decoded safely by `vlm_demo.images`).
            caption: the text to align with the image.
            method: a registered pruning method (`vlm_demo.pruning.names`).
            keep_ratio: see `vlm_demo.pruning`.
            latency_repeats: measured batch-1 passes per model (interleaved, after `LATENCY_BS1.warmup`
                warm-up passes).
            style: the kept-patch overlay style, one of `vlm_demo.overlay.STYLES`.
            batch32: also time both models at batch 32 (about 30x the work), under `LATENCY_BS32`.
            seed: seed of ``random``.
            placement: where the stages sit: ``"paper"``, ``"shared"`` or block indices
                (`vlm_demo.pruning.resolve_stages`); None is the model config's ``pruning.placement``.

        Returns:
            The `Analysis`.

        Raises:
            ValueError: for a bad image, caption, method or keep ratio, with a message for the user.
        """
        info = self.method_info(method)
        if style not in overlay.STYLES:
            raise ValueError(f"Unknown overlay style {style!r}; choose one of {', '.join(overlay.STYLES)}.")
        if not 1 <= int(latency_repeats) <= 200:
            raise ValueError("latency_repeats must be between 1 and 200.")
        request = self._request(image, caption)
        spec = self._spec(method, keep_ratio, request.text, seed, placement)
        model = self.model_for(method)
        z_base = self.baseline.encode_image(request.pixels)
        z_pruned, trace = model.encode_image_with_trace(request.pixels, spec)
        per_stage = trace.tokens_per_stage()
        protocol = LATENCY_BS1.replace(repeats=int(latency_repeats))
        timing = self.latency(method, spec.keep_ratio, protocol, placement=placement)
        gmacs_base = flops.gmacs(self.cfg, BASELINE)
        gmacs = self._gmacs(spec)
        bs32 = None
        if batch32:
            bs32 = self._time(model, request.pixels.expand(32, -1, -1, -1).contiguous(), spec, LATENCY_BS32)
        return Analysis(
            method=method,
            keep_ratio=spec.keep_ratio,
            placement=self.placement_name(placement),
            caption=request.caption,
            # The baseline's tokens, stage for stage with the pruned side's.
            baseline=self._side(z_base, [per_stage[0]] * len(per_stage), request.text, gmacs_base, timing["baseline"]),
            pruned=self._side(z_pruned, per_stage, request.text, gmacs, timing["pruned"]),
            trace=trace,
            overlays=self._overlays(request.image, trace, info, style),
            latency_bs32=bs32,
            caption_truncated=request.truncated,
        )

    @torch.inference_mode()
    def compare(
        self, image: Any, caption: str, keep_ratio: float = 0.5, style: str = "dim",
        methods: tuple[str, ...] | None = None, gmacs_ratio: float | None = None, placement: Placement = None,
    ) -> list[MethodSummary]:  # fmt: skip
        """Every method side by side: overlay, score and GMACs (no latency, to stay quick).

        Args:
            image: a path, bytes or PIL image.
            caption: the text to align with the image.
            keep_ratio: the nominal keep ratio of every method, when `gmacs_ratio` is None.
            style: the overlay style.
            methods: None is every method the session runs; one it cannot run raises a ValueError.
            gmacs_ratio: compare at matched compute instead: each method runs at the keep ratio (to 0.01)
                whose GMACs, scoring included, come closest to this share of the baseline's
                (`flops.keep_ratio_for`). The papers count keep rates differently, so one nominal keep
                ratio costs each method something else.
            placement: where the stages sit (see `analyze`).
        """
        methods = self.methods(prunes_only=True) if methods is None else methods
        for m in methods:
            self.method_info(m)
        if gmacs_ratio is not None and not 0.0 < float(gmacs_ratio) <= 1.0:
            raise ValueError(f"gmacs_ratio must be in (0, 1], got {gmacs_ratio!r}.")
        request = self._request(image, caption)
        base = flops.gmacs(self.cfg, BASELINE)
        out = []
        for m in methods:
            r = keep_ratio if gmacs_ratio is None else flops.keep_ratio_for(self.cfg, m, float(gmacs_ratio), placement)
            spec = self._spec(m, r, request.text, 0, placement)
            z, trace = self.model_for(m).encode_image_with_trace(request.pixels, spec)
            gmacs = self._gmacs(spec)
            out.append(
                MethodSummary(
                    method=m,
                    score=float(z[0] @ request.text[0]),
                    tokens_per_stage=trace.tokens_per_stage(),
                    gmacs=gmacs,
                    overlay=overlay.kept_overlay(request.image, trace, style=style),
                    keep_ratio=spec.keep_ratio,
                    gmacs_ratio=gmacs / base,
                )
            )
        return out

    def placement_name(self, placement: Placement = None) -> str | list[int]:
        """How a result names its placement: the one asked for, else the config's."""
        where = self.cfg.pruning.placement if placement is None else placement
        return where if isinstance(where, str) else [int(b) for b in where]

    def _spec(
        self, method: str, keep_ratio: float, text: torch.Tensor, seed: int = 0, placement: Placement = None
    ) -> PruneSpec:
        """The `PruneSpec` of one pass: the caption only for a method that reads it; None placement: the config's."""
        info = pruning.get(method)
        where = None if placement is None else placement if isinstance(placement, str) else tuple(placement)
        return PruneSpec(method, float(keep_ratio), text=text if info.needs_caption else None, seed=seed, stages=where)

    def _gmacs(self, spec: PruneSpec) -> float:
        """fvcore GMACs of one batch-1 pass under `spec` (the baseline's where nothing is pruned)."""
        if not pruning.get(spec.method).prunes:
            return flops.gmacs(self.cfg, spec.method, 1.0)
        return flops.gmacs(self.cfg, spec.method, spec.keep_ratio, placement=spec.stages)

    def _request(self, image: Any, caption: str) -> _Request:
        """Validate and encode the inputs of `analyze` and `compare`."""
        caption, truncated = self.check_caption(caption)
        img = load_image(image)
        pixels = to_tensor(img, self.preprocess)[None].to(self.device)  # (1, 3, S, S)
        img = visible_region(img, self.preprocess)  # overlays cover what the model saw
        text = self._embed_ids(self.tokenizer.encode_batch([caption]))  # (1, E)
        return _Request(image=img, caption=caption, truncated=truncated, pixels=pixels, text=text)

    def latency(
        self, method: str, keep_ratio: float, protocol: LatencyProtocol = LATENCY_BS1, placement: Placement = None
    ) -> dict[str, Timing]:
        """Batch-1 latency of the baseline and of `method` at `keep_ratio`, measured once per session.

        The cost of a pass depends on the method and keep ratio, not on the picture or the
        caption, so it is measured on a fixed input and cached per (method, keep ratio,
        protocol, placement): a repeated setting costs nothing, and the slider's stops are
        measured once each.

        Returns:
            "baseline" and "pruned" `Timing`s (interleaved A B A B).
        """
        info = pruning.get(method)
        where = self.placement_name(placement) if info.prunes else None
        key = (method, float(keep_ratio) if info.prunes else 1.0, protocol, json.dumps(where))
        if key not in self._latency:
            size = self.cfg.vision.image_size
            pixels = torch.zeros(1, 3, size, size, device=self.device)
            text = F.normalize(torch.ones(1, self.cfg.embed_dim, device=self.device), dim=-1)
            spec = self._spec(method, key[1], text, 0, placement)
            self._latency[key] = self._time(self.model_for(method), pixels, spec, protocol)
        return self._latency[key]

    def _time(
        self, model: DualEncoder, pixels: torch.Tensor, spec: PruneSpec, protocol: LatencyProtocol
    ) -> dict[str, Timing]:
        """The baseline and `model` under `spec` on `pixels`, timed interleaved: "baseline" / "pruned"."""
        base = self.baseline
        variants = {"baseline": lambda: base.encode_image(pixels), "pruned": lambda: model.encode_image(pixels, spec)}
        return interleaved(variants, protocol)

    def _side(self, z: torch.Tensor, per_stage: list[int], text: torch.Tensor, gmacs: float, timing: Timing) -> Side:
        """One model's figures from its (1, E) image embedding, tokens per stage and timing."""
        score = float(z[0] @ text[0])
        rank, probability = self.standing(z[0], score)
        return Side(
            score=score,
            bank_rank=rank,
            bank_probability=probability,
            tokens=per_stage[-1],
            tokens_per_stage=per_stage,
            gmacs=gmacs,
            latency_ms=timing.median_ms,
            latency_iqr_ms=timing.iqr_ms,
            latency_repeats=timing.repeats,
            top_captions=self.top_captions(z[0]),
        )

    @staticmethod
    def _overlays(img: Image.Image, trace: Trace, info: pruning.MethodInfo, style: str) -> dict[str, Image.Image]:
        """The overlays that apply to the method: kept patches and stages always, heatmap and groups if any."""
        overlays = {
            "kept": overlay.kept_overlay(img, trace, style=style),
            "stages": overlay.stage_strip(img, trace, style=style),
        }
        heat = overlay.heatmap_overlay(img, trace)
        if heat is not None:
            overlays["heatmap"] = heat
        if info.reduction == "merge":
            groups = overlay.groups_overlay(img, trace)
            if groups is not None:
                overlays["groups"] = groups
        return overlays

    def warm_gmacs(self, keep_ratios: list[float], methods: tuple[str, ...] | None = None) -> None:
        """Fill the GMACs cache ahead of requests (fvcore traces take ~0.2 s each)."""
        for r in keep_ratios:
            for m in self.methods() if methods is None else methods:
                flops.gmacs(self.cfg, m, r)

    @torch.inference_mode()
    def sweep(
        self,
        image: Any,
        caption: str,
        method: str = "learned",
        stops: tuple[float, ...] = SWEEP_STOPS,
        seed: int = 0,
        placement: Placement = None,
    ) -> Sweep:
        """Every slider stop of one (image, caption, method) at once: what the page scrubs through.

        Each stop is the same batch-1 pass as `analyze` at that keep ratio, so its score,
        tokens and GMACs equal `analyze`'s; no latency is measured here. Different keep
        ratios give different token counts, so the stops cannot share one batch.

        Args:
            image: a path, bytes or PIL image.
            caption: the text to align with the image.
            method: a registered pruning method.
            stops: the keep ratios, each in (0, 1]; a caller that wants one stop at once
                (the slider's) sweeps it alone first.
            seed: seed of ``random``.
            placement: where the stages sit (see `analyze`).

        Returns:
            The `Sweep`, its stops in the order of `stops`.
        """
        info = self.method_info(method)
        request = self._request(image, caption)
        pixels, text = request.pixels, request.text
        model = self.model_for(method)
        out: list[SweepStop] = []
        for ratio in stops:
            spec = self._spec(method, ratio, text, seed, placement)
            z, trace = model.encode_image_with_trace(pixels, spec)
            per_stage = trace.tokens_per_stage()
            kept = trace.stages[-1].kept[0].tolist() if trace.stages else list(range(trace.num_patches))
            out.append(SweepStop(
                keep_ratio=spec.keep_ratio,
                score=float(z[0] @ text[0]),
                tokens=per_stage[-1],
                tokens_per_stage=per_stage,
                gmacs=self._gmacs(spec),
                kept=kept,
                trace=trace,
            ))  # fmt: skip
        base = self.baseline.encode_image(pixels)
        return Sweep(
            method=method,
            placement=self.placement_name(placement),
            caption=request.caption,
            image=request.image,
            baseline_score=float(base[0] @ text[0]),
            baseline_gmacs=flops.gmacs(self.cfg, BASELINE, 1.0),
            stops=out,
        )


def load(source: str | os.PathLike = "checkpoints", device: str = "cpu") -> Session:
    """Load the baseline and pruned checkpoints, a HuggingFace CLIP, or a CLIP's keep-predictor add-on.

    Args:
        source: a folder holding ``baseline/`` and ``pruned/`` (and optionally
            ``caption_bank.json`` and ``metrics.json``); a HuggingFace CLIP folder (see
            `vlm_demo.hf_clip`); an add-on folder that ``python -m training.train --backbone``
            wrote (see `vlm_demo.addon`), which loads the CLIP it names with its trained keep
            predictors; or a Hub repo id of any of these, ``owner/name`` or
            ``owner/name@revision``. A local folder never touches the network.
        device: ``cpu`` or ``cuda``.

    Returns:
        The `Session`.

    Raises:
        ValueError: when the folder is missing or incomplete.
        ConnectionError: when a Hub repo cannot be fetched.
    """
    src = str(source)
    ref = addon.locate(src, [*hf_clip.HUB_FILES, *SHIPPED_HUB_FILES, *addon.ADDON_FILES])
    folder = ref.folder
    if not folder.is_dir():
        raise ValueError(
            f"No checkpoints at {src!r}. Train them with `python -m training.train` "
            "or pass a folder (or Hub repo id) that holds baseline/ and pruned/."
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu.")
    if hf_clip.is_clip_folder(folder) or addon.is_addon(folder):
        b = addon.load_backbone(ref, device)
        m = b.clip.model
        return Session(
            m, m, b.clip.tokenizer, source=src, preprocess=b.clip.preprocess, has_predictors=b.has_predictors
        )
    if not (folder / "baseline").is_dir():
        raise ValueError(f"{folder} has no baseline/ checkpoint. Train one with `python -m training.train`.")
    baseline, tokenizer = load_checkpoint(folder / "baseline", device)
    has_pruned = (folder / "pruned").is_dir()
    pruned = load_checkpoint(folder / "pruned", device)[0] if has_pruned else baseline
    others = {}
    for name in pruning.OPTIONAL_CHECKPOINTS:
        if (folder / name).is_dir():
            try:
                others[name] = load_optional(folder / name, name, baseline, device)
            except ValueError as e:  # optional: the app still serves every other method
                log.warning("Not serving %s: %s; retrain it with python -m training.%s --checkpoints %s", name, e,
                            name, folder)  # fmt: skip
    bank_file, metrics_file = folder / CAPTION_BANK_FILE, folder / METRICS_FILE
    bank = json.loads(bank_file.read_text())["captions"] if bank_file.is_file() else None
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return Session(
        baseline, pruned, tokenizer, source=src, caption_bank=bank, metrics=metrics, has_predictors=has_pruned,
        train_hint=f"python -m training.train --phases pruned,finetune --out {src}", others=others,
    )  # fmt: skip
