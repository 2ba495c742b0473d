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

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

@dataclass(frozen=True)
class PruneSpec:
    """What to prune in one forward pass.

    Args:
        method: a registered method name (see `names`).
        keep_ratio: see the module docstring; in (0, 1].
        text: (B, E) or (1, E) caption embeddings, needed by ``text_guided``.
        seed: seed of ``random``; the same seed keeps the same patches.
        fuse: ``cls_attention`` only: fuse the dropped tokens into one extra token (EViT).
    """

    method: str = "none"
    keep_ratio: float = 1.0
    text: torch.Tensor | None = None
    seed: int = 0
    fuse: bool = False

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
        text: (B, n) cosine of each patch with the caption embedding.
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
    stage_blocks: tuple[int, ...] = ()  # the blocks the model's stages run before, pruning or not
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


def topk_keep(x: torch.Tensor, scores: torch.Tensor, k: int, fuse_weights: torch.Tensor | None = None) -> Reduction:
    """Keep the k patch tokens with the highest scores, in their original order.

    Args:
        x: (B, 1 + n, C) tokens.
        scores: (B, n) patch scores.
        k: patch tokens to keep; ``k >= n`` returns the tokens unchanged.
        fuse_weights: (B, n) non-negative weights; if given, the dropped tokens are
            fused into one extra token, their weighted mean (EViT).

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
        fused = (w.unsqueeze(-1) * patches).sum(1, keepdim=True) / w.sum(1).clamp_min(1e-12)[:, None, None]
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
    """EViT: top-k by CLS attention; with ``sig.fuse`` the rest become one token."""
    attn = _need(sig.cls_attn, "cls_attention", "the CLS attention of the previous block")
    return topk_keep(x, attn, k, fuse_weights=attn if sig.fuse else None)


def text_guided(x: torch.Tensor, k: int, sig: Signals) -> Reduction:
    """Query-aware: top-k by similarity to the caption, so the caption moves the kept patches."""
    return topk_keep(x, _need(sig.text, "text_guided", "a caption embedding"), k)


def random(x: torch.Tensor, k: int, sig: Signals) -> Reduction:
    """The control: seeded uniform scores."""
    B, N, _ = x.shape
    scores = torch.rand(B, N - 1, generator=sig.generator, device=x.device)
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


@dataclass(frozen=True)
class StageShape:
    """The sizes a stage's scoring cost depends on (for `MethodInfo.scoring_macs`)."""

    n_in: int  # patch tokens entering the stage
    n_out: int  # patch tokens leaving it (a fused token included)
    width: int  # token width C
    heads: int  # attention heads h
    embed_dim: int  # shared embedding size E
    predictor_hidden: int  # hidden width of the keep predictor


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

    def __post_init__(self) -> None:
        unknown = set(self.signals) - set(SIGNALS)
        if unknown:
            raise ValueError(f"{self.name}: unknown signal(s) {sorted(unknown)}; choose from {SIGNALS}.")
        if self.reduction not in ("identity", "drop", "merge") or self.fusion not in ("", "background", "stage"):
            raise ValueError(f"{self.name}: bad reduction {self.reduction!r} or fusion {self.fusion!r}.")

    @property
    def needs_caption(self) -> bool:
        """The caption embedding steers it, so it cannot run on an image alone."""
        return "text" in self.signals

    @property
    def needs_predictor(self) -> bool:
        """It runs on the checkpoint with trained keep predictors (``pruned/``), not the baseline."""
        return "predictor" in self.signals

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


for _info in (
    MethodInfo(BASELINE, none, "No pruning", "No pruning: the baseline model.", "-", reduction="identity"),
    MethodInfo(
        "learned", learned, "Learned keep predictor",
        "A small MLP per stage, trained to rank patches like the baseline's caption saliency, keeps the top-k; "
        "the rest become one size-weighted background token.",
        "after DynamicViT's predictor (NeurIPS 2021)",
        signals=("predictor",), fusion="background", scoring_macs=_learned_cost,
    ),
    MethodInfo(
        "cls_attention", cls_attention, "CLS attention (EViT)",
        "Keeps the patches the CLS token attends to most, averaged over heads; optionally fuses the rest. "
        "Training-free.",
        "EViT (ICLR 2022)",
        signals=("cls_attn",), fusion="stage", scoring_macs=lambda s: (s.n_in + 1) * s.width,  # one query row
    ),
    MethodInfo(
        "text_guided", text_guided, "Text-guided",
        "Keeps the patches closest to the caption's embedding, so editing the caption moves them. Training-free.",
        "FastV / SparseVLM idea",
        signals=("text",), scoring_macs=lambda s: s.n_in * (5 * s.width + s.width * s.embed_dim),  # patch head
    ),
    MethodInfo(
        "tome", tome, "ToMe merging",
        "Merges the most similar tokens in pairs instead of dropping them (bipartite soft matching), "
        "with proportional attention. Training-free.",
        "ToMe (ICLR 2023)",
        signals=("keys",), reduction="merge", scoring_macs=_tome_cost,
    ),
    MethodInfo(
        "random", random, "Random", "Keeps a seeded random subset of patches: the control every method should beat.",
        "-", signals=("seed",),
    ),
):
    register(_info)


def token_schedule(
    num_patches: int, stages: tuple[int, ...], depth: int, method: str, keep_ratio: float, fuse: bool = False
) -> list[int]:
    """Tokens (CLS and any fused token included) that each of the `depth` blocks sees.

    The one place the token count per block is derived from a method and keep ratio;
    flops, the evaluation and the UI ask it, and the tests hold it to the model's trace.
    """
    info = get(method)
    active = info.prunes and keep_ratio < 1
    counts = keep_counts(num_patches, keep_ratio, len(stages)) if active else [num_patches] * len(stages)
    n, out = num_patches, []
    for i in range(depth):
        if i in stages:
            k = counts[stages.index(i)]
            n = k + info.fused(k, n, num_patches, fuse)
        out.append(1 + n)
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
