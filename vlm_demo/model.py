"""A CLIP-style dual encoder whose ViT prunes tokens in stages between blocks.

Shape legend: B batch, N tokens (CLS first), n patch tokens, P patches of the
full grid, C width, h heads, d head width, L caption length, E embedding size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import ModelConfig, PruningConfig, TextConfig, VisionConfig
from .pruning import (
    REGISTRY, KeepPredictor, MethodInfo, PredictorLG, PruneSpec, QueryKeepPredictor, Signals, Stage, StagePlan, Trace,
    checkpoint_config, get, plan, predictor_mismatch, resolve_stages,
)
from .tokenizer import VOCAB_FILE, Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # refused: loading them unpickles
# The state-dict names of the trained keep predictors: learned's, then text_guided's caption-conditioned ones.
PREDICTOR_PREFIXES = ("visual.predictors.", "visual.query_predictors.")


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
        aux: tuple[bool, bool] = (False, False),
        policy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BlockAux | None]:
        """Multi-head self-attention.

        Args:
            x: (B, N, C).
            bias: additive logit bias broadcastable to (B, h, N, N): padding masks, or
                ToMe's log(size) for proportional attention.
            aux: (want CLS attention, want keys) for the next pruning stage.
            policy: (B, N) DynamicViT's keep policy in training (1 kept, 0 dropped, differentiable): every
                token attends only to kept tokens and itself (`policy_attention`); None attends to all.

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
        y = _attend(q, k, v, bias) if policy is None else policy_attention(q, k, v, policy, bias)
        return self.proj(y.transpose(1, 2).reshape(B, N, C)), out_aux


def policy_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor, bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:  # fmt: skip
    """DynamicViT's attention under a keep policy: the softmax weights of dropped keys are zeroed and
    the rest renormalised, ``w_ij = p'_j exp(a_ij) / sum_l p'_l exp(a_il)`` with ``p'`` the policy where ``j != i``
    and 1 on the diagonal (a dropped token still sees itself), and ``eps`` keeping the sum positive. Written as a
    product, not as a ``log(policy)`` bias, so the gradient reaches a policy that is exactly 0 or 1.

    Args:
        q, k, v: (B, h, N, d).
        policy: (B, N) keep policy in [0, 1].
        bias: an additive logit bias, as `Attention.forward` takes.

    Returns:
        (B, h, N, d), in the dtype of `q`.

    The inputs are cast to float32, but under CPU autocast (bf16 training) the matmuls and the exponential
    still run in bf16, as they did for the shipped ``dynamicvit/`` (the reference code does its exponential
    in float32; the max is subtracted first, so every weight is in [0, 1] either way).
    """
    N = q.shape[-2]
    logits = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, h, N, N)
    if bias is not None:
        logits = logits + bias
    eye = torch.eye(N, device=q.device, dtype=torch.float32)
    keep = policy.float()[:, None, None, :]  # (B, 1, 1, N)
    keep = keep + (1.0 - keep) * eye
    w = (logits - logits.amax(-1, keepdim=True)).exp() * keep
    w = (w + eps / N) / (w.sum(-1, keepdim=True) + eps)
    return (w @ v.float()).to(q.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention; under CPU autocast (bf16 training) in float32, whose backward on CPU is
    faster than bf16's while the projections around it gain from bf16 (`benchmarks.train_step` measures it)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's CLIPs were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# Modules without parameters, so the activation never changes a checkpoint's tensor names.
ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Block(nn.Module):
    """Pre-norm transformer block.

    Args:
        width: token width C.
        heads: attention heads.
        mlp_width: hidden size of the MLP.
        act: the MLP activation, a key of `ACTIVATION_MODULES`.
        eps: epsilon of both layer norms.
    """

    def __init__(self, width: int, heads: int, mlp_width: int, act: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), ACTIVATION_MODULES[act](), nn.Linear(mlp_width, width))

    def attend(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        aux: tuple[bool, bool] = (False, False),
        policy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BlockAux | None]:
        """The attention half, residual included: where EViT and ToMe prune, before the MLP."""
        y, block_aux = self.attn(self.norm1(x), bias=bias, aux=aux, policy=policy)
        return x + y, block_aux

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP half, residual included."""
        return x + self.mlp(self.norm2(x))

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        aux: tuple[bool, bool] = (False, False),
        policy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BlockAux | None]:
        x, block_aux = self.attend(x, bias=bias, aux=aux, policy=policy)
        return self.feed_forward(x), block_aux


@dataclass
class _Walk:
    """What a forward pass carries from stage to stage, in original patch positions."""

    info: MethodInfo
    want: tuple[bool, bool]  # (CLS attention, keys): the signals the method's stages read from a block
    groups: torch.Tensor  # (B, P) token each original patch now belongs to, -1 if dropped
    pos: torch.Tensor  # (B, n) original patch each token stands for, -1 for a fused token
    size: torch.Tensor | None = None  # (B, 1 + n) patches per token, for methods that merge or fuse by size
    generator: torch.Generator | None = None  # the seeded generator of ``random``

    @classmethod
    def start(cls, x: torch.Tensor, prune: PruneSpec, info: MethodInfo) -> "_Walk":
        B, N, _ = x.shape
        ident = torch.arange(N - 1, device=x.device).expand(B, -1)
        generator = None
        if "seed" in info.signals:
            generator = torch.Generator(device=x.device).manual_seed(prune.seed)
        want = ("cls_attn" in info.signals, "keys" in info.signals)
        return cls(info, want, groups=ident, pos=ident, generator=generator)


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid * grid, width) 2-D sine-cosine position codes (MAE's): half the channels code the row, half the
    column, each as sines and cosines of the coordinate at geometrically spaced frequencies."""
    if width % 4:
        raise ValueError(f"sincos position codes need a width divisible by 4, got {width}.")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))  # (C/4,)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = [f(c.flatten()[:, None] * omega) for c in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def conv_stem(channels: tuple[int, ...], width: int, patch: int) -> nn.Sequential:
    """`VisionConfig.stem`: 3x3 stride-2 convolutions with GELU from RGB to ``channels[-1]`` (He-initialised, so
    the activations keep their scale), then a ``patch`` x ``patch`` projection to `width`, zero-initialised so
    that the stem adds nothing to the patch embedding until training gives it weight."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip((3, *channels[:-1]), channels):
        conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.GELU()]
    proj = nn.Conv2d(channels[-1], width, patch, patch, bias=False)
    nn.init.zeros_(proj.weight)
    return nn.Sequential(*layers, proj)


class VisionTransformer(nn.Module):
    """A ViT with a CLS token and pruning stages before or inside its blocks."""

    def __init__(self, cfg: VisionConfig, pruning: PruningConfig, embed_dim: int):
        super().__init__()
        for s in pruning.stages:
            if not 0 < s < cfg.depth:
                raise ValueError(f"pruning stage {s} must sit between blocks (1..{cfg.depth - 1}).")
        self.cfg, self.pruning = cfg, pruning
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        # None without a stem: no parameters, so configs without one keep their tensor names.
        self.stem = conv_stem(cfg.stem, cfg.width, cfg.stem_patch) if cfg.stem else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        pos = torch.randn(1, 1 + cfg.num_patches, cfg.width) * 0.02
        if cfg.pos_init == "sincos":
            pos[0, 1:] = sincos_2d(cfg.grid, cfg.width)
        self.pos_embed = nn.Parameter(pos)  # learned either way
        # Identity when off: no parameters, so configs without pre_norm keep their tensor names.
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(_blocks(cfg))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.predictors = nn.ModuleList(
            PredictorLG(cfg.width) if pruning.predictor == "lg" else KeepPredictor(cfg.width, pruning.predictor_hidden)
            for _ in pruning.stages
        )
        self.embed_dim = embed_dim
        self.query_predictors = nn.ModuleList()  # text_guided's, one per stage: see `add_query_predictors`

    def add_query_predictors(self, seed: int = 0) -> None:
        """Build the caption-conditioned keep predictors of ``text_guided`` (untrained), if there are none.

        Their initial weights come from `seed` alone (PyTorch's default initialisation, on a
        forked generator), so adding them changes no other weight and no later random draw.
        """
        if len(self.query_predictors):
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            made = [QueryKeepPredictor(self.cfg.width, self.embed_dim, self.pruning.predictor_hidden,
                                       self.pruning.query_mlp) for _ in self.pruning.stages]  # fmt: skip
        device = self.pos_embed.device
        self.query_predictors.extend(p.to(device) for p in made)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, 1 + P, C) tokens that enter block 0 (pre-normed if configured)."""
        x = self.patch_embed(pixels)
        if self.stem is not None:
            x = x + self.stem(pixels)
        x = x.flatten(2).transpose(1, 2)  # (B, P, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pre_norm(x + self.pos_embed)

    def caption_keep_logits(self, index: int, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Keep logits of stage `index`'s caption-conditioned predictor (``text_guided``).

        Args:
            index: the stage, 0-based, among the config's ``pruning.stages``.
            patches: (B, n, C).
            text: (B or 1, E) normalised caption embeddings.

        Returns:
            (B, n) logits.

        Raises:
            ValueError: the model has no caption-conditioned predictors (a checkpoint saved before they existed).
        """
        if not len(self.query_predictors):
            raise ValueError(
                "text_guided needs caption-conditioned keep predictors, and this model has none (a plain CLIP, or a "
                "checkpoint or add-on saved before they existed). Train them into pruned/ with: python -m "
                "training.train --phases pruned,finetune (a CLIP: python -m training.train --backbone SOURCE --out DIR)"
            )
        return self.query_predictors[index](patches, text)

    def stage_plan(self, prune: PruneSpec) -> tuple[tuple[int, ...], list[StagePlan]]:
        """The blocks where `prune` runs its stages, and the stages it runs (see `vlm_demo.pruning.plan`)."""
        mismatch = predictor_mismatch(prune.method, self.pruning)
        if mismatch:
            raise ValueError(mismatch)
        placement = self.pruning.placement if prune.stages is None else prune.stages
        args = (self.cfg.depth, self.pruning.stages, placement)
        blocks = resolve_stages(prune.method, *args)
        return blocks, plan(prune.method, prune.keep_ratio, self.cfg.num_patches, *args)

    def forward_features(self, pixels: torch.Tensor, prune: PruneSpec | None = None) -> tuple[torch.Tensor, Trace]:
        """Run the blocks, pruning at each stage (before a block, or inside it after attention).

        The pruned tokens are really removed (in training too), so the later blocks
        cost less.

        Args:
            pixels: (B, 3, H, W).
            prune: what to prune; None is the unpruned model.

        Returns:
            (B, 1 + k', C) final tokens and the `Trace`.
        """
        prune = prune or PruneSpec()
        info = get(prune.method)
        blocks, stages = self.stage_plan(prune)
        plan_at = {st.block: st for st in stages}
        x = self.embed(pixels)
        trace = Trace(prune.method, self.cfg.grid, stage_blocks=blocks)
        walk = _Walk.start(x, prune, info)
        aux: BlockAux | None = None
        for i, block in enumerate(self.blocks):
            st = plan_at.get(i)
            if st is not None and not info.inside:
                x = self._prune(x, st, aux, walk, trace, blocks.index(i), prune)
            bias = None if walk.size is None else walk.size.log()[:, None, None, :]
            if st is not None and info.inside:
                x, aux = block.attend(x, bias=bias, aux=walk.want)
                x = block.feed_forward(self._prune(x, st, aux, walk, trace, blocks.index(i), prune))
            else:
                nxt = plan_at.get(i + 1)
                x, aux = block(x, bias=bias, aux=walk.want if nxt is not None and not info.inside else (False, False))
        return x, trace

    def _prune(
        self, x: torch.Tensor, st: StagePlan, aux: BlockAux | None, walk: "_Walk", trace: Trace, index: int,
        prune: PruneSpec,
    ) -> torch.Tensor:  # fmt: skip
        """Run one stage on (B, 1 + n, C) tokens; records it in `trace` and returns the new tokens."""
        B, N, _ = x.shape
        P = self.cfg.num_patches
        sig = Signals(size=walk.size, generator=walk.generator, fuse=prune.fuse)
        if aux is not None:
            sig.cls_attn, sig.keys = aux.cls_attn, aux.keys
        if "predictor" in walk.info.signals:
            sig.predictor = self.predictors[index].keep_scores(x[:, 1:])
        if walk.info.needs_caption:
            sig.text = self.caption_keep_logits(index, x[:, 1:], prune.text.to(x.dtype))
        red = walk.info.fn(x, st.keep, sig)
        stage_scores = None
        if red.scores is not None:
            # One spare column takes a fused token's score (its position is -1).
            stage_scores = torch.full((B, P + 1), float("nan"), device=x.device)
            stage_scores.scatter_(1, torch.where(walk.pos >= 0, walk.pos, P), red.scores.float())
            stage_scores = stage_scores[:, :P]
        alive = walk.groups >= 0
        walk.groups = torch.where(alive, red.source.gather(1, walk.groups.clamp_min(0)), walk.groups)
        walk.pos = torch.where(red.rep >= 0, walk.pos.gather(1, red.rep.clamp_min(0)), red.rep)
        walk.size = red.size
        trace.stages.append(Stage(block=st.block, kept=walk.pos, groups=walk.groups, scores=stage_scores))
        return red.x

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pool any number of tokens (the CLS token) and project: (B, N, C) -> (B, E)."""
        return self.proj(self.norm(tokens[:, 0]))

    def forward(self, pixels: torch.Tensor, prune: PruneSpec | None = None) -> tuple[torch.Tensor, Trace]:
        tokens, trace = self.forward_features(pixels, prune)
        return self.forward_head(tokens), trace


class TextTransformer(nn.Module):
    """A transformer over token ids; pools the leading <cls> token, or CLIP's end-of-text token."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.context_length, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(_blocks(cfg))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, E) unnormalised embeddings."""
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]  # (B, L, C)
        bias = self.attention_bias(ids, x.dtype)
        for block in self.blocks:
            x, _ = block(x, bias=bias)
        return self.proj(self.norm(self.pool(x, ids)))

    def attention_bias(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive logit bias, -inf on padding keys (`pad_id`) and, if causal, on later tokens.

        Args:
            ids: (B, L) token ids.
            dtype: the dtype of the tokens.

        Returns:
            (B, 1, 1, L), (L, L) or (B, 1, L, L), or None when nothing is masked.
        """
        bias = None
        if self.cfg.pad_id is not None:
            bias = torch.zeros(ids.shape, dtype=dtype, device=ids.device)
            bias = bias.masked_fill(ids == self.cfg.pad_id, float("-inf"))[:, None, None, :]  # (B, 1, 1, L)
        if self.cfg.causal:
            L = ids.shape[1]
            causal = torch.full((L, L), float("-inf"), dtype=dtype, device=ids.device).triu(1)  # (L, L)
            bias = causal if bias is None else bias + causal
        return bias

    def pool(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The token each caption is represented by: (B, L, C) -> (B, C).

        ``eos`` follows transformers' CLIPTextModel to the letter: with the legacy
        ``eos_token_id == 2`` the position of the largest id, else the first position
        holding ``eos_token_id`` (position 0 when there is none).
        """
        if self.cfg.pool == "cls":
            return x[:, 0]
        if self.cfg.eos_token_id == 2:
            at = ids.argmax(dim=-1)  # (B,)
        else:
            at = (ids == self.cfg.eos_token_id).int().argmax(dim=-1)  # (B,)
        return x[torch.arange(x.shape[0], device=x.device), at]


def _blocks(cfg: VisionConfig | TextConfig) -> Iterator[Block]:
    return (Block(cfg.width, cfg.heads, cfg.mlp_width, cfg.act, cfg.layer_norm_eps) for _ in range(cfg.depth))


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
        if cfg.text.init == "clip":
            clip_text_init(self.text)
        if cfg.pruning.query_predictors:
            self.visual.add_query_predictors()  # after the initialisation above, which they leave unchanged

    def enable_query_predictors(self, mlp: bool | None = None) -> None:
        """Give a model loaded from a checkpoint saved before they existed untrained query predictors.

        Sets ``pruning.query_predictors`` in its config, so that a save writes them too.

        Args:
            mlp: their caption side (`PruningConfig.query_mlp`); None: the config's. Where it differs
                from the config, the query predictors are built afresh, untrained: only for a baseline,
                whose phase never trains them (``training.train``'s pruned phase asks for the current kind).
        """
        pruning = self.cfg.pruning
        mlp = pruning.query_mlp if mlp is None else mlp
        if not pruning.query_predictors or pruning.query_mlp != mlp:
            if pruning.query_mlp != mlp:
                self.visual.query_predictors = nn.ModuleList()
            self.cfg = self.cfg.replace(pruning=dataclasses.replace(pruning, query_predictors=True, query_mlp=mlp))
            self.visual.pruning = self.cfg.pruning
            self._hub_mixin_config = self.cfg.to_dict()  # what save_pretrained writes to config.json
        self.visual.add_query_predictors()

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


def same_text_tower(a: DualEncoder, b: DualEncoder) -> bool:
    """Whether two models embed every caption alike: equal text towers and logit scales, tensor for tensor.

    The checkpoints the methods run (baseline/, pruned/, dynamicvit/) must share the baseline's caption
    embedding, or their scores would not be comparable; one trained from an older baseline fails this.
    """
    sa, sb = a.state_dict(), b.state_dict()

    def text(state: dict[str, torch.Tensor]) -> list[str]:
        return [n for n in state if n.startswith("text.") or n == "logit_scale"]

    names = text(sa)
    return names == text(sb) and all(
        sa[n].shape == sb[n].shape and torch.equal(sa[n].cpu(), sb[n].cpu()) for n in names
    )


def load_optional(folder: Path, name: str, baseline: DualEncoder, device: str | torch.device = "cpu") -> DualEncoder:
    """Load the optional checkpoint `folder` (``dynamicvit/``) that serves beside `baseline`.

    Raises:
        ValueError: it cannot be read, or it was not made from this baseline for `name`: other image tower
            shape, another caption embedding (`same_text_tower`), or not the keep predictors and stages
            `vlm_demo.pruning.checkpoint_config` gives (what flops prices it with).
    """
    model, _ = load_checkpoint(folder, device)
    own = next(checkpoint_config(baseline.cfg, m) for m, info in REGISTRY.items() if info.checkpoint == name)
    if model.cfg.vision != baseline.cfg.vision or not same_text_tower(model, baseline):
        raise ValueError(f"{folder} was not trained from {folder.parent / 'baseline'} (its towers differ)")
    if (model.cfg.pruning.predictor, model.cfg.pruning.stages) != (own.pruning.predictor, own.pruning.stages):
        raise ValueError(f"{folder} has {model.cfg.pruning.predictor!r} keep predictors before blocks "
                         f"{list(model.cfg.pruning.stages)}, not {own.pruning.predictor!r} ones before "
                         f"{list(own.pruning.stages)}")  # fmt: skip
    return model


def clip_text_init(text: TextTransformer) -> None:
    """OpenAI CLIP's initialisation of its text transformer (``CLIP.initialize_parameters``), in place.

    Token embedding std 0.02, positions 0.01; per block the attention's q, k, v projection std width^-0.5, its
    output projection and the MLP's second layer width^-0.5 * (2 depth)^-0.5, the MLP's first layer
    (2 width)^-0.5; the final projection width^-0.5; biases 0 (CLIP zeroes its attention biases too, but leaves
    its MLP biases at nn.Linear's default uniform init: a deliberate deviation, of about 1 % of the MLP output's
    variance at this width, that keeps the project's convention of zero biases).

    At this project's width of 128, the trunc_normal init's std 0.02 leaves the attention logits near 0, so
    attention starts uniform and the tower reads its caption as a bag of words for thousands of steps
    (``python -m benchmarks.text_binding``).
    """
    width = text.cfg.width
    attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
    proj_std = attn_std * (2 * len(text.blocks)) ** -0.5
    with torch.no_grad():
        nn.init.normal_(text.token_embed.weight, std=0.02)
        nn.init.normal_(text.pos_embed, std=0.01)
        for block in text.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp[0].weight, std=fc_std)
            nn.init.normal_(block.mlp[-1].weight, std=proj_std)
        nn.init.normal_(text.proj.weight, std=attn_std)


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
    never a half-written mix; a stale temporary folder starts with a dot. Killed
    between its two renames, it leaves no `folder` and the previous one in
    ``.<name>.old``. The next write into `folder` removes what killed writers left.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    # The pid in the name tells a later writer whether this one is still running.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    try:
        yield tmp
        old = _old_folder(folder)
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _old_folder(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary folders of writers into `folder` that died (their pid is gone)."""
    for tmp in folder.parent.glob(f".{glob.escape(folder.name)}.tmp-*"):
        found = re.fullmatch(rf"\.{re.escape(folder.name)}\.tmp-(\d+)-\w+", tmp.name)
        if found is None or not _process_exists(int(found.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def save_checkpoint(model: DualEncoder, tokenizer: Tokenizer, folder: str | os.PathLike, **extra: Any) -> Path:
    """Write config.json, model.safetensors and vocab.json atomically (see `atomic_folder`).

    A model card (README.md) already in `folder` is kept: ``training.report`` fills its generated
    blocks, and the Hub mixin's placeholder card would otherwise replace it on every retrain.

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
    card = Path(folder) / "README.md"
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        if card.is_file():
            (tmp / "README.md").write_bytes(card.read_bytes())
        tokenizer.save(tmp)
        if extra:
            (tmp / "training.json").write_text(json.dumps(extra, indent=2))
    return Path(folder)


def load_checkpoint(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[DualEncoder, Tokenizer]:
    """Load a checkpoint folder written by `save_checkpoint`; never touches the network, never unpickles.

    Every file is checked before any weight is read, and each problem is a ValueError
    that names the file: a missing file, a pickle (``.bin``, ``.pt``, ...) instead of
    safetensors, a config.json that is not JSON or not a model, a truncated or corrupt
    safetensors header, tensors missing, unexpected or misshapen for config.json, a
    vocabulary the model cannot embed, and weights that are NaN or infinite.
    safetensors has no checksum: a flipped byte inside the tensor data goes unnoticed
    unless it makes a value NaN or infinite.

    Args:
        folder: a local folder with config.json, model.safetensors and vocab.json.
        device: where to put the model.

    Returns:
        (model in eval mode, tokenizer).

    Raises:
        ValueError: the folder is not a complete, consistent checkpoint (see above).
    """
    folder = Path(folder)
    _check_checkpoint_files(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    cfg, expected = _read_config(config_path)
    tokenizer = Tokenizer.load(folder)
    vocab_path = folder / VOCAB_FILE
    if len(tokenizer) > cfg.text.vocab_size or tokenizer.context_length > cfg.text.context_length:
        raise ValueError(
            f"{vocab_path} does not fit {config_path}: {len(tokenizer)} words and captions of "
            f"{tokenizer.context_length} tokens, but the text encoder has room for {cfg.text.vocab_size} words "
            f"and {cfg.text.context_length} tokens. Save the checkpoint again with its own vocabulary."
        )
    _check_weights(weights_path, expected, config_path)
    try:
        # A local folder: the mixin reads config.json and model.safetensors and makes no Hub call.
        model = DualEncoder.from_pretrained(str(folder), map_location=str(device), strict=True)
    except (SafetensorError, RuntimeError, OSError) as error:
        raise ValueError(f"{weights_path} could not be read: {error}") from error
    for name, tensor in model.state_dict().items():
        # numpy, not torch: a hundred tiny OpenMP kernels can stall for seconds on busy cores.
        if tensor.is_floating_point() and not np.isfinite(tensor.detach().cpu().float().numpy()).all():
            raise ValueError(
                f"{weights_path}: tensor {name} holds NaN or infinite values (a corrupt file, or a run that "
                "diverged). Use an earlier checkpoint or train again."
            )
    return model.to(device).eval(), tokenizer


def _check_checkpoint_files(folder: Path) -> None:
    """Raise a ValueError that says what is missing from `folder`, or which pickle it holds instead."""
    if not folder.is_dir():
        old = _old_folder(folder)
        hint = f" A save into it was interrupted; the previous checkpoint is in {old}." if old.is_dir() else ""
        raise ValueError(f"{folder} is not a checkpoint folder: it does not exist.{hint}")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(
            f"{folder / pickles[0]} is a pickle, which vlm_demo never loads (unpickling can run arbitrary code), "
            f"and {folder} has no {WEIGHTS_FILE}. Convert the weights to safetensors, or save the model "
            "with vlm_demo.model.save_checkpoint."
        )
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE) if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a checkpoint folder: {', '.join(missing)} missing.")


def _read_config(path: Path) -> tuple[ModelConfig, dict[str, tuple[int, ...]]]:
    """The config in `path` and the shape of every tensor its model has."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the checkpoint is damaged; save it again.") from error
    try:
        cfg = ModelConfig.from_dict(data)
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            shapes = {name: tuple(t.shape) for name, t in DualEncoder(cfg).state_dict().items()}
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as error:
        raise ValueError(f"{path} does not describe a model vlm_demo can build: {error}") from error
    return cfg, shapes


def _check_weights(path: Path, expected: dict[str, tuple[int, ...]], config_path: Path) -> None:
    """Read the safetensors header of `path` and compare its tensors with `expected`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path} is truncated or corrupt ({error}). Save the checkpoint again, or download it again."
        ) from error
    problems = []
    if missing := sorted(expected.keys() - found.keys()):
        problems.append(f"{len(missing)} tensor(s) missing ({_some(missing)})")
    if unexpected := sorted(found.keys() - expected.keys()):
        problems.append(f"{len(unexpected)} unexpected tensor(s) ({_some(unexpected)})")
    misshapen = [f"{n} is {list(found[n])}, not {list(expected[n])}" for n in sorted(expected.keys() & found.keys())
                 if found[n] != expected[n]]  # fmt: skip
    if misshapen:
        problems.append(f"{len(misshapen)} tensor(s) of the wrong shape ({_some(misshapen)})")
    if problems:
        raise ValueError(
            f"{path} does not match {config_path}: {'; '.join(problems)}. Were the weights and the config "
            "taken from different checkpoints, or was config.json edited?"
        )


def _some(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
