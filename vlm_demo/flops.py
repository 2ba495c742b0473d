"""Honest compute accounting for both towers: fvcore counts, checked against a closed form.

Units: fvcore's "flop" is one multiply-accumulate, so every figure here is in
**MACs** (GMACs = 1e9 MACs). Where FLOPs are shown, FLOPs = 2 x MACs.

fvcore counts neither ``scaled_dot_product_attention`` nor the small ops pruning
adds; its ``unsupported_ops()`` lists them and they would silently count 0. Here
every operator the encoder runs has a handle:

- ``scaled_dot_product_attention``: ``B h Nq Nk (d + dv)`` MACs (QK^T and AV);
- matmul-class ops (linear, conv, matmul, layer norm) keep fvcore's handles;
- element-wise, reduction and indexing ops (add, GELU, softmax, top-k, gather, ...)
  are registered with 0 MACs on purpose: they do no multiply-accumulate, and in this
  model they touch well under 1% as many elements as there are MACs.

`closed_form_gmacs` recomputes the count from the configuration and the token
counts per block; the tests hold fvcore to it within 2% for every method and keep
ratio. Counts depend only on (config, method, keep ratio, batch), so they are cached.

The text tower is counted the same way (`text_gmacs`, `closed_form_text_gmacs`): one
caption of the model's full context length, every position attended (a causal mask
skips no multiply in ``scaled_dot_product_attention``), the embedding lookup 0 MACs.
Published CLIP figures often add both towers; `vlm_demo.bench` prints them side by side.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import write_text_atomic
from .config import ModelConfig
from .pruning import BASELINE, PruneSpec, StageShape, blocks_for, checkpoint_config, get, plan, token_schedule

# Ops that do no multiply-accumulate: counted as 0 MACs, explicitly.
ZERO_MAC_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::div", "aten::pow", "aten::neg",
    "aten::gelu", "aten::softmax", "aten::log_softmax", "aten::log", "aten::exp", "aten::sigmoid", "aten::mean",
    "aten::sum",
    "aten::amax", "aten::max", "aten::linalg_vector_norm", "aten::clamp", "aten::clamp_min", "aten::expand_as",
    "aten::topk", "aten::sort", "aten::argsort", "aten::gather", "aten::scatter", "aten::scatter_",
    "aten::scatter_add", "aten::scatter_add_", "aten::clone", "aten::lt", "aten::gt", "aten::ge", "aten::eq",
    "aten::where", "aten::masked_fill",
    "aten::rand", "aten::log_", "aten::full", "aten::full_like", "aten::ones", "aten::zeros", "aten::eye",
    "aten::index", "aten::index_put_", "aten::arange", "aten::fill_", "aten::copy_", "aten::empty",
    "aten::empty_like", "aten::repeat", "aten::flatten", "aten::cat", "aten::stack", "aten::detach",
    "aten::embedding", "aten::triu", "aten::argmax", "aten::sigmoid_",
)  # fmt: skip


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])  # (..., Nq, d), (..., Nk, d), (..., Nk, dv)
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _zero(inputs: list[Any], outputs: list[Any]) -> int:
    return 0


class _EncodeImage(nn.Module):
    """Wraps `encode_image` with a fixed `PruneSpec` so that fvcore can trace it."""

    def __init__(self, model: nn.Module, spec: PruneSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, self.spec)


class _EncodeText(nn.Module):
    """Wraps `encode_text` so that fvcore can trace it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids)


def _count(model: nn.Module, wrapper: nn.Module, inputs: tuple[torch.Tensor, ...]):
    """Run an fvcore `FlopCountAnalysis` of `wrapper` (around `model`) with every op handled."""
    from fvcore.nn import FlopCountAnalysis

    handles = {op: _zero for op in ZERO_MAC_OPS}
    handles["aten::scaled_dot_product_attention"] = _sdpa_macs
    was_training = model.training
    model.eval()
    try:
        fca = FlopCountAnalysis(wrapper, inputs).set_op_handle(**handles)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about data-dependent top-k: expected here
            logging.getLogger("fvcore").setLevel(logging.ERROR)
            fca.total()
    finally:
        model.train(was_training)
    return fca


def analysis(model: nn.Module, spec: PruneSpec, batch: int = 1):
    """An fvcore `FlopCountAnalysis` of ``model.encode_image`` with every op handled.

    Args:
        model: a `DualEncoder` (its weights do not change the count).
        spec: what to prune.
        batch: images per forward pass.

    Returns:
        The `FlopCountAnalysis` (already run); ``.total()`` is in MACs.
    """
    cfg = model.cfg.vision
    pixels = torch.zeros(batch, 3, cfg.image_size, cfg.image_size)
    return _count(model, _EncodeImage(model, spec), (pixels,))


def text_analysis(model: nn.Module, batch: int = 1):
    """An fvcore `FlopCountAnalysis` of ``model.encode_text`` on `batch` captions of the full context length.

    Args:
        model: a `DualEncoder` (its weights do not change the count).
        batch: captions per forward pass.

    Returns:
        The `FlopCountAnalysis` (already run); ``.total()`` is in MACs.
    """
    t = model.cfg.text
    ids = (torch.arange(t.context_length) % t.vocab_size).expand(batch, -1).contiguous()  # (B, L)
    return _count(model, _EncodeText(model), (ids,))


Placement = str | tuple[int, ...] | None  # see `PruneSpec.stages`; None: the config's pruning.placement


def _spec_for(cfg: ModelConfig, method: str, keep_ratio: float, fuse: bool, placement: Placement) -> PruneSpec:
    text = None
    if get(method).needs_caption:
        text = torch.nn.functional.normalize(torch.ones(1, cfg.embed_dim), dim=-1)
    return PruneSpec(method=method, keep_ratio=keep_ratio, text=text, fuse=fuse, stages=placement)


@functools.lru_cache(maxsize=4096)
def _cached_gmacs(
    config_json: str, method: str, keep_ratio: float, batch: int, fuse: bool, placement: Placement
) -> float:
    from .model import DualEncoder

    cfg = ModelConfig.from_dict(json.loads(config_json))
    torch.manual_seed(0)
    model = DualEncoder(cfg)
    if get(method).checkpoint == "pruned":
        model.enable_query_predictors()  # such methods run on pruned/, which has every predictor
    return analysis(model, _spec_for(cfg, method, keep_ratio, fuse, placement), batch).total() / 1e9


@functools.lru_cache(maxsize=64)
def _cached_text_gmacs(config_json: str, batch: int) -> float:
    from .model import DualEncoder

    torch.manual_seed(0)
    model = DualEncoder(ModelConfig.from_dict(json.loads(config_json)))
    return text_analysis(model, batch).total() / 1e9


def text_gmacs(cfg: ModelConfig, batch: int = 1) -> float:
    """fvcore GMACs of one text-encoder pass over `batch` captions of ``cfg.text.context_length`` tokens (cached)."""
    return _cached_text_gmacs(json.dumps(cfg.to_dict(), sort_keys=True), int(batch))


def gmacs(
    cfg: ModelConfig, method: str = "none", keep_ratio: float = 1.0, batch: int = 1, fuse: bool = True,
    placement: Placement = None,
) -> float:  # fmt: skip
    """fvcore GMACs of one image-encoder forward pass (cached).

    Args:
        cfg: the model configuration.
        method: a pruning method.
        keep_ratio: the keep ratio.
        batch: images per pass.
        fuse: EViT's fused token (see `PruneSpec.fuse`).
        placement: where the stages sit (see `PruneSpec.stages`).

    Returns:
        Giga multiply-accumulates for the whole batch.
    """
    cfg = checkpoint_config(cfg, method)  # a clear error for an unknown name; dynamicvit prices its own checkpoint
    if isinstance(placement, list):
        placement = tuple(placement)
    # Only the image encoder is counted: the text tower's settings (its vocabulary, say) do not enter the key.
    image_cfg = ModelConfig(vision=cfg.vision, pruning=cfg.pruning, embed_dim=cfg.embed_dim)
    config_json = json.dumps(image_cfg.to_dict(), sort_keys=True)
    args = (method, float(keep_ratio), int(batch), bool(fuse), placement)
    key = json.dumps([config_json, *args])
    value = _DISK.get(key)
    if value is None:
        value = _cached_gmacs(config_json, *args)
        _DISK.put(key, value)
    return value


class _DiskCache:
    """fvcore counts kept across processes, so a second start of the app skips the ~0.2 s traces.

    A count depends only on the configuration and the code that runs, so the file is named by a
    hash of that code (the model, the pruning registry and this counter) and of the fvcore and
    torch versions: a change to any of them starts a new file. ``$VLM_DEMO_CACHE`` sets the folder
    (default ``~/.cache/vlm_demo``); an unwritable folder only turns the cache off.
    """

    def __init__(self) -> None:
        self._data: dict[str, float] | None = None
        self._lock = threading.Lock()

    @functools.cached_property
    def path(self) -> Path:
        import fvcore

        here = Path(__file__).resolve().parent
        code = b"".join((here / f).read_bytes() for f in ("model.py", "pruning.py", "flops.py", "config.py"))
        salt = hashlib.sha1(code + f"{torch.__version__} {getattr(fvcore, '__version__', '')}".encode())
        folder = Path(os.environ.get("VLM_DEMO_CACHE") or Path.home() / ".cache" / "vlm_demo")
        return folder / f"gmacs-{salt.hexdigest()[:16]}.json"

    def _load(self) -> dict[str, float]:
        if self._data is None:
            try:
                self._data = {k: float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (OSError, ValueError, AttributeError):
                self._data = {}
        return self._data

    def get(self, key: str) -> float | None:
        with self._lock:
            return self._load().get(key)

    def put(self, key: str, value: float) -> None:
        with self._lock:
            data = self._load()
            data[key] = value
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.path, json.dumps(data))
            except OSError:
                pass  # a read-only home: the in-process cache still holds


_DISK = _DiskCache()


def block_tokens(
    cfg: ModelConfig, method: str, keep_ratio: float, fuse: bool = True, placement: Placement = None
) -> list[tuple[int, int]]:
    """(attention, MLP) tokens, CLS included, of each block; see `vlm_demo.pruning.token_schedule`."""
    cfg = checkpoint_config(cfg, method)
    v, p = cfg.vision, cfg.pruning
    where = p.placement if placement is None else placement
    return token_schedule(v.num_patches, p.stages, v.depth, method, keep_ratio, fuse, where)


def tokens_per_block(
    cfg: ModelConfig, method: str, keep_ratio: float, fuse: bool = True, placement: Placement = None
) -> list[int]:
    """Tokens (CLS included) that enter each block."""
    return [a for a, _ in block_tokens(cfg, method, keep_ratio, fuse, placement)]


def tokens_per_stage(
    cfg: ModelConfig, method: str, keep_ratio: float, fuse: bool = True, placement: Placement = None
) -> list[int]:
    """Patch tokens (a fused token included) before the first stage and after each one.

    What `Trace.tokens_per_stage` reports for the same pass, without running the model.
    """
    blocks = blocks_for(cfg, method, placement)
    pairs = block_tokens(cfg, method, keep_ratio, fuse, placement)
    P = cfg.vision.num_patches
    return [P] + [pairs[b][1] - 1 for b in blocks]


def closed_form_gmacs(
    cfg: ModelConfig, method: str = "none", keep_ratio: float = 1.0, batch: int = 1, fuse: bool = True,
    placement: Placement = None,
) -> float:  # fmt: skip
    """GMACs from a per-block formula at the actual token counts.

    Per block with N tokens at attention and M at the MLP (they differ where a stage
    prunes inside the block), width C, MLP width H: QKV ``3NC^2`` + projection ``NC^2``
    + attention matmuls ``2N^2 C`` + MLP ``2MCH`` + two layer norms ``5NC + 5MC``
    (fvcore's convention for an affine norm). Plus the patch embedding (and a convolutional stem), CLIP's pre-norm,
    the head, and each stage's scoring cost, which the method's registry entry states
    (`MethodInfo.scoring_macs`). A method that runs its own checkpoint (``dynamicvit``) is priced on that
    checkpoint's config (`vlm_demo.pruning.checkpoint_config`), as `gmacs` prices it.
    """
    cfg = checkpoint_config(cfg, method)
    v, p = cfg.vision, cfg.pruning
    C, H, P, E = v.width, v.mlp_width, v.num_patches, cfg.embed_dim
    macs, side, c_in = P * C * 3 * v.patch_size**2, v.image_size, 3  # patch embedding
    for c in v.stem:  # the convolutional stem: 3x3, stride 2, padding 1, then its projection to the patches
        side = (side + 1) // 2
        macs += side * side * c_in * 9 * c
        c_in = c
    if v.stem:
        macs += P * C * c_in * v.stem_patch**2
    if v.pre_norm:
        macs += 5 * (1 + P) * C
    info = get(method)
    where = p.placement if placement is None else placement
    stages = {st.block for st in plan(method, keep_ratio, P, v.depth, p.stages, where)}
    pairs = block_tokens(cfg, method, keep_ratio, fuse, placement)
    for i, (N, M) in enumerate(pairs):
        macs += 4 * N * C * C + 2 * N * N * C + 5 * N * C + 2 * M * C * H + 5 * M * C
        if i in stages:
            n_in = (N if info.inside else pairs[i - 1][1]) - 1  # patch tokens the stage receives
            n_out = (M if info.inside else N) - 1
            macs += info.scoring_macs(StageShape(n_in, n_out, C, v.heads, E, p.predictor_hidden, p.query_mlp))
    macs += 5 * C + C * E  # final norm and projection of the CLS token
    return batch * macs / 1e9


KEEP_GRID = tuple(r / 100 for r in range(1, 101))  # the keep ratios `keep_ratio_for` chooses from


def keep_ratio_for(
    cfg: ModelConfig, method: str, fraction: float = 0.5, placement: Placement = None,
    grid: tuple[float, ...] = KEEP_GRID,
) -> float:  # fmt: skip
    """The keep ratio of `grid` whose GMACs are closest to `fraction` of the baseline's: matched compute.

    The closed form is searched (it equals fvcore's count, tests/test_flops.py), so a search costs no trace;
    on a tie the first of `grid` wins.
    """
    base = closed_form_gmacs(cfg, BASELINE)
    return min(
        grid,
        key=lambda r: abs(closed_form_gmacs(cfg, method, r, placement=placement) / base - fraction),
    )


def closed_form_text_gmacs(cfg: ModelConfig, batch: int = 1) -> float:
    """GMACs of the text tower from a per-block formula, for captions of the full context length.

    Per block with L tokens, width C, MLP width H: QKV ``3LC^2`` + projection ``LC^2`` +
    attention matmuls ``2L^2 C`` (a causal mask saves none) + MLP ``2LCH`` + two layer
    norms ``10LC``; then the final norm and the projection of the pooled token. The
    token-embedding lookup is no multiply-accumulate.
    """
    t = cfg.text
    L, C, H, E = t.context_length, t.width, t.mlp_width, cfg.embed_dim
    macs = t.depth * (4 * L * C * C + 2 * L * L * C + 2 * L * C * H + 10 * L * C)
    macs += 5 * C + C * E
    return batch * macs / 1e9
