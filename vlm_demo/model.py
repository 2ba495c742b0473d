"""A CLIP-style dual encoder whose ViT prunes tokens in stages between blocks.

Shape legend: B batch, N tokens (CLS first), n patch tokens, P patches of the
full grid, C width, h heads, d head width, L caption length, E embedding size.
"""

from __future__ import annotations

import contextlib
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
from .pruning import KeepPredictor, PruneSpec, Signals, Stage, Trace, get, keep_counts
from .tokenizer import VOCAB_FILE, Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # refused: loading them unpickles


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
    ) -> tuple[torch.Tensor, BlockAux | None]:
        """Multi-head self-attention.

        Args:
            x: (B, N, C).
            bias: additive logit bias broadcastable to (B, h, N, N): padding masks, or
                ToMe's log(size) for proportional attention.
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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.transpose(1, 2).reshape(B, N, C)), out_aux


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
        aux: tuple[bool, bool] = (False, False),
    ) -> tuple[torch.Tensor, BlockAux | None]:
        y, block_aux = self.attn(self.norm1(x), bias=bias, aux=aux)
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

        The pruned tokens are really removed (in training too), so the later blocks
        cost less.

        Args:
            pixels: (B, 3, H, W).
            prune: what to prune; None is the unpruned model.

        Returns:
            (B, 1 + k', C) final tokens and the `Trace`.
        """
        prune = prune or PruneSpec()
        x = self.embed(pixels)
        B, N, _ = x.shape
        trace = Trace(prune.method, self.cfg.grid, stage_blocks=self.pruning.stages)
        stages = self.pruning.stages if prune.active else ()
        counts = dict(zip(stages, keep_counts(self.cfg.num_patches, prune.keep_ratio, len(stages))))
        info = get(prune.method)
        want = ("cls_attn" in info.signals, "keys" in info.signals)
        generator = None
        if "seed" in info.signals:
            generator = torch.Generator(device=pixels.device).manual_seed(prune.seed)

        groups = torch.arange(N - 1, device=x.device).expand(B, -1)  # (B, P) token of each original patch
        pos = groups  # (B, n) original patch each token stands for
        size: torch.Tensor | None = None  # (B, 1 + n) sizes, for methods that merge or fuse by size
        aux: BlockAux | None = None
        for i, block in enumerate(self.blocks):
            if i in counts:
                k = counts[i]
                si = stages.index(i)
                sig = Signals(size=size, generator=generator, fuse=prune.fuse)
                if aux is not None:
                    sig.cls_attn, sig.keys = aux.cls_attn, aux.keys
                if info.needs_predictor:
                    sig.predictor = self.predictors[si](x[:, 1:])
                if info.needs_caption:
                    sig.text = self.patch_scores_against(x[:, 1:], prune.text.to(x.dtype))
                red = info.fn(x, k, sig)
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
            x, aux = block(x, bias=bias, aux=want if next_is_stage else (False, False))
        return x, trace

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
