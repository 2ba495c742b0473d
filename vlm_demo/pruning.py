"""Visual token pruning: one registry of pure functions, plus the trace they leave.

Shape legend: B batch, n patch tokens entering a stage, k patch tokens leaving
it, P patches of the full grid, C token width, d head width. Token tensors are
``(B, 1 + n, C)`` with the CLS token first; the CLS token is never pruned.

**Keep ratio** (defined here, once): the fraction ``r`` in (0, 1] of the P
patch tokens that are still tokens after the *last* pruning stage. With S
stages the schedule is geometric, so stage ``s`` (1-based) leaves
``round(P * r ** (s / S))`` patch tokens (at least 1). Every sample of a batch
keeps the same count. ``r = 1`` is the identity for every method. See
`keep_counts`.

Each method maps the tokens of one stage and a keep count ``k`` to a
`Reduction`. Dropping methods keep the top-k patches by a per-patch score;
``tome`` merges instead of dropping (bipartite soft matching).

`REGISTRY` holds one `MethodInfo` per method: its function, the signals it
needs, whether it fuses or merges, which weights it runs on, its display name,
one line and its paper. The model, flops, the api, the evaluation and the app
ask the registry; adding a method is one `register` call.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

@dataclass(frozen=True)
class PruneSpec:
    """What to prune in one forward pass.

    Args:
        method: a registered method name (see `names`).
        keep_ratio: see the module docstring; in (0, 1].
        text: (B, E) or (1, E) normalised caption embeddings, needed by ``text_guided``.
        seed: seed of ``random``; the same seed keeps the same patches.
        fuse: ``cls_attention`` only: fuse the dropped tokens into one extra token, as EViT
            evaluates it (the default); False is the ablation without it.
        stages: where the stages sit: ``"paper"`` (each method's paper default for the
            depth), ``"shared"`` (every method at the config's ``pruning.stages``), block
            indices, or None for the config's ``pruning.placement``. See `resolve_stages`.
    """

    method: str = "none"
    keep_ratio: float = 1.0
    text: torch.Tensor | None = None
    seed: int = 0
    fuse: bool = True
    stages: str | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        info = get(self.method)
        if not (isinstance(self.keep_ratio, (int, float)) and 0.0 < self.keep_ratio <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}.")
        if info.needs_caption and self.text is None:
            raise ValueError(f"{self.method} pruning needs a caption embedding (PruneSpec.text).")

    @property
    def active(self) -> bool:
        """False when the pass is the unpruned model."""
        return get(self.method).prunes and self.keep_ratio < 1.0


def keep_counts(num_patches: int, keep_ratio: float, num_stages: int) -> list[int]:
    """Patch tokens left after each stage: ``round(P * r ** (s / S))``, at least 1.

    Args:
        num_patches: P, the patches of the full grid.
        keep_ratio: r in (0, 1].
        num_stages: S.

    Returns:
        S non-increasing counts; the last is ``round(P * r)``.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}.")
    return [max(1, round(num_patches * keep_ratio ** (s / num_stages))) for s in range(1, num_stages + 1)]


@dataclass
class Signals:
    """What a stage may score with; each method reads only its own field.

    Attributes:
        cls_attn: (B, n) previous block's CLS attention to each patch, mean over heads.
        keys: (B, n, d) previous block's keys of the patch tokens, mean over heads (ToMe metric).
        predictor: (B, n) keep logits of the learned predictor.
        text: (B, n) keep logits of the caption-conditioned predictor (`QueryKeepPredictor`).
        size: (B, 1 + n) tokens' sizes (patches merged into each), for ToMe.
        generator: the seeded generator of ``random``.
        fuse: fuse the dropped tokens into one (``cls_attention``).
    """

    cls_attn: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    predictor: torch.Tensor | None = None
    text: torch.Tensor | None = None
    size: torch.Tensor | None = None
    generator: torch.Generator | None = None
    fuse: bool = False


@dataclass
class Reduction:
    """The result of one stage.

    Attributes:
        x: (B, 1 + k', C) new tokens, CLS first (k' = k, or k + 1 with a fused token).
        source: (B, n) new patch-token index (0..k'-1) each old patch token went to, -1 if dropped.
        rep: (B, k') old patch-token index that represents each new token, -1 for a fused token.
        size: (B, 1 + k') new tokens' sizes (ToMe), else None.
        scores: (B, n) importance of the old patch tokens (higher keeps), else None.
    """

    x: torch.Tensor
    source: torch.Tensor
    rep: torch.Tensor
    size: torch.Tensor | None = None
    scores: torch.Tensor | None = None


@dataclass
class Stage:
    """One pruning stage, in original patch positions (0..P-1, row-major).

    Attributes:
        block: index of the block the stage runs before.
        kept: (B, k') original positions of the surviving patch tokens; -1 marks a fused token.
        groups: (B, P) token (0..k'-1) each original patch now belongs to, -1 if dropped.
        scores: (B, P) importance at this stage; NaN where the patch was already gone; None if the method has none.
    """

    block: int
    kept: torch.Tensor
    groups: torch.Tensor
    scores: torch.Tensor | None = None


@dataclass
class Trace:
    """What pruning did in one forward pass; overlays and tests read only this."""

    method: str
    grid: int
    stage_blocks: tuple[int, ...] = ()  # the blocks where the method's stages sit, pruning or not
    stages: list[Stage] = field(default_factory=list)  # the stages that pruned (none at keep ratio 1)

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def tokens_per_stage(self) -> list[int]:
        """Patch tokens (CLS excluded, a fused token included) seen by each group of blocks."""
        pruned = [int(s.kept.shape[1]) for s in self.stages]
        return [self.num_patches] + (pruned or [self.num_patches] * len(self.stage_blocks))


# ----------------------------------------------------------------------------- helpers


def _prefix(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:, :1], x[:, 1:]


def _identity(x: torch.Tensor) -> Reduction:
    B, N, _ = x.shape
    idx = torch.arange(N - 1, device=x.device).expand(B, -1)
    return Reduction(x=x, source=idx, rep=idx)


def topk_keep(
    x: torch.Tensor, scores: torch.Tensor, k: int, fuse_weights: torch.Tensor | None = None, mean: bool = True
) -> Reduction:
    """Keep the k patch tokens with the highest scores, in their original order.

    Args:
        x: (B, 1 + n, C) tokens.
        scores: (B, n) patch scores.
        k: patch tokens to keep; ``k >= n`` returns the tokens unchanged.
        fuse_weights: (B, n) non-negative weights; if given, the dropped tokens are
            fused into one extra token.
        mean: the fused token is the weighted mean; False: the weighted sum, EViT's
            attention-weighted token (its weights, CLS attention, sum to less than 1).

    Returns:
        The `Reduction`.
    """
    B, N, C = x.shape
    n = N - 1
    if k >= n:
        ident = _identity(x)
        return Reduction(x=x, source=ident.source, rep=ident.rep, scores=scores)
    cls, patches = _prefix(x)
    keep = scores.topk(k, dim=1).indices.sort(dim=1).values  # (B, k)
    kept = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, C))  # (B, k, C)
    source = torch.full((B, n), -1, dtype=torch.long, device=x.device)
    source.scatter_(1, keep, torch.arange(k, device=x.device).expand(B, -1))
    rep = keep
    parts = [cls, kept]
    if fuse_weights is not None:
        dropped = source < 0  # (B, n)
        w = fuse_weights * dropped  # (B, n)
        fused = (w.unsqueeze(-1) * patches).sum(1, keepdim=True)  # (B, 1, C)
        if mean:
            fused = fused / w.sum(1).clamp_min(1e-12)[:, None, None]
        parts.append(fused)  # (B, 1, C)
        source = torch.where(dropped, torch.full_like(source, k), source)
        rep = torch.cat([keep, torch.full((B, 1), -1, dtype=torch.long, device=x.device)], dim=1)
    return Reduction(x=torch.cat(parts, dim=1), source=source, rep=rep, scores=scores)


def _need(value: torch.Tensor | None, method: str, what: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"{method} pruning needs {what}.")
    return value


# ----------------------------------------------------------------------------- methods


def none(x: torch.Tensor, k: int, sig: Signals) -> Reduction:
    """The identity: every token stays."""
    return _identity(x)


def learned(x: torch.Tensor, k: int, sig: Signals) -> Reduction:
    """A keep predictor (after DynamicViT's) picks the k patches to keep; the rest become one background token.

    The dropped tokens are fused into their size-weighted mean, and that token's size
    (the patches it stands for) enters attention as ToMe's ``log(size)`` bias, so the
    background keeps its share of attention. Without this, a selection that favours the
    objects distorts the proportions the model has learned (how much of the picture an
    object covers is what "large" and "small" mean), and on the synthetic baseline a
    selection of every object patch did worse than a random one until the rest was fused.
    A fused token from an earlier stage is always fused again, so there is at most one.
    """
    scores = _need(sig.predictor, "learned", "predictor logits")
    B, N, _ = x.shape
    if k >= N - 1:
        ident = _identity(x)
        return Reduction(x=x, source=ident.source, rep=ident.rep, size=sig.size, scores=scores)
    size = sig.size if sig.size is not None else torch.ones(B, N, dtype=x.dtype, device=x.device)
    if sig.size is not None:  # the last token is the earlier stage's fused token
        scores = scores.clone()
        scores[:, -1] = -math.inf
    red = topk_keep(x, scores, k, fuse_weights=size[:, 1:])
    new_size = torch.zeros(B, red.x.shape[1], dtype=size.dtype, device=x.device)
    new_size[:, 0] = size[:, 0]
    new_size[:, 1:].scatter_add_(1, red.source, size[:, 1:])
    red.size = new_size
    return red


def cls_attention(x: torch.Tensor, k: int, sig: Signals) -> Reduction:
    """EViT: top-k by the block's CLS attention; with ``sig.fuse`` (the default) the rest become one token.

    As in EViT's code, the fused token is the attention-weighted *sum* of the dropped
    tokens, not their mean, and an earlier stage's fused token is scored, kept or
    fused again like any other token.
    """
    attn = _need(sig.cls_attn, "cls_attention", "the CLS attention of its block")
    return topk_keep(x, attn, k, fuse_weights=attn if sig.fuse else None, mean=False)


def text_guided(x: torch.Tensor, k: int, sig: Signals) -> Reduction:
    """Query-aware: a caption-conditioned keep predictor ranks the patches; top-k, the rest one background token.

    The logits come from `QueryKeepPredictor`, trained on each caption's own teacher
    (`training.saliency.stage_effects`: its share of the cosine carried back to the stage,
    contrasted with a caption naming the rest of the scene), so a caption that names one
    object moves the kept patches onto it. Dropped tokens are fused as in `learned`.

    Why not the cosine of each patch token, through the image head, with the caption
    (this method's first version): on the shipped baseline that ranks object patches
    *last* (object recall 0.14 at keep ratio 0.3, random 0.30). A patch token is never
    trained to lie in the embedding space; what reaches the image embedding is its value
    through attention, and on this model that path flips the sign. See docs/methods.md.
    """
    logits = _need(sig.text, "text_guided", "caption-conditioned keep logits")
    return learned(x, k, Signals(predictor=logits, size=sig.size))


def random(x: torch.Tensor, k: int, sig: Signals) -> Reduction:
    """The control: seeded uniform scores."""
    B, N, _ = x.shape
    scores = torch.rand(B, N - 1, generator=sig.generator, device=x.device)
    return topk_keep(x, scores, k)


def dynamicvit(x: torch.Tensor, k: int, sig: Signals) -> Reduction:
    """DynamicViT at inference: `PredictorLG`'s keep probability ranks the patches; the top-k stay, the rest are gone.

    As in DynamicViT's inference, the dropped tokens are removed outright (no fused token); its training
    (Gumbel-softmax masks, attention masked by the keep policy, `training.dynamicvit`) taught the tower to do
    without them.
    """
    scores = _need(sig.predictor, "dynamicvit", "PredictorLG keep scores")
    return topk_keep(x, scores, k)


def bipartite_merge(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of ToMe's bipartite soft matching over the patch tokens.

    Patches alternate into sets A (even) and B (odd); each A token links to its most
    similar B token, and the r strongest links merge (size-weighted mean of both
    tokens and metrics). The CLS token is not matched.

    Args:
        x: (B, 1 + n, C) tokens.
        metric: (B, n, d) similarity features of the patch tokens.
        size: (B, 1 + n) sizes.
        r: merges, at most ceil(n / 2).

    Returns:
        (x, metric, size, source, rep) after the round; the new patch tokens are the
        unmerged A tokens in their order, then the B tokens.
    """
    B, N, C = x.shape
    n = N - 1
    cls, patches = _prefix(x)
    m = F.normalize(metric, dim=-1)
    a_pos = torch.arange(0, n, 2, device=x.device)
    b_pos = torch.arange(1, n, 2, device=x.device)
    sim = m[:, a_pos] @ m[:, b_pos].transpose(1, 2)  # (B, na, nb)
    node_max, node_idx = sim.max(dim=-1)  # (B, na)
    order = node_max.argsort(dim=-1, descending=True)
    src = order[:, :r]  # A indices that merge
    unm = order[:, r:].sort(dim=1).values  # A indices that stay, in their order
    dst = node_idx.gather(1, src)  # B index each merging A token joins
    nu, nb = unm.shape[1], b_pos.numel()

    def merge(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Size-weighted mean of each B token and the A tokens that join it.
        D = t.shape[-1]
        ta, tb = t[:, a_pos] * w[:, a_pos, None], t[:, b_pos] * w[:, b_pos, None]
        tb = tb.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, D), ta.gather(1, src.unsqueeze(-1).expand(-1, -1, D)))
        wb = w[:, b_pos].scatter_add(1, dst, w[:, a_pos].gather(1, src))
        keep_a = ta.gather(1, unm.unsqueeze(-1).expand(-1, -1, D)) / w[:, a_pos].gather(1, unm)[..., None]
        return torch.cat([keep_a, tb / wb[..., None]], dim=1)

    w = size[:, 1:]  # (B, n)
    new_patches = merge(patches, w)
    new_metric = merge(metric, w)
    new_w = torch.cat([w[:, a_pos].gather(1, unm), w[:, b_pos].scatter_add(1, dst, w[:, a_pos].gather(1, src))], 1)
    source = torch.empty((B, n), dtype=torch.long, device=x.device)
    source[:, b_pos] = nu + torch.arange(nb, device=x.device)
    a_source = torch.empty((B, a_pos.numel()), dtype=torch.long, device=x.device)
    a_source.scatter_(1, unm, torch.arange(nu, device=x.device).expand(B, -1))
    a_source.scatter_(1, src, nu + dst)
    source[:, a_pos] = a_source
    rep = torch.cat([a_pos[unm], b_pos.expand(B, -1)], dim=1)
    return torch.cat([cls, new_patches], 1), new_metric, torch.cat([size[:, :1], new_w], 1), source, rep


def tome(x: torch.Tensor, k: int, sig: Signals) -> Reduction:
    """ToMe: merge patch tokens down to k with bipartite soft matching (several rounds if k < n / 2)."""
    B, N, _ = x.shape
    n = N - 1
    size = sig.size if sig.size is not None else torch.ones(B, N, dtype=x.dtype, device=x.device)
    if k >= n:
        ident = _identity(x)
        return Reduction(x=x, source=ident.source, rep=ident.rep, size=size)
    metric = _need(sig.keys, "tome", "the keys of the previous block")
    source = torch.arange(n, device=x.device).expand(B, -1)
    rep = source
    while x.shape[1] - 1 > k:
        cur = x.shape[1] - 1
        r = min(cur - k, (cur + 1) // 2)
        x, metric, size, step_source, step_rep = bipartite_merge(x, metric, size, r)
        source = step_source.gather(1, source)
        rep = rep.gather(1, step_rep)
    return Reduction(x=x, source=source, rep=rep, size=size)


Method = Callable[[torch.Tensor, int, Signals], Reduction]

SIGNALS = ("cls_attn", "keys", "predictor", "text", "seed")  # what a stage can hand a method (see `Signals`)
BASELINE = "none"  # the method that prunes nothing: every comparison's reference
# The checkpoint folders a method can run on, and the kind of keep predictor each one's config builds
# (`vlm_demo.config.PruningConfig.predictor`): the baseline none, pruned/ `KeepPredictor`s (and text_guided's
# `QueryKeepPredictor`s), dynamicvit/ DynamicViT's own `PredictorLG`s on its own fine-tuned tower.
CHECKPOINTS = {"baseline": "", "pruned": "mlp", "dynamicvit": "lg"}
OPTIONAL_CHECKPOINTS = ("dynamicvit",)  # made by their own command (`training.dynamicvit`), not by every build


@dataclass(frozen=True)
class StageShape:
    """The sizes a stage's scoring cost depends on (for `MethodInfo.scoring_macs`)."""

    n_in: int  # patch tokens entering the stage
    n_out: int  # patch tokens leaving it (a fused token included)
    width: int  # token width C
    heads: int  # attention heads h
    embed_dim: int  # shared embedding size E
    predictor_hidden: int  # hidden width of the keep predictor
    query_mlp: bool = True  # text_guided's caption side is an MLP (`PruningConfig.query_mlp`), else one linear map


def _no_cost(s: StageShape) -> int:
    return 0


@dataclass(frozen=True)
class MethodInfo:
    """Everything the rest of the code knows about one pruning method.

    The model asks it which signals to compute, flops which tokens and scoring cost
    a stage adds, the api which weights to run and whether a caption is needed,
    and the app and the evaluation what to call it. Nothing else compares names.
    """

    name: str  # registry key, used in the API, CLIs and metrics.json
    fn: Method  # (tokens, keep count, signals) -> Reduction
    label: str  # display name
    summary: str  # one line for the UI and docs
    paper: str  # what it follows ("-" if nothing)
    signals: tuple[str, ...] = ()  # subset of `SIGNALS` the model computes for it
    reduction: str = "drop"  # "identity", "drop" (top-k) or "merge" (ToMe groups)
    fusion: str = ""  # "" none; "background": everything dropped so far is one size-weighted token;
    # "stage": each stage's dropped tokens become one extra token, only with `PruneSpec.fuse` (EViT)
    scoring_macs: Callable[[StageShape], int] = _no_cost  # MACs a stage spends choosing (closed form)
    inside: bool = False  # False: a stage runs before its block, on the previous block's signals (DynamicViT);
    # True: inside its block, after attention and before the MLP, on that block's own attention (EViT, ToMe)
    paper_stages: Callable[[int, tuple[int, ...]], tuple[int, ...]] = lambda depth, shared: shared  # the
    # paper's blocks for a ViT of this depth; `shared` is the config's pruning.stages (the trained predictors')
    counts: str = "geometric"  # "geometric": stage s of S keeps round(P * r ** (s / S)) patch tokens (a per-stage
    # keep rate r ** (1 / S), the DynamicViT / EViT convention); "constant_r": every stage merges the same number
    # of tokens, ToMe's r, chosen so that about round(P * r) are left
    checkpoint: str = "baseline"  # the checkpoint folder whose weights it runs (a key of `CHECKPOINTS`)

    def __post_init__(self) -> None:
        unknown = set(self.signals) - set(SIGNALS)
        if unknown:
            raise ValueError(f"{self.name}: unknown signal(s) {sorted(unknown)}; choose from {SIGNALS}.")
        if self.reduction not in ("identity", "drop", "merge") or self.fusion not in ("", "background", "stage"):
            raise ValueError(f"{self.name}: bad reduction {self.reduction!r} or fusion {self.fusion!r}.")
        if self.counts not in ("geometric", "constant_r"):
            raise ValueError(f"{self.name}: bad counts {self.counts!r}; choose geometric or constant_r.")
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"{self.name}: unknown checkpoint {self.checkpoint!r}; choose one of {list(CHECKPOINTS)}.")

    @property
    def needs_caption(self) -> bool:
        """The caption embedding steers it, so it cannot run on an image alone."""
        return "text" in self.signals

    @property
    def needs_predictor(self) -> bool:
        """It runs trained keep predictors, so it runs on their checkpoint (`checkpoint`), not the baseline."""
        return self.checkpoint != "baseline"

    @property
    def predictor_kind(self) -> str:
        """The kind of keep predictor its checkpoint's config must build (`PruningConfig.predictor`), or ""."""
        return CHECKPOINTS[self.checkpoint]

    @property
    def prunes(self) -> bool:
        """False only for the baseline."""
        return self.reduction != "identity"

    def fused(self, k: int, n: int, num_patches: int, fuse: bool) -> bool:
        """Whether a stage that keeps k of n patch tokens (of `num_patches`) adds a fused token."""
        if self.fusion == "background":
            return k < num_patches
        return self.fusion == "stage" and fuse and k < n


def _learned_cost(s: StageShape) -> int:
    C, h = s.width, s.predictor_hidden
    return s.n_in * (5 * C + C * h + 2 * h * h + h)  # norm, local layer, head (two layers) per token


def _query_cost(s: StageShape) -> int:
    C, h = s.width, s.predictor_hidden
    # Per token: the learned predictor's layers plus the match projection (norm, linear); once: the caption's
    # linear map, and the MLP's second layer.
    return _learned_cost(s) + s.n_in * (5 * C + C * h) + s.embed_dim * h + (h * h if s.query_mlp else 0)


def _lg_cost(s: StageShape) -> int:
    C = s.width
    # Per token: the norm and the C x C input layer, then the C -> C/2 -> C/4 -> 2 output layers (`PredictorLG`).
    return s.n_in * (5 * C + C * C + C * (C // 2) + (C // 2) * (C // 4) + (C // 4) * 2)


def _tome_cost(s: StageShape) -> int:
    # Bipartite similarities of every round it takes to get from n_in to n_out tokens.
    d, n, macs = s.width // s.heads, s.n_in, 0
    while n > s.n_out:
        na, nb = (n + 1) // 2, n // 2
        macs += na * nb * d
        n -= min(n - s.n_out, na)
    return macs


REGISTRY: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    """Add a method (or replace one of the same name); returns it."""
    REGISTRY[info.name] = info
    return info


def get(name: str) -> MethodInfo:
    """The `MethodInfo` of `name`; a clear ValueError for an unknown one."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown pruning method {name!r}; choose one of {', '.join(REGISTRY)}.") from None


def names(prunes_only: bool = False, image_only: bool = False) -> tuple[str, ...]:
    """Registered method names, in registry order.

    Args:
        prunes_only: leave out the baseline.
        image_only: leave out methods that need a caption.
    """
    return tuple(
        m.name for m in REGISTRY.values() if (m.prunes or not prunes_only) and not (image_only and m.needs_caption)
    )


def quarter_points(depth: int, shared: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Blocks at a quarter, half and three quarters of the depth: 3, 6, 9 of 12 (DynamicViT, EViT)."""
    return tuple(sorted({max(1, depth * q // 4) for q in (1, 2, 3)} - {depth}))


def every_block(depth: int, shared: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Every block: ToMe merges r tokens in each."""
    return tuple(range(depth))


for _info in (
    MethodInfo(BASELINE, none, "No pruning", "No pruning: the baseline model.", "-", reduction="identity"),
    MethodInfo(
        "learned", learned, "Learned keep predictor",
        "A saliency-distilled keep predictor: a small MLP per stage, trained to rank patches like the frozen "
        "baseline's caption saliency, keeps the top-k; the rest become one size-weighted background token. In the "
        "shipped model the image tower it runs on was then fine-tuned under this pruning to give the baseline's "
        "embedding (a CLIP's add-on keeps the CLIP's).",
        "after DynamicViT's predictor and backbone fine-tuning (NeurIPS 2021); not DynamicViT's Gumbel-mask training",
        signals=("predictor",), fusion="background", scoring_macs=_learned_cost, checkpoint="pruned",
    ),  # its stages are the ones its predictors were trained for: the config's pruning.stages
    MethodInfo(
        "cls_attention", cls_attention, "CLS attention (EViT)",
        "Inside blocks at 1/4, 1/2 and 3/4 of the depth, after attention, keeps the patches the block's CLS "
        "token attends to most (mean over heads) and fuses the rest into one attention-weighted token. "
        "Training-free.",
        "EViT (ICLR 2022)",
        signals=("cls_attn",), fusion="stage", inside=True, paper_stages=quarter_points,
        scoring_macs=lambda s: (s.n_in + 1) * s.width,  # one query row against every key
    ),
    MethodInfo(
        "text_guided", text_guided, "Text-guided",
        "A caption-conditioned keep predictor per stage, trained to rank patches like each caption's share of "
        "the frozen baseline's image-caption cosine (carried back to the stage, contrasted with a caption naming "
        "the rest of the scene), keeps the top-k, so a caption that names an object moves the kept patches onto "
        "it; the rest become one size-weighted background token.",
        "the query-aware idea of FastV / SparseVLM; teacher after Gandelsman et al.'s direct-effect "
        "decomposition of CLIP (ICLR 2024) and Abnar and Zuidema's attention rollout (ACL 2020)",
        signals=("text",), fusion="background", scoring_macs=_query_cost, checkpoint="pruned",
    ),  # a trained predictor too: it runs on pruned/ at the config's pruning.stages
    MethodInfo(
        "tome", tome, "ToMe merging",
        "In every block, after attention, merges the r most similar token pairs (bipartite soft matching, "
        "size-weighted) instead of dropping them, with proportional attention. Training-free.",
        "ToMe (ICLR 2023)",
        signals=("keys",), reduction="merge", inside=True, paper_stages=every_block, counts="constant_r",
        scoring_macs=_tome_cost,
    ),
    MethodInfo(
        "dynamicvit", dynamicvit, "DynamicViT",
        "Before blocks at 1/4, 1/2 and 3/4 of the depth, DynamicViT's own predictor (PredictorLG: local and global "
        "features, keep/drop log-probabilities) keeps the top-k patches and drops the rest outright. Its predictors "
        "and image tower were trained together with DynamicViT's recipe: Gumbel-softmax masks, attention masked "
        "by the keep policy, the keep-ratio loss and distillation from the baseline.",
        "DynamicViT (NeurIPS 2021)",
        signals=("predictor",), paper_stages=quarter_points, scoring_macs=_lg_cost, checkpoint="dynamicvit",
    ),  # runs dynamicvit/: its config's pruning.stages are the paper's, the ones its predictors were trained for
    MethodInfo(
        "random", random, "Random", "Keeps a seeded random subset of patches: the control every method should beat.",
        "-", signals=("seed",),
    ),
):
    register(_info)


@dataclass(frozen=True)
class StagePlan:
    """One planned pruning stage."""

    block: int  # the block it runs before (or inside, see `MethodInfo.inside`)
    keep: int  # patch tokens it keeps or merges down to, a fused token not counted


PLACEMENTS = ("paper", "shared")  # the named placements; block indices are the third choice


def resolve_stages(
    method: str, depth: int, shared: tuple[int, ...], placement: str | tuple[int, ...] = "paper"
) -> tuple[int, ...]:
    """The blocks where `method` prunes.

    Args:
        method: a registered method.
        depth: blocks in the ViT.
        shared: the config's ``pruning.stages``: the blocks the keep predictors were
            trained for, and the one placement every method can share.
        placement: ``"paper"`` (the method's paper default), ``"shared"``, or block indices.

    Returns:
        Sorted block indices; empty for the baseline.

    Raises:
        ValueError: for an unknown placement, a block out of range, or a placement the
            trained predictors do not have.
    """
    info = get(method)
    if not info.prunes:
        return ()
    if isinstance(placement, str):
        if placement not in PLACEMENTS:
            raise ValueError(f"Unknown placement {placement!r}; use one of {PLACEMENTS} or block indices like 1,3.")
        stages = info.paper_stages(depth, tuple(shared)) if placement == "paper" else tuple(shared)
    else:
        stages = tuple(sorted({int(b) for b in placement}))
    lo = 0 if info.inside else 1  # a stage before block 0 would have no block's signals to score with
    if not stages or not all(lo <= b < depth for b in stages):
        raise ValueError(f"{method} stages must be blocks {lo}..{depth - 1}, got {list(stages)}.")
    if info.needs_predictor and stages != tuple(shared):
        raise ValueError(f"{method}'s predictors were trained for blocks {list(shared)}; it cannot prune at {list(stages)}.")
    return stages


def checkpoint_config(cfg: Any, method: str) -> Any:
    """The config of the checkpoint `method` runs on, derived from a baseline's (or pruned/'s) `cfg`.

    ``dynamicvit`` runs its own checkpoint, whose `PredictorLG`s sit at DynamicViT's paper placement for the
    depth (``pruning.stages``, `quarter_points`) and which has no caption-conditioned predictors;
    `training.dynamicvit` builds it from this, and flops prices it with this. Any other method's (and an
    already-derived config) is returned unchanged.
    """
    info = get(method)
    if info.predictor_kind != "lg":
        return cfg
    stages = info.paper_stages(cfg.vision.depth, tuple(cfg.pruning.stages))
    prune = dataclasses.replace(cfg.pruning, stages=stages, predictor="lg", query_predictors=False)
    return cfg.replace(pruning=prune)


def predictor_mismatch(method: str, pruning: Any) -> str | None:
    """Why a model whose `PruningConfig` is `pruning` cannot run `method`'s keep predictors (another kind: they
    live in another checkpoint), or None when it can."""
    info = get(method)
    kind = pruning.predictor
    if not info.predictor_kind or info.predictor_kind == kind:
        return None
    return (f"{method} runs {info.predictor_kind!r} keep predictors, and this model has {kind!r} ones: load its own "
            f"checkpoint ({info.checkpoint}/).")


def blocks_for(cfg: Any, method: str, placement: str | tuple[int, ...] | None = None) -> tuple[int, ...]:
    """`resolve_stages` for a model config: the blocks where `method` prunes on the checkpoint it runs
    (`checkpoint_config`), at `placement` (None: the config's ``pruning.placement``)."""
    cfg = checkpoint_config(cfg, method)
    where = cfg.pruning.placement if placement is None else placement
    return resolve_stages(method, cfg.vision.depth, tuple(cfg.pruning.stages), where)


def stage_counts(method: str, num_patches: int, keep_ratio: float, num_stages: int) -> list[int]:
    """Patch tokens left after each of `num_stages` stages, by the method's counting rule.

    ``geometric`` is `keep_counts`. ``constant_r`` merges the same r tokens at every
    stage (ToMe), r = round((P - round(P * keep_ratio)) / S), at most half of the tokens
    a stage receives (bipartite matching cannot merge more).
    """
    if get(method).counts == "geometric":
        return keep_counts(num_patches, keep_ratio, num_stages)
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}.")
    r = round((num_patches - max(1, round(num_patches * keep_ratio))) / num_stages)
    n, out = num_patches, []
    for _ in range(num_stages):
        n -= min(r, n // 2)
        out.append(n)
    return out


def plan(
    method: str, keep_ratio: float, num_patches: int, depth: int, shared: tuple[int, ...],
    placement: str | tuple[int, ...] = "paper",
) -> list[StagePlan]:  # fmt: skip
    """The stages one forward pass runs: where, and how many patch tokens each keeps.

    Empty when nothing is pruned (the baseline, or keep ratio 1). The model, flops and
    the UI all read this, so the count per stage is decided here only.
    """
    stages = resolve_stages(method, depth, shared, placement)
    if keep_ratio >= 1.0:
        return []
    counts = stage_counts(method, num_patches, keep_ratio, len(stages))
    return [StagePlan(b, k) for b, k in zip(stages, counts)]


def token_schedule(
    num_patches: int, shared: tuple[int, ...], depth: int, method: str, keep_ratio: float, fuse: bool = True,
    placement: str | tuple[int, ...] = "paper",
) -> list[tuple[int, int]]:  # fmt: skip
    """Tokens (CLS and any fused token included) that each block's attention and MLP see.

    The one place the token count per block is derived from a method, keep ratio and
    placement; flops, the evaluation and the UI ask it, and the tests hold it to the
    model's trace.

    Returns:
        One ``(attention tokens, MLP tokens)`` pair per block; they differ only in a block
        that prunes inside (EViT, ToMe).
    """
    info = get(method)
    stages = {st.block: st.keep for st in plan(method, keep_ratio, num_patches, depth, shared, placement)}
    n, out = num_patches, []
    for i in range(depth):
        attn = n
        if i in stages:
            k = stages[i]
            n = k + info.fused(k, n, num_patches, fuse)
        out.append((1 + (n if not info.inside else attn), 1 + n))
    return out


# ----------------------------------------------------------------------------- the learned scorer


class KeepPredictor(nn.Module):
    """DynamicViT's score predictor: an MLP on each token's local and global features.

    Args:
        width: token width C.
        hidden: hidden width.
    """

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.local = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU())
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Keep logits.

        Args:
            patches: (B, n, C) patch tokens.

        Returns:
            (B, n) logits; higher keeps.
        """
        h = self.local(patches)  # (B, n, H)
        g = h.mean(1, keepdim=True)
        return self.head(torch.cat([h, g.expand_as(h)], dim=-1)).squeeze(-1)

    def keep_scores(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, n) keep logits: what the model ranks by (the same call as `PredictorLG.keep_scores`)."""
        return KeepPredictor.forward(self, patches)


class QueryKeepPredictor(KeepPredictor):
    """The caption-conditioned keep predictor of ``text_guided``: `KeepPredictor` plus a caption match.

    logit = the keep predictor's logit of the patch + a bilinear match between the patch
    token and the caption embedding, ``<W_p LN(patch), q(text)> / sqrt(hidden)``. The
    first term can learn what matters in any scene, the second which patches this caption
    names. Trained in the pruned phase on each caption's share of the cosine at the stage
    (`training.saliency.stage_effects`, `training.query`), with the towers frozen.

    ``q`` is an MLP (``mlp=True``, `PruningConfig.query_mlp`) or, in checkpoints saved before
    it, a linear map. A linear ``q`` cannot serve both captions that name one object of a
    scene (keep it, drop the other) and captions that name both (keep both): a caption naming
    two objects embeds close to the sum of the two single ones, so its match would be close
    to the sum of theirs, where each object's keep and drop cancel.

    Args:
        width: token width C.
        embed_dim: caption embedding size E.
        hidden: hidden width.
        mlp: ``q`` is ``Linear-GELU-Linear``; else one ``Linear``.
    """

    def __init__(self, width: int, embed_dim: int, hidden: int, mlp: bool = True):
        super().__init__(width, hidden)
        self.match = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden))
        self.query: nn.Module = (
            nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            if mlp
            else nn.Linear(embed_dim, hidden)
        )

    def forward(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Keep logits.

        Args:
            patches: (B, n, C) patch tokens.
            text: (B, E) or (1, E) normalised caption embeddings.

        Returns:
            (B, n) logits; higher keeps.
        """
        q = self.query(text)[:, None, :]  # (B or 1, 1, H)
        match = (self.match(patches) * q).sum(-1) * q.shape[-1] ** -0.5  # (B, n)
        return super().forward(patches) + match


class PredictorLG(nn.Module):
    """DynamicViT's score predictor ("PredictorLG"), as its paper and reference code define it.

    A norm and a C x C layer with GELU; half the channels stay local, the other half are averaged over
    the tokens the keep policy still holds (the global feature); then C -> C/2 -> C/4 -> 2 layers with
    GELU and a log-softmax over (keep, drop).

    Args:
        width: token width C (divisible by 4).
    """

    def __init__(self, width: int):
        super().__init__()
        if width % 4:
            raise ValueError(f"PredictorLG needs a token width divisible by 4, got {width}.")
        self.in_conv = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width // 4), nn.GELU(),
            nn.Linear(width // 4, 2), nn.LogSoftmax(dim=-1),
        )  # fmt: skip

    def forward(self, patches: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """(keep, drop) log-probabilities.

        Args:
            patches: (B, n, C) patch tokens.
            policy: (B, n) 1 where the token is still kept (training keeps every token and masks), else
                None: every token counts (inference, where the dropped tokens are gone).

        Returns:
            (B, n, 2) log-probabilities; index 0 is keep.
        """
        h = self.in_conv(patches)  # (B, n, C)
        half = h.shape[-1] // 2
        local, rest = h[..., :half], h[..., half:]
        if policy is None:
            glob = rest.mean(1, keepdim=True)
        else:
            w = policy.unsqueeze(-1).to(rest.dtype)  # (B, n, 1)
            glob = (rest * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
        return self.out_conv(torch.cat([local, glob.expand_as(local)], dim=-1))

    def keep_scores(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, n) keep log-probabilities of every token: what inference ranks by."""
        return self.forward(patches)[..., 0]
