"""A CLIP-style dual encoder whose ViT prunes tokens in stages between blocks.

Shape legend: B batch, N tokens (CLS first), n patch tokens, P patches of the
full grid, C width, h heads, d head width, L caption length, E embedding size.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_model
from torch import nn

from .config import ModelConfig, PruningConfig, TextConfig, VisionConfig
from .pruning import REGISTRY, KeepPredictor, PruneSpec, Signals, Stage, Trace, gumbel_topk_mask, keep_counts
from .tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class BlockAux:
    """What a block exposes for the next pruning stage (only when asked)."""

    cls_attn: torch.Tensor | None = None  # (B, n) CLS attention to each patch, mean over heads
    keys: torch.Tensor | None = None  # (B, n) x d keys of the patch tokens, mean over heads


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must divide by heads {heads}.")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        policy: torch.Tensor | None = None,
        aux: tuple[bool, bool] = (False, False),
    ) -> tuple[torch.Tensor, BlockAux | None]:
        """Multi-head self-attention.

        Args:
            x: (B, N, C).
            bias: additive logit bias broadcastable to (B, h, N, N): padding masks, or
                ToMe's log(size) for proportional attention.
            policy: (B, N) soft keep mask (training-time learned pruning): dropped tokens
                are masked out as keys, as in DynamicViT.
            aux: (want CLS attention, want keys) for the next pruning stage.

        Returns:
            (B, N, C) output and the requested `BlockAux`, or None.
        """
        B, N, C = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)  # each (B, h, N, d)
        out_aux = None
        if any(aux):
            out_aux = BlockAux()
            if aux[0]:
                logits = (q[:, :, :1] @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, h, 1, N)
                if bias is not None:
                    logits = logits + bias
                out_aux.cls_attn = logits.softmax(-1).mean(1)[:, 0, 1:]  # (B, n)
            if aux[1]:
                out_aux.keys = k.mean(1)[:, 1:]  # (B, n, d)
        if policy is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            y = _policy_attention(q, k, v, policy, bias)
        return self.proj(y.transpose(1, 2).reshape(B, N, C)), out_aux


def _policy_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """DynamicViT's softmax with a keep policy: dropped keys get no weight, yet the
    policy stays differentiable. Every token still attends to itself, so rows never
    empty out.

    The softmax is stabilised by the largest logit among the *kept* keys: DynamicViT
    subtracts the largest of all keys, and when a dropped key's logit is far above the
    kept ones every kept weight underflows, the epsilon takes over and attention turns
    uniform over all tokens, dropped ones included (training then diverged here).
    """
    N = q.shape[-2]
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, h, N, N)
    if bias is not None:
        logits = logits + bias
    eye = torch.eye(N, dtype=q.dtype, device=q.device)
    keep = policy[:, None, None, :]  # (B, 1, 1, N)
    keep = keep + (1.0 - keep) * eye
    live = keep.detach() > 0.5
    top = logits.detach().masked_fill(~live, float("-inf")).amax(-1, keepdim=True)
    # Dropped keys above the kept maximum are capped before exp: their weight is 0 anyway.
    weights = (logits - top).clamp(max=30.0).exp() * keep
    eps = 1e-6
    weights = (weights + eps / N) / (weights.sum(-1, keepdim=True) + eps)
    return weights @ v


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        policy: torch.Tensor | None = None,
        aux: tuple[bool, bool] = (False, False),
    ) -> tuple[torch.Tensor, BlockAux | None]:
        y, block_aux = self.attn(self.norm1(x), bias=bias, policy=policy, aux=aux)
        x = x + y
        return x + self.mlp(self.norm2(x)), block_aux


class VisionTransformer(nn.Module):
    """A ViT with a CLS token and pruning stages between its blocks."""

    def __init__(self, cfg: VisionConfig, pruning: PruningConfig, embed_dim: int):
        super().__init__()
        for s in pruning.stages:
            if not 0 < s < cfg.depth:
                raise ValueError(f"pruning stage {s} must sit between blocks (1..{cfg.depth - 1}).")
        self.cfg, self.pruning = cfg, pruning
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.num_patches, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.predictors = nn.ModuleList(KeepPredictor(cfg.width, pruning.predictor_hidden) for _ in pruning.stages)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, 1 + P, C) tokens."""
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, P, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def patch_scores_against(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine of each patch token, taken through the image head, with a caption embedding.

        Args:
            patches: (B, n, C).
            text: (B or 1, E) normalised caption embeddings.

        Returns:
            (B, n) cosines.
        """
        z = F.normalize(self.proj(self.norm(patches)), dim=-1)  # (B, n, E)
        return (z * text[:, None, :]).sum(-1)

    def forward_features(self, pixels: torch.Tensor, prune: PruneSpec | None = None) -> tuple[torch.Tensor, Trace]:
        """Run the blocks, pruning at each stage.

        In training mode, ``learned`` keeps every token and masks attention with a
        differentiable keep policy (so the predictor learns); everywhere else the
        pruned tokens are really removed, so the later blocks cost less.

        Args:
            pixels: (B, 3, H, W).
            prune: what to prune; None is the unpruned model.

        Returns:
            (B, 1 + k', C) final tokens and the `Trace`.
        """
        prune = prune or PruneSpec()
        x = self.embed(pixels)
        B, N, _ = x.shape
        trace = Trace(prune.method, float(prune.keep_ratio), self.cfg.grid, stage_blocks=self.pruning.stages)
        stages = self.pruning.stages if prune.active else ()
        counts = dict(zip(stages, keep_counts(self.cfg.num_patches, prune.keep_ratio, len(stages))))
        method = REGISTRY[prune.method]
        soft = self.training and prune.method == "learned"
        want = (prune.method == "cls_attention", prune.method == "tome")
        generator = None
        if prune.method == "random" or soft:
            generator = torch.Generator(device=pixels.device).manual_seed(prune.seed)

        groups = torch.arange(N - 1, device=x.device).expand(B, -1)  # (B, P) token of each original patch
        pos = groups  # (B, n) original patch each token stands for
        size: torch.Tensor | None = None  # (B, 1 + n) ToMe sizes
        policy: torch.Tensor | None = None  # (B, 1 + n) soft keep mask (training-time learned)
        aux: BlockAux | None = None
        for i, block in enumerate(self.blocks):
            if i in counts:
                k = counts[i]
                si = stages.index(i)
                if soft:
                    policy, stage = self._soft_stage(x, policy, k, si, generator, i)
                    trace.stages.append(stage)
                else:
                    sig = Signals(size=size, generator=generator, fuse=prune.fuse)
                    if aux is not None:
                        sig.cls_attn, sig.keys = aux.cls_attn, aux.keys
                    if prune.method == "learned":
                        sig.learned = self.predictors[si](x[:, 1:])
                    elif prune.method == "text_guided":
                        sig.text = self.patch_scores_against(x[:, 1:], prune.text.to(x.dtype))
                    red = method(x, k, sig)
                    stage_scores = None
                    if red.scores is not None:
                        # One spare column takes a fused token's score (its position is -1).
                        stage_scores = torch.full((B, N), float("nan"), device=x.device)
                        stage_scores.scatter_(1, torch.where(pos >= 0, pos, N - 1), red.scores.float())
                        stage_scores = stage_scores[:, : N - 1]
                    alive = groups >= 0
                    groups = torch.where(alive, red.source.gather(1, groups.clamp_min(0)), groups)
                    pos = torch.where(red.rep >= 0, pos.gather(1, red.rep.clamp_min(0)), red.rep)
                    x, size = red.x, red.size
                    trace.stages.append(Stage(block=i, kept=pos, groups=groups, scores=stage_scores))
            bias = None if size is None else size.log()[:, None, None, :]
            next_is_stage = (i + 1) in counts
            x, aux = block(x, bias=bias, policy=policy, aux=want if next_is_stage else (False, False))
        return x, trace

    def _soft_stage(
        self,
        x: torch.Tensor,
        policy: torch.Tensor | None,
        k: int,
        si: int,
        generator: torch.Generator | None,
        block: int,
    ) -> tuple[torch.Tensor, Stage]:
        """Training-time learned stage: a Gumbel top-k mask with straight-through gradients."""
        B, N, _ = x.shape
        patch_policy = None if policy is None else policy[:, 1:]
        logits = self.predictors[si](x[:, 1:], patch_policy)  # (B, n)
        alive = None if patch_policy is None else patch_policy.detach() > 0.5
        mask = gumbel_topk_mask(logits, k, self.pruning.gumbel_tau, alive=alive, generator=generator)
        patch_policy = mask if patch_policy is None else patch_policy * mask
        policy = torch.cat([torch.ones(B, 1, dtype=x.dtype, device=x.device), patch_policy], dim=1)
        kept = (patch_policy.detach() > 0.5).nonzero()[:, 1].reshape(B, k)
        groups = torch.full((B, N - 1), -1, dtype=torch.long, device=x.device)
        groups.scatter_(1, kept, torch.arange(k, device=x.device).expand(B, -1))
        return policy, Stage(block=block, kept=kept, groups=groups, scores=logits.detach().float())

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pool any number of tokens (the CLS token) and project: (B, N, C) -> (B, E)."""
        return self.proj(self.norm(tokens[:, 0]))

    def forward(self, pixels: torch.Tensor, prune: PruneSpec | None = None) -> tuple[torch.Tensor, Trace]:
        tokens, trace = self.forward_features(pixels, prune)
        return self.forward_head(tokens), trace


class TextTransformer(nn.Module):
    """A small transformer over word ids; pools the leading <cls> token."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.context_length, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def forward(self, ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
        """(B, L) ids -> (B, E) unnormalised embeddings."""
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]  # (B, L, C)
        bias = torch.zeros(ids.shape, dtype=x.dtype, device=x.device).masked_fill(ids == pad_id, float("-inf"))
        bias = bias[:, None, None, :]  # (B, 1, 1, L): padding is never attended to
        for block in self.blocks:
            x, _ = block(x, bias=bias)
        return self.proj(self.norm(x[:, 0]))


class DualEncoder(nn.Module, PyTorchModelHubMixin):
    """Image and text encoders aligned contrastively in one embedding space.

    Saved and loaded through `PyTorchModelHubMixin` (config.json + model.safetensors);
    use `save_checkpoint` / `load_checkpoint` to keep the vocabulary beside them.

    Args:
        config: a `ModelConfig` or its ``to_dict()``.
    """

    def __init__(self, config: dict[str, Any] | ModelConfig):
        super().__init__()
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.pruning, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.apply(_init_weights)

    @property
    def config(self) -> dict[str, Any]:
        """The JSON config that rebuilds this model (written to config.json)."""
        return self.cfg.to_dict()

    def forward(
        self, pixels: torch.Tensor, ids: torch.Tensor | None = None, prune: PruneSpec | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training entry point (what DDP wraps): normalised image and, if `ids`, text embeddings."""
        return self.encode_image(pixels, prune), None if ids is None else self.encode_text(ids)

    def encode_image(
        self, pixels: torch.Tensor, prune: PruneSpec | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """(B, 3, H, W) -> (B, E) image embeddings, pruned as `prune` says."""
        return self.encode_image_with_trace(pixels, prune, normalize)[0]

    def encode_image_with_trace(
        self, pixels: torch.Tensor, prune: PruneSpec | None = None, normalize: bool = True
    ) -> tuple[torch.Tensor, Trace]:
        """Like `encode_image`, also returning the pruning `Trace`."""
        z, trace = self.visual(pixels, prune)
        return (F.normalize(z, dim=-1) if normalize else z), trace

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, L) token ids -> (B, E) text embeddings."""
        z = self.text(ids)
        return F.normalize(z, dim=-1) if normalize else z


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `folder` only if the block succeeds.

    An interrupted writer (even SIGKILL) leaves either the old folder or the new one,
    never a half-written mix; a stale temporary folder starts with a dot.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    try:
        yield tmp
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(model: DualEncoder, tokenizer: Tokenizer, folder: str | os.PathLike, **extra: Any) -> Path:
    """Write config.json, model.safetensors and vocab.json atomically (see `atomic_folder`).

    Args:
        model: the model.
        tokenizer: its tokenizer (the vocabulary must fit ``config.text.vocab_size``).
        folder: destination.
        **extra: JSON-serialisable facts stored in ``training.json`` (e.g. epochs, timings).

    Returns:
        The folder.
    """
    if len(tokenizer) > model.cfg.text.vocab_size:
        raise ValueError(f"Tokenizer has {len(tokenizer)} words but the model only {model.cfg.text.vocab_size}.")
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        if extra:
            (tmp / "training.json").write_text(json.dumps(extra, indent=2))
    return Path(folder)


def load_checkpoint(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[DualEncoder, Tokenizer]:
    """Load a checkpoint folder written by `save_checkpoint`; never touches the network.

    Args:
        folder: a local folder with config.json, model.safetensors and vocab.json.
        device: where to put the model.

    Returns:
        (model in eval mode, tokenizer).
    """
    folder = Path(folder)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a checkpoint folder: {', '.join(missing)} missing.")
    # A local folder: the mixin reads config.json and model.safetensors and makes no Hub call.
    model = DualEncoder.from_pretrained(str(folder), map_location=str(device))
    return model.to(device).eval(), Tokenizer.load(folder)
