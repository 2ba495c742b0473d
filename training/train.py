"""Train the baseline, then the token-pruned model, then evaluate both.

    python -m training.train                       # synthetic data, default preset -> checkpoints/
    python -m training.train --preset tiny --out /tmp/ck
    python -m training.train --dataset flickr8k --data-root ~/data/flickr8k
    torchrun --nproc_per_node=2 -m training.train --preset tiny   # DDP: gloo on CPU, nccl on GPU
    python -m training.train --backbone wkcn/TinyCLIP-ViT-8M-16-Text-3M-YFCC15M --out addons/tinyclip

Phases:
1. **baseline**: the dual encoder from scratch, symmetric contrastive loss.
2. **pruned**: initialised from the baseline; the DynamicViT-style keep predictors
   learn to rank patches like the frozen baseline's saliency (`training.saliency`: the
   gradient norm of the image-caption cosine at each stage's input), with a listwise
   loss that serves every keep ratio at once; in the same steps ``text_guided``'s
   caption-conditioned predictors learn each caption's share of the cosine (`training.query`),
   with their own learning rate (``TrainConfig.query_lr``) and gradient clipping. The
   towers stay frozen, so both
   checkpoints share one caption embedding. Each step also reports, without training
   on it, the cosine distillation loss of the pruned embedding to the baseline's at a
   keep ratio drawn from ``keep_ratio_range``: the log shows it fall as the predictors learn.
3. **finetune**: as DynamicViT fine-tunes its backbone under its own pruning, ``pruned/``'s
   image tower, started from the baseline's, trains for ``TrainConfig.finetune_steps`` steps
   to give the frozen baseline's embedding (the cosine distillation loss) while ``learned``
   prunes it at a keep ratio drawn from ``keep_ratio_range``; the keep predictors and the text
   tower stay frozen, so the caption embedding is still the baseline's.
4. **evaluate**: `training.evaluate` writes metrics.json, report.md and tradeoff.png.

``--backbone SOURCE`` (a HuggingFace CLIP folder or Hub id ``owner/name[@revision]``)
runs the pruned phase's recipe alone on that CLIP: its towers are frozen and are their
own teacher, images take its preprocessing (shortest-edge resize, centre crop, its
mean and std) and captions its tokenizer. Only the keep predictors (``learned``'s and
``text_guided``'s) are written, into
an add-on folder (``--out``, required; see `vlm_demo.addon`) that ``vlm_demo.api.load``
and ``training.evaluate --backbone`` load together with the backbone it names. The
preset gives only the schedule. An add-on as SOURCE continues from its predictors, of
the kind it has (an add-on saved before the caption MLP keeps its linear ones).

Every random choice derives from ``--seed`` and the (epoch, step), and the resume
state (weights + AdamW moments, safetensors) is written atomically at the end of each
epoch, so ``--resume`` after a crash, even SIGKILL, ends bit-identical to an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from training.data import CaptionDataset, TrainDataset, load_objects, load_splits, make_collate
from training.losses import contrastive_loss, distill_loss, keep_rank_loss, pair_loss
from training.query import Scene, query_loss, query_text, subset_captions
from training.layout import LayoutCode, layout_targets
from training.synthetic import HARD_NEGATIVE_ATTRS, fresh_hard_negatives, hard_negative_odds
from training.saliency import stage_effects, stage_saliency
from vlm_demo import addon, cli, pruning
from vlm_demo.atomic import write_text_atomic
from vlm_demo.config import PRECISIONS, PRESETS, TEXT_INITS, ModelConfig, Preset, TrainConfig, get_preset
from vlm_demo.model import PREDICTOR_PREFIXES, DualEncoder, atomic_folder, load_checkpoint, save_checkpoint
from vlm_demo.pruning import PruneSpec
from vlm_demo.tokenizer import TextTokenizer, Tokenizer

log = logging.getLogger("training.train")

CAPTION_BANK_FILE = "caption_bank.json"  # the test captions the app ranks (vlm_demo.api reads it)
BUILD_FILE = "training.json"  # under --out: the wall time of the last run, end to end (phases' own: in their folders)
RESUME_DIR = ".resume"  # under --out: one folder per phase, removed when the run succeeds
PREDICTORS, QUERY = PREDICTOR_PREFIXES  # learned's keep predictors; text_guided's caption-conditioned ones
MAX_LOGIT_SCALE = math.log(100.0)
IMAGE_TOWER = "visual."  # the image tower's parameters (the keep predictors among them: PREDICTOR_PREFIXES)


# ----------------------------------------------------------------------------- distributed


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def check_replicas(self, module: nn.Module, what: str) -> None:
        """Raise if the processes' copies of `module`'s parameters differ in any bit: only rank 0 saves them, so a
        divergence (gradients not averaged alike) would otherwise go unseen. Compares a SHA-256 of each copy."""
        if self.world <= 1:
            return
        digest = hashlib.sha256()
        for name, p in module.named_parameters():
            digest.update(name.encode())
            digest.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        device = next(module.parameters()).device
        mine = torch.frombuffer(bytearray(digest.digest()[:8]), dtype=torch.int64).to(device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        differ = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
        if differ:
            raise RuntimeError(f"{what}: the copies of ranks {differ} differ from rank 0's; the processes did not "
                               "train alike, so rank 0's checkpoint is not the run's result.")  # fmt: skip


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    return Dist(rank=rank, world=world, local_rank=local)


# ----------------------------------------------------------------------------- schedule


ADAMW = {"betas": (0.9, 0.98), "eps": 1e-6}  # every phase's AdamW settings but the learning rate and weight decay
GRAD_CLIP = 1.0  # the largest gradient norm a step applies, per clipped set of parameters


def warmup_for(tcfg: TrainConfig, total: int) -> int:
    """Linear warm-up steps of a phase of `total` steps: the config's, at most a quarter of the phase (+1)."""
    return min(tcfg.warmup_steps, total // 4 + 1)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, epoch: int, step: int) -> int:
    """A seed for one step's random draws (the monitored keep ratio), independent of earlier steps."""
    return (seed * 1_000_003 + epoch * 10_007 + step) % (2**31 - 1)


def param_groups(params: list[tuple[str, nn.Parameter]], wd: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, embeddings and the temperature."""
    decay, no_decay = [], []
    for name, p in params:
        (no_decay if p.ndim < 2 or "embed" in name or "cls_token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- resume state


def save_state(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Weights, AdamW moments and progress as safetensors + JSON, written atomically (no pickles)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))


def load_state(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore `save_state`; None if there is nothing to resume."""
    if not (folder / "state.json").is_file():
        return None
    tensors = load_file(str(folder / "state.safetensors"))
    device = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v if key == "step" else v.to(device)
    sd["state"] = state
    opt.load_state_dict(sd)
    return json.loads((folder / "state.json").read_text())


# ----------------------------------------------------------------------------- phases


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def _predictor_method() -> str:
    """The registered method that runs the (caption-free) keep predictors the pruned phase trains (``learned``)."""
    return next(m for m, i in pruning.REGISTRY.items() if "predictor" in i.signals and i.checkpoint == "pruned")


@dataclasses.dataclass
class _Phase:
    """One phase's training state, set up by `_setup_phase`."""

    name: str  # "baseline", "pruned" or "finetune"
    model: DualEncoder
    teacher: DualEncoder | None  # the frozen baseline the other phases learn from; None for the baseline
    net: nn.Module  # `model`, in DDP for the baseline phase on several processes
    params: list[tuple[str, nn.Parameter]]  # the parameters that train
    clip_sets: list[list[nn.Parameter]]  # gradient-clipped apart: text_guided's predictors apart from the rest
    opt: torch.optim.Optimizer
    loader: DataLoader
    sampler: DistributedSampler
    epochs: int
    peak: float  # peak learning rate
    meta: dict[str, Any]  # progress: epoch_done, losses, seconds_per_epoch (+ distill, query_losses); the resume state
    scenes: list[Scene | None] | None = None  # per training image, its objects (objects.json): text_guided's captions
    layout: LayoutCode | None = None  # the baseline's auxiliary layout objective (`training.layout`), if it has one
    max_steps: int | None = None  # steps per epoch, if fewer than the loader's (the finetune phase's)

    @property
    def query(self) -> bool:
        """The pruned phase trains text_guided's caption-conditioned predictors too."""
        return any(n.startswith(QUERY) for n, _ in self.params)

    @property
    def pruned(self) -> bool:
        """It learns from the frozen baseline (the pruned and finetune phases)."""
        return self.teacher is not None

    @property
    def steps(self) -> int:
        """Steps per epoch."""
        return len(self.loader) if self.max_steps is None else min(len(self.loader), self.max_steps)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps


def _trains(phase: str, name: str) -> bool:
    """Whether `phase` trains the parameter `name`: the baseline all but the idle keep predictors, the pruned
    phase the keep predictors alone (the frozen towers keep both checkpoints on one caption embedding), the
    finetune phase the image tower alone."""
    predictor = name.startswith(PREDICTOR_PREFIXES)
    if phase == "baseline":
        return not predictor
    if phase == "pruned":
        return predictor
    return name.startswith(IMAGE_TOWER) and not predictor


def _setup_phase(
    phase: str, model: DualEncoder, teacher: DualEncoder | None, dataset: TrainDataset, tokenizer: TextTokenizer,
    tcfg: TrainConfig, args: argparse.Namespace, dd: Dist, scenes: list[Scene | None] | None = None,
) -> _Phase:  # fmt: skip
    """Freeze what does not train, build the optimiser and the loader, and restore `--resume` state."""
    for name, p in model.named_parameters():
        p.requires_grad_(_trains(phase, name))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layout = None
    if phase == "baseline" and tcfg.layout_weight > 0 and scenes is not None:
        layout = LayoutCode(model.cfg.embed_dim).to(args.device)  # fixed buffers: nothing to train
    peak = {"baseline": tcfg.lr, "pruned": tcfg.pruned_lr, "finetune": tcfg.finetune_lr}[phase]
    # text_guided's predictors: their own learning rate (TrainConfig.query_lr) and their own gradient clipping, so
    # the other predictors train exactly as without them.
    query = [(n, p) for n, p in params if n.startswith(QUERY)]
    rest = [(n, p) for n, p in params if not n.startswith(QUERY)]
    groups = param_groups(rest, tcfg.weight_decay)
    if query:
        groups += [{**g, "lr_scale": tcfg.query_lr / peak} for g in param_groups(query, tcfg.weight_decay)]
    clip_sets = [[p for _, p in ps] for ps in (rest, query) if ps]
    opt = torch.optim.AdamW(groups, lr=peak, **ADAMW)
    net: nn.Module = model
    if dd.world > 1 and phase == "baseline":  # the other phases' gradients are averaged by hand (`_optimise`)
        cuda = torch.device(args.device).type == "cuda"
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dd.local_rank] if cuda else None)
    per_rank = max(1, tcfg.batch_size // dd.world)
    sampler = DistributedSampler(
        dataset, num_replicas=dd.world, rank=dd.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, drop_last=True, collate_fn=make_collate(tokenizer),
        num_workers=tcfg.num_workers,
    )  # fmt: skip
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} training images are fewer than one batch of {per_rank}; lower --batch-size.")
    meta: dict[str, Any] = {"epoch_done": 0, "losses": [], "seconds_per_epoch": []}
    if phase == "pruned":
        meta["distill"] = []  # per epoch: mean monitored distillation loss at the drawn keep ratios
        if query:
            meta["query_losses"] = []  # per epoch: text_guided's predictors' mean loss
    if layout is not None:
        meta["layout_losses"] = []  # per epoch: the auxiliary layout loss (`training.layout`)
    if args.resume:
        restored = load_state(_state_dir(args, phase), _trained_part(model, phase), opt)
        if restored is not None:
            meta = restored
            if dd.main:
                log.info("%s: resuming after epoch %d", phase, meta["epoch_done"])
    epochs = {"baseline": args.baseline_epochs, "pruned": args.pruned_epochs, "finetune": int(args.finetune_steps > 0)}
    max_steps = args.finetune_steps if phase == "finetune" else None
    return _Phase(phase, model, teacher, net, params, clip_sets, opt, loader, sampler, epochs[phase], peak, meta,
                  scenes, layout, max_steps)  # fmt: skip


def _trained_part(model: DualEncoder, phase: str) -> nn.Module:
    """What a phase's resume state holds: the whole model, the image tower, or only the keep predictors.
    The layout code (`training.layout`) is fixed by its seed, so it is not saved."""
    if phase == "baseline":
        return model
    if phase == "finetune":
        return _image_tower(model)
    if not len(model.visual.query_predictors):
        return model.visual.predictors
    return nn.ModuleDict({"predictors": model.visual.predictors, "query_predictors": model.visual.query_predictors})


def _image_tower(model: DualEncoder) -> nn.Module:
    """The image tower without its keep predictors, which the finetune phase leaves frozen: the parameters it
    trains, under the image tower's own names (the same tensors, not copies)."""
    predictors = {prefix.removeprefix(IMAGE_TOWER).rstrip(".") for prefix in PREDICTOR_PREFIXES}
    part = nn.Module()
    for name, child in model.visual.named_children():
        if name not in predictors:
            part.add_module(name, child)
    for name, param in model.visual.named_parameters(recurse=False):
        part.register_parameter(name, param)
    for name, buffer in model.visual.named_buffers(recurse=False):
        part.register_buffer(name, buffer)
    return part


def _state_dir(args: argparse.Namespace, phase: str) -> Path:
    return Path(args.out) / RESUME_DIR / phase


def _contrastive_loss(
    ph: _Phase, images: torch.Tensor, ids: torch.Tensor, hard: torch.Tensor | None, layout: torch.Tensor | None,
    precision: str = "fp32", pair_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The baseline's losses: symmetric InfoNCE, with each image's hard-negative captions (ids) if any, plus
    `pair_weight` times each image's true caption against its own hard negatives (`pair_loss`); and the
    auxiliary layout loss of both embeddings where `layout` (targets, `training.layout`) is given, else None.
    ``precision="bf16"`` runs the towers under autocast; the losses are computed in float32."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        img, txt = ph.net(images, ids=ids)
        hard_text = None if hard is None else ph.model.encode_text(hard)
    img, txt = img.float(), txt.float()
    hard_text = None if hard_text is None else hard_text.float()
    loss = contrastive_loss(img, txt, ph.model.logit_scale, hard_text)
    if hard_text is not None and pair_weight > 0:
        loss = loss + pair_weight * pair_loss(img, txt, ph.model.logit_scale, hard_text)
    if ph.layout is None or layout is None:
        return loss, None
    return loss, 0.5 * (ph.layout.loss(img, layout) + ph.layout.loss(txt, layout))


def _saliency_loss(
    ph: _Phase, images: torch.Tensor, ids: torch.Tensor, keep: float, index: list[int], tokenizer: TextTokenizer,
    seed: int, epoch: int,
) -> tuple[torch.Tensor, torch.Tensor | None, float]:  # fmt: skip
    """The pruned phase's losses: the predictors rank patches like the teacher's saliency, and text_guided's
    like each caption's share of the cosine (`training.query`), on captions naming part of a scene where `ph.scenes`
    can.

    Returns:
        (listwise loss, text_guided's loss or None, the monitored distillation loss at keep ratio `keep`, not
        trained on).
    """
    teacher = ph.teacher
    assert teacher is not None
    with torch.no_grad():
        text = teacher.encode_text(ids)
    states: list[torch.Tensor] | None = [] if ph.query else None  # the teacher's forward, shared with stage_effects
    tokens, saliency, target = stage_saliency(teacher, images, text, states)
    predictors = ph.model.visual.predictors
    loss = sum(keep_rank_loss(f(t), s) for f, t, s in zip(predictors, tokens, saliency)) / len(tokens)
    extra = None
    if ph.query:  # text_guided's predictors, on the same batch and stage tokens
        q_text, contrast = query_text(teacher, tokenizer, text, subset_captions(index, ph.scenes, seed, epoch))
        effects = stage_effects(teacher, images, states)
        extra = query_loss(ph.model.visual.query_predictors, tokens, effects, q_text, contrast)
    with torch.no_grad():  # monitored, not trained on: top-k has no gradient
        distill = distill_loss(ph.model.encode_image(images, PruneSpec(_predictor_method(), keep)), target).item()
    return loss, extra, distill


def _finetune_loss(ph: _Phase, images: torch.Tensor, keep: float, precision: str = "fp32") -> torch.Tensor:
    """The finetune phase's loss: the cosine distillation loss of the image tower's embedding, pruned by
    ``learned`` at keep ratio `keep`, to the frozen baseline's unpruned one. The gradient reaches the tower
    through the kept tokens and the fused background token (top-k itself has none). ``precision="bf16"`` runs
    the pruned tower under autocast; the loss is computed in float32."""
    assert ph.teacher is not None
    with torch.no_grad():
        target = ph.teacher.encode_image(images)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        student = ph.model.encode_image(images, PruneSpec(_predictor_method(), keep))
    return distill_loss(student.float(), target)


def _optimise(ph: _Phase, loss: torch.Tensor, dd: Dist) -> None:
    """One AdamW step on `loss` (gradients averaged across processes), clipped, logit scale kept in range."""
    ph.opt.zero_grad(set_to_none=True)
    loss.backward()
    if dd.world > 1 and ph.pruned:  # DDP averages the baseline's gradients; the other phases' are averaged here
        for name, p in ph.params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dd.world
    for clip in ph.clip_sets:
        nn.utils.clip_grad_norm_(clip, GRAD_CLIP)
    ph.opt.step()
    with torch.no_grad():
        ph.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def _train_epoch(
    ph: _Phase, epoch: int, tokenizer: TextTokenizer, tcfg: TrainConfig, args: argparse.Namespace, dd: Dist,
) -> tuple[float, float, float, float]:  # fmt: skip
    """One epoch of `ph.steps` steps; returns (mean loss, mean monitored distillation loss (pruned phase, else 0),
    mean extra loss:
    text_guided's predictors' (pruned phase) or the layout objective's (baseline), else 0, last lr)."""
    device = torch.device(args.device)
    steps = ph.steps
    lo, hi = tcfg.keep_ratio_range
    loss_sum, distill_sum, extra_sum, lr = 0.0, 0.0, 0.0, ph.peak
    with _progress(steps, f"{ph.name} {epoch + 1}/{ph.epochs}", dd.main and not args.quiet) as bar:
        for step, (images, ids, index) in zip(range(steps), ph.loader):
            lr = lr_at(epoch * steps + step, ph.total_steps, ph.peak, warmup_for(tcfg, ph.total_steps))
            for g in ph.opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            images, ids = images.to(device), ids.to(device)
            if ph.pruned:
                g = torch.Generator().manual_seed(step_seed(args.seed, epoch, step))
                keep = lo + (hi - lo) * float(torch.rand((), generator=g))
            if ph.name == "finetune":
                loss, extra = _finetune_loss(ph, images, keep, tcfg.precision), None
            elif ph.pruned:
                loss, extra, distill = _saliency_loss(
                    ph, images, ids, keep, index.tolist(), tokenizer, args.seed, epoch
                )
                distill_sum += distill
            else:
                hard = layout = None
                if tcfg.hard_negatives > 0 and ph.scenes is not None:
                    negatives = fresh_hard_negatives(
                        ph.scenes, index.tolist(), args.seed, epoch, tcfg.hard_negatives, tcfg.hard_negative_mix
                    )
                    hard = None if negatives is None else tokenizer.encode_batch(negatives).to(device)
                if ph.layout is not None:
                    layout = layout_targets(ph.scenes, index.tolist())
                    layout = None if layout is None else layout.to(device)
                loss, extra = _contrastive_loss(
                    ph, images, ids, hard, layout, tcfg.precision, tcfg.hard_negative_weight
                )
                if extra is not None:
                    extra = tcfg.layout_weight * extra
            _optimise(ph, loss if extra is None else loss + extra, dd)
            extra_sum += 0.0 if extra is None else extra.item()
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            bar.update()
    return loss_sum / steps, distill_sum / steps, extra_sum / steps, lr


def run_phase(
    phase: str,
    model: DualEncoder,
    teacher: DualEncoder | None,
    dataset: TrainDataset,
    tokenizer: TextTokenizer,
    tcfg: TrainConfig,
    args: argparse.Namespace,
    dd: Dist,
    scenes: list[Scene | None] | None = None,
) -> dict[str, Any]:
    """Train one phase with resume support; returns its summary (losses, timings).

    `scenes` (per training image, its objects from objects.json) gives the baseline its hard-negative
    captions, drawn afresh each epoch (`TrainConfig.hard_negatives`), and lets the pruned phase train
    ``text_guided``'s predictors on captions that name part of a scene (`training.query`).
    """
    ph = _setup_phase(phase, model, teacher, dataset, tokenizer, tcfg, args, dd, scenes)
    for epoch in range(ph.meta["epoch_done"], ph.epochs):
        ph.sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        ph.net.train()
        if teacher is not None:
            teacher.eval()
        t0 = time.perf_counter()
        loss, distill, extra, lr = _train_epoch(ph, epoch, tokenizer, tcfg, args, dd)
        seconds = time.perf_counter() - t0
        ph.meta["epoch_done"] = epoch + 1
        ph.meta["steps"] = ph.meta.get("steps", 0) + ph.steps  # done, whatever a resumed run asks for
        ph.meta["losses"].append(loss)
        ph.meta["seconds_per_epoch"].append(seconds)
        monitor = ""
        if "distill" in ph.meta:
            ph.meta["distill"].append(distill)
            monitor = f"  distill@keep~U{tuple(tcfg.keep_ratio_range)} {distill:.4f}"
        if ph.query:
            ph.meta["query_losses"].append(extra)
            monitor += f"  text_guided loss {extra:.4f}"
        if ph.layout is not None:
            ph.meta["layout_losses"].append(extra)
            monitor += f"  layout loss {extra:.4f}"
        dd.check_replicas(_trained_part(model, phase), f"{phase} epoch {epoch + 1}")
        if dd.main:
            log.info(
                "%s epoch %d/%d  loss %.4f  lr %.2e  %.1f s%s", phase, epoch + 1, ph.epochs, loss, lr, seconds, monitor
            )
            save_state(_state_dir(args, phase), _trained_part(model, phase), ph.opt, ph.meta)
        dd.barrier()
    return ph.meta


# ----------------------------------------------------------------------------- data


def resolve_data(args: argparse.Namespace, tcfg: TrainConfig, image_size: int, dd: Dist) -> Path:
    """The dataset root: --data / --data-root, or the synthetic set, generated once into the cache."""
    if args.data or args.data_root:
        root = Path(args.data or args.data_root).expanduser()
        if not root.is_dir():
            raise ValueError(f"dataset folder {root} does not exist.")
        return root
    n = args.num_images or tcfg.num_images
    root = Path(args.cache_dir) / f"synthetic-{image_size}px-{n}-seed{args.seed}"
    if dd.main and not (root / "objects.json").is_file():
        from training.synthetic import generate

        log.info("generating the synthetic dataset (%d images) into %s", n, root)
        generate(root, num_images=n, seed=args.seed, size=image_size, progress=not args.quiet)
    dd.barrier()
    return root


def recorded_data(root: Path, out: Path) -> str:
    """How ``training.json`` records the dataset root: never an absolute path.

    Relative to `out` when the data lies under `out`'s parent (``checkpoints/`` beside
    ``.cache/``: ``../.cache/synthetic-...``), so the pair can move together; else the
    folder's name alone, and evaluation then needs ``--data``. `training.evaluate` reads both.
    """
    root, out = root.resolve(), out.resolve()
    if root.is_relative_to(out.parent):
        return Path(os.path.relpath(root, out)).as_posix()
    return root.name


def remove_resume_state(out: Path, phases: list[str]) -> None:
    """Delete the resume state of `phases` (their checkpoints are written), and ``.resume/`` once empty."""
    resume = out / RESUME_DIR
    for phase in phases:
        # state.json first: it marks a state as complete, so a kill part-way leaves none that `load_state` reads.
        (resume / phase / "state.json").unlink(missing_ok=True)
        shutil.rmtree(resume / phase, ignore_errors=True)
    with contextlib.suppress(OSError):  # not there, or another phase's state is still in it
        resume.rmdir()


# ----------------------------------------------------------------------------- main

PHASES = ("baseline", "pruned", "finetune", "evaluate")


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m training.train", __doc__)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="model and schedule preset")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="dataset folder, Flickr8k layouts or images + CSV/JSONL (default: synthetic data, "
                                    "generated into --cache-dir)")  # fmt: skip
    src.add_argument("--data-root", help="with --dataset flickr8k: the Flickr8k folder (default: none)")
    p.add_argument("--dataset", choices=["synthetic", "flickr8k"], default=None,
                   help="which data --data-root holds (default: synthetic, generated)")  # fmt: skip
    p.add_argument("--out", default=None,
                   help="folder to write baseline/, pruned/ and the metrics into (default: checkpoints, the shipped "
                        "checkpoints, which it replaces); with --backbone, the add-on folder (required)")  # fmt: skip
    p.add_argument("--backbone", default=None, metavar="SOURCE",
                   help="train only the keep predictors of this HuggingFace CLIP (a folder, or a Hub id "
                        "owner/name[@revision]), both towers frozen, into the add-on folder --out "
                        "(default: none, train the shipped model)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help=f"continue from the last epoch saved in OUT/{RESUME_DIR}")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data order, augmentation and synthetic data")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--cache-dir", default=".cache", help="where the synthetic dataset is generated")
    p.add_argument("--num-images", type=cli.positive_int, default=None, help="synthetic images (default: the preset's)")
    p.add_argument("--baseline-epochs", type=cli.non_negative_int, default=None,
                   help="epochs of contrastive training (default: the preset's)")  # fmt: skip
    p.add_argument("--pruned-epochs", type=cli.non_negative_int, default=None,
                   help="epochs of training the keep predictors (default: the preset's)")  # fmt: skip
    p.add_argument("--finetune-steps", type=cli.non_negative_int, default=None,
                   help="steps of fine-tuning pruned/'s image tower under learned's pruning, at most one epoch; "
                        "0 keeps the baseline's (default: the preset's)")  # fmt: skip
    p.add_argument("--batch-size", type=cli.positive_int, default=None,
                   help="training batch, over all processes (default: the preset's)")  # fmt: skip
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the baseline and finetune phases' matmuls: bf16 autocast or fp32 (default: the "
                        "preset's)")  # fmt: skip
    p.add_argument("--hard-negative-mix", type=float, nargs=len(HARD_NEGATIVE_ATTRS), default=None,
                   metavar=tuple(a.upper() for a in HARD_NEGATIVE_ATTRS),
                   help="relative odds that a baseline hard negative changes or swaps each attribute (default: the "
                        "preset's, equal odds; any equal odds draw the same)")  # fmt: skip
    p.add_argument("--hard-negative-weight", type=cli.non_negative_float, default=None,
                   help="weight of the baseline's loss of each image's true caption against its own hard "
                        "negatives, on top of InfoNCE (default: the preset's; 0: InfoNCE alone)")  # fmt: skip
    p.add_argument("--stem", type=cli.positive_int, nargs="*", default=None, metavar="C",
                   help="channels of the image tower's convolutional stem (VisionConfig.stem); --stem alone: none, "
                        "the plain patch embedding (default: the preset's)")  # fmt: skip
    p.add_argument("--text-init", choices=TEXT_INITS, default=None,
                   help="how the baseline's text tower starts (TextConfig.init; default: the preset's)")
    p.add_argument("--lr", type=cli.positive_float, default=None,
                   help="peak AdamW learning rate of the baseline phase (default: the preset's)")  # fmt: skip
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--phases", default=None,
                   help=f"comma list of phases to run, of {', '.join(PHASES)} (default: all; not with "
                        "--backbone)")  # fmt: skip
    p.add_argument("--eval-limit", type=cli.positive_int, default=None,
                   help="test images to evaluate (default: the preset's)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None, p: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and check the command line; a bad combination exits with code 2 and one ``error:`` line."""
    p = p or _parser()
    args = p.parse_args(argv)
    if args.dataset == "flickr8k" and not args.data_root:
        p.error("--dataset flickr8k needs --data-root DIR")
    if args.data_root and args.dataset != "flickr8k":
        p.error("--data-root goes with --dataset flickr8k")
    if args.backbone is not None:
        _check_backbone_args(p, args)
    args.out = args.out or "checkpoints"
    args.phases = args.phases or ",".join(PHASES)
    args.phases = [s.strip() for s in args.phases.split(",") if s.strip()]
    unknown = [s for s in args.phases if s not in PHASES]
    if unknown or not args.phases:
        p.error(f"--phases takes a comma list of {', '.join(PHASES)}; got {','.join(args.phases) or 'none'}")
    try:
        hard_negative_odds(args.hard_negative_mix)
    except ValueError as e:
        p.error(f"--hard-negative-mix: {e}")
    if args.stem is not None:
        try:
            _with_stem(get_preset(args.preset), args.stem)
        except ValueError as e:
            p.error(f"--stem: {e}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    return args


def _check_backbone_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--backbone trains the keep predictors alone: it needs --out, and the other phases' options have no use."""
    if not args.out:
        p.error(f"--backbone needs --out DIR, a new folder for the keep-predictor add-on ({addon.ADDON_FILES[0]} "
                f"and {addon.ADDON_FILES[1]}; never the shipped checkpoints)")  # fmt: skip
    for option in ("phases", "baseline_epochs", "finetune_steps", "eval_limit", "stem", "text_init"):
        if getattr(args, option) is not None:
            p.error(f"--{option.replace('_', '-')} does not go with --backbone, which trains only the keep "
                    f"predictors; evaluate the add-on with python -m training.evaluate --backbone {args.out} "
                    "--out DIR")  # fmt: skip
    args.phases = "pruned"


def _with_stem(preset: Preset, stem: list[int]) -> Preset:
    """`preset` with its image tower's `VisionConfig.stem` set (--stem); ValueError for one that does not fit."""
    vision = dataclasses.replace(preset.model.vision, stem=tuple(stem))
    return dataclasses.replace(preset, model=preset.model.replace(vision=vision))


def _schedule(args: argparse.Namespace) -> tuple[Preset, TrainConfig]:
    """The preset, its training config with --batch-size applied, and --*-epochs defaulted (in `args`)."""
    preset: Preset = get_preset(args.preset)
    if args.stem is not None:
        preset = _with_stem(preset, args.stem)
    if args.text_init is not None:
        text = dataclasses.replace(preset.model.text, init=args.text_init)
        preset = dataclasses.replace(preset, model=preset.model.replace(text=text))
    tcfg = preset.train
    if args.batch_size:
        tcfg = dataclasses.replace(tcfg, batch_size=args.batch_size)
    if args.precision:
        tcfg = dataclasses.replace(tcfg, precision=args.precision)
    if args.hard_negative_mix:
        tcfg = dataclasses.replace(tcfg, hard_negative_mix=tuple(args.hard_negative_mix))
    if args.hard_negative_weight is not None:
        tcfg = dataclasses.replace(tcfg, hard_negative_weight=args.hard_negative_weight)
    if args.lr is not None:
        tcfg = dataclasses.replace(tcfg, lr=args.lr)
    args.baseline_epochs = args.baseline_epochs if args.baseline_epochs is not None else tcfg.baseline_epochs
    args.pruned_epochs = args.pruned_epochs if args.pruned_epochs is not None else tcfg.pruned_epochs
    args.finetune_steps = args.finetune_steps if args.finetune_steps is not None else tcfg.finetune_steps
    return preset, tcfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the phases; returns a summary dict (also logged).

    A user's mistake (a missing or empty data folder, an unknown preset) exits with code 2
    and one ``error:`` line, before anything is written to ``--out``.
    """
    parser = _parser()
    args = parse_args(argv, parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    preset, tcfg = _schedule(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dd = init_distributed(args.device)
    torch.manual_seed(args.seed)
    phases = args.phases
    out = Path(args.out)
    with cli.user_errors(parser):
        try:
            if args.backbone is not None:
                return _train_predictors(args, tcfg, dd)
            clock = _Clock()
            data = _load_data(args, preset, tcfg, dd)
            clock.lap("data")
            facts = {"preset": args.preset, "data": recorded_data(data.root, out), "seed": args.seed,
                     "world_size": dd.world, "precision": tcfg.precision, "hard_negatives": tcfg.hard_negatives,
                     "hard_negative_mix": tcfg.hard_negative_mix,
                     "hard_negative_weight": tcfg.hard_negative_weight, "lr": tcfg.lr}  # fmt: skip
            summary: dict[str, Any] = {"data": str(data.root), "out": str(out)}

            if "baseline" in phases:
                torch.manual_seed(args.seed)
                model = DualEncoder(data.cfg).to(args.device)
                meta = run_phase("baseline", model, None, data.dataset, data.tokenizer, tcfg, args, dd, data.scenes)
                if dd.main:
                    _save(model, data.tokenizer, out / "baseline", meta, **_extra_facts(meta, tcfg), **facts)
                    bank = [c for caps in data.splits["test"].captions for c in caps]
                    write_text_atomic(out / CAPTION_BANK_FILE, json.dumps({"split": "test", "captions": bank}))
                summary["baseline"] = meta
                dd.barrier()
                clock.lap("baseline")

            if "pruned" in phases:
                # The baseline's own tokenizer: its text tower knows those ids, whatever data this phase reads.
                base, base_tokenizer = load_checkpoint(out / "baseline", args.device)
                # A baseline saved before text_guided's predictors existed has none, one saved before their
                # caption MLP has linear ones, untrained either way: the current kind is built.
                base.enable_query_predictors(mlp=preset.model.pruning.query_mlp)
                teacher, _ = load_checkpoint(out / "baseline", args.device)
                for p in teacher.parameters():
                    p.requires_grad_(False)
                meta = run_phase("pruned", base, teacher, data.dataset, base_tokenizer, tcfg, args, dd, data.scenes)
                if dd.main:
                    _save(base, base_tokenizer, out / "pruned", meta, keep_ratio_range=list(tcfg.keep_ratio_range),
                          **_extra_facts(meta, tcfg), **facts)  # fmt: skip
                summary["pruned"] = meta
                dd.barrier()
                clock.lap("pruned")

            if "finetune" in phases:
                summary["finetune"] = _finetune(out, data.dataset, tcfg, args, dd)
                dd.barrier()
                clock.lap("finetune")
            elif "pruned" in phases and args.finetune_steps and dd.main:
                log.warning("pruned/ keeps the baseline's image tower: --phases pruned,finetune also fine-tunes it "
                            "under learned's pruning, as the default build does")  # fmt: skip

            if "evaluate" in phases and dd.main:
                from training.evaluate import evaluate

                limit = args.eval_limit or tcfg.eval_images
                summary["metrics"] = evaluate(out, out, data=data.root, limit=limit, progress=not args.quiet)
                clock.lap("evaluate")
            if dd.main:
                remove_resume_state(out, [p for p in phases if p != "evaluate"])
                summary["build"] = _record_build(out, clock, args, facts)
        finally:
            if dd.world > 1 and dist.is_initialized():
                dist.destroy_process_group()
    return summary


class _Clock:
    """Wall time of each part of a run (data generation and loading, then each phase)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.parts: dict[str, float] = {}

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.parts[part] = round(now - self.last, 1)
        self.last = now


def _record_build(out: Path, clock: _Clock, args: argparse.Namespace, facts: dict[str, Any]) -> dict[str, Any]:
    """Write ``OUT/training.json``: the wall time of this run, end to end and per part, and how it ran.

    `training.report` quotes it as the build time when one run made every phase (``phases``).
    """
    record = {
        "phases": [p for p in PHASES if p in args.phases],
        "seconds": round(time.perf_counter() - clock.start, 1),
        "parts": clock.parts,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": args.device,
        "resumed": bool(args.resume),
        "torch": torch.__version__,
        **facts,
    }
    write_text_atomic(out / BUILD_FILE, json.dumps(record, indent=2) + "\n")
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in clock.parts.items())
    log.info("run took %.1f min (%s)", record["seconds"] / 60, parts)
    return record


@dataclasses.dataclass
class _Data:
    """The dataset, and what every phase builds from it, loaded once."""

    root: Path
    splits: dict[str, CaptionDataset]
    tokenizer: Tokenizer  # built from the training captions
    cfg: ModelConfig  # the preset's, with the tokenizer's vocabulary size
    dataset: TrainDataset | None  # the augmented training split; None when no training phase runs
    scenes: list[Scene | None] | None  # per training image, its objects (objects.json), else None: the baseline's
    # hard negatives and text_guided's partial captions


def _load_data(args: argparse.Namespace, preset: Preset, tcfg: TrainConfig, dd: Dist) -> _Data:
    root = resolve_data(args, tcfg, preset.model.vision.image_size, dd)
    splits = load_splits(root)
    captions = (c for caps in splits["train"].captions for c in caps)
    tokenizer = Tokenizer.build(captions, preset.model.text.context_length)
    cfg = preset.model.replace(text=dataclasses.replace(preset.model.text, vocab_size=len(tokenizer)))
    scenes = _scenes(root, splits["train"])
    dataset = None
    if {"baseline", "pruned", "finetune"} & set(args.phases):
        dataset = TrainDataset(splits["train"], cfg.vision.image_size, augment=True, seed=args.seed,
                               progress=dd.main and not args.quiet)  # fmt: skip
    return _Data(root, splits, tokenizer, cfg, dataset, scenes)


def _scenes(root: Path, split: CaptionDataset) -> list[Scene | None] | None:
    """Per image of `split`, its objects from objects.json (text_guided's partial captions); None without one."""
    objects = load_objects(root)
    if objects is None:
        return None
    return [objects["images"].get(name, {}).get("objects") for name in split.names]


def _extra_facts(meta: dict[str, Any], tcfg: TrainConfig) -> dict[str, Any]:
    """What ``training.json`` records of the extra objectives: text_guided's predictors' loss per epoch and
    learning rate (pruned phase), the layout objective's loss per epoch and weight (baseline, `training.layout`)."""
    out: dict[str, Any] = {}
    if "query_losses" in meta:
        out.update(query_losses=meta["query_losses"], query_lr=tcfg.query_lr)
    if "layout_losses" in meta:
        out.update(layout_losses=meta["layout_losses"], layout_weight=tcfg.layout_weight)
    return out


def _save(model: DualEncoder, tokenizer: Tokenizer, folder: Path, meta: dict[str, Any], **facts: Any) -> None:
    """Write a phase's checkpoint (atomically), with its losses and timings in ``training.json``."""
    save_checkpoint(model.cpu(), tokenizer, folder, **_run_facts(folder.name, meta), **facts)


def _run_facts(phase: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What ``training.json`` records of a phase's run: epochs, losses and timings."""
    seconds = meta["seconds_per_epoch"]
    return {"phase": phase, "epochs": meta["epoch_done"], "losses": meta["losses"],
            "seconds_per_epoch": _median(seconds), "epoch_seconds": seconds}  # fmt: skip


def _finetune(
    out: Path, dataset: TrainDataset, tcfg: TrainConfig, args: argparse.Namespace, dd: Dist
) -> dict[str, Any]:  # fmt: skip
    """The finetune phase: ``pruned/``'s image tower, started from the baseline's (so a second run gives the same
    tower), learns under ``learned``'s pruning; written back to ``pruned/`` with its run under "finetune" in
    training.json. Its keep predictors and text tower, trained or frozen in the pruned phase, are left as they are.
    """
    if not (out / "pruned").is_dir():
        raise ValueError(f"{out} has no pruned/ checkpoint to fine-tune; run --phases pruned,finetune.")
    model, tokenizer = load_checkpoint(out / "pruned", args.device)
    teacher, _ = load_checkpoint(out / "baseline", args.device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    base, own = (_image_tower(m).state_dict() for m in (teacher, model))
    if {n: t.shape for n, t in base.items()} != {n: t.shape for n, t in own.items()}:
        raise ValueError(f"{out / 'pruned'} and {out / 'baseline'} have different image towers; run --phases "
                         "pruned,finetune to build pruned/ from this baseline.")  # fmt: skip
    _image_tower(model).load_state_dict(base)
    meta = run_phase("finetune", model, teacher, dataset, tokenizer, tcfg, args, dd)
    if dd.main:
        record = out / "pruned" / "training.json"
        facts = json.loads(record.read_text()) if record.is_file() else {}
        facts.pop("finetune", None)  # no steps: the baseline's tower, as the pruned phase leaves it
        if meta.get("steps"):
            facts["finetune"] = {
                "steps": meta["steps"], "batch_size": tcfg.batch_size, "lr": tcfg.finetune_lr,
                "keep_ratio_range": list(tcfg.keep_ratio_range), "precision": tcfg.precision,
                "losses": meta["losses"], "seconds": sum(meta["seconds_per_epoch"]),
            }  # fmt: skip
        save_checkpoint(model.cpu(), tokenizer, out / "pruned", **facts)
    return meta


def _train_predictors(args: argparse.Namespace, tcfg: TrainConfig, dd: Dist) -> dict[str, Any]:
    """--backbone: the pruned phase's recipe on a HuggingFace CLIP; writes the predictors as an add-on."""
    out = Path(args.out)
    addon.check_destination(out, spare=(RESUME_DIR,))
    torch.manual_seed(args.seed)  # the predictors' initialisation (a CLIP checkpoint has none)
    backbone = addon.load_backbone(args.backbone, args.device)
    clip, ref = backbone.clip, backbone.ref
    if backbone.has_predictors and dd.main:
        log.info("continuing from the keep predictors of %s", backbone.addon)
    root = resolve_data(args, tcfg, clip.preprocess.image_size, dd)
    train = load_splits(root)["train"]
    dataset = TrainDataset(train, clip.preprocess, augment=True, seed=args.seed,
                           progress=dd.main and not args.quiet)  # fmt: skip
    # The frozen towers are their own teacher: the unpruned pass that gives the saliency never runs a predictor.
    model = clip.model
    meta = run_phase("pruned", model, model, dataset, clip.tokenizer, tcfg, args, dd, _scenes(root, train))
    if dd.main:
        facts = _run_facts("predictors", meta)
        facts.update(seconds=sum(meta["seconds_per_epoch"]), distill=meta["distill"], preset=args.preset,
                     data=recorded_data(root, out), seed=args.seed, world_size=dd.world,
                     keep_ratio_range=list(tcfg.keep_ratio_range), **_extra_facts(meta, tcfg))  # fmt: skip
        addon.save_addon(out, model, ref, facts)  # replaces the folder, its resume state with it
        log.info("wrote the keep predictors of %s to %s", ref.source, out)
    dd.barrier()
    return {"data": str(root), "out": str(out), "backbone": ref.to_dict(), "pruned": meta}


def _median(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


if __name__ == "__main__":
    main()
