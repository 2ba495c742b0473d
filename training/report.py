"""Write every results figure of the README, docs/ and the model cards from the shipped files.

    python -m training.report            # rewrite the generated blocks in place
    python -m training.report --check    # exit 1, naming the stale files, if a block disagrees

Sources, under ``checkpoints/``: ``metrics.json`` (written by ``training.evaluate``), and
``baseline/`` and ``pruned/`` ``config.json`` and ``training.json`` (written by ``training.train``).
A generated block sits between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in one of the
`TARGETS`; only its inside is rewritten, the prose around it is the authors'. Prose states no figure
of its own: whatever number it needs is in a block.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from training import compare
from training.compare import DASH, table
from training.train import PHASES
from vlm_demo import pruning
from vlm_demo.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ("baseline", "pruned")  # every build makes these
OPTIONAL = pruning.OPTIONAL_CHECKPOINTS  # made by their own command (`training.dynamicvit`): blocks only where they are
BASELINE = compare.BASELINE  # metrics.json's unpruned row, the reference of lossy-ness
CONTROL = "random"  # the control every method must beat
HEADLINE_KEEPS = (0.5, 0.3, 0.1)  # the keep ratios of the nominal table
FOCUS_GMACS = 0.5  # the GMACs ratio the findings compare methods at

# The blocks each file holds; a card's blocks describe the checkpoint of its folder.
TARGETS: dict[str, tuple[str, ...]] = {
    "README.md": ("results", "findings", "training-time"),
    "docs/results.md": ("results", "findings", "training-time"),
    "docs/training.md": ("training-time",),
    "checkpoints/baseline/README.md": ("card-model", "card-metrics", "card-training"),
    "checkpoints/pruned/README.md": ("card-model", "card-metrics", "card-training"),
    "checkpoints/dynamicvit/README.md": ("card-model", "card-metrics", "card-training"),
}

_BLOCK = re.compile(r"(<!-- ([a-z-]+):begin -->\n)(.*?)(<!-- \2:end -->)", re.S)


@dataclass(frozen=True)
class Sources:
    """What the blocks are made from."""

    metrics: dict[str, Any]  # checkpoints/metrics.json
    training: dict[str, dict[str, Any]]  # checkpoint name -> its training.json
    configs: dict[str, dict[str, Any]]  # checkpoint name -> its config.json
    build: dict[str, Any] | None = None  # checkpoints/training.json: the last run's wall time end to end, if any
    params: dict[str, dict[str, int]] | None = None  # checkpoint name -> its parameter counts, from its weights


def load_sources(checkpoints: Path) -> Sources:
    """Read the shipped results.

    Args:
        checkpoints: the folder with ``metrics.json`` and the ``baseline/`` and ``pruned/`` folders.

    Returns:
        The parsed files.

    Raises:
        ValueError: a file is missing or is not JSON.
    """

    def read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path} is missing; run python -m training.train to make it.") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg}).") from None

    names = [*CHECKPOINTS, *(n for n in OPTIONAL if (checkpoints / n / "training.json").is_file())]
    return Sources(
        metrics=read(checkpoints / "metrics.json"),
        training={name: read(checkpoints / name / "training.json") for name in names},
        configs={name: read(checkpoints / name / "config.json") for name in names},
        build=read(checkpoints / "training.json") if (checkpoints / "training.json").is_file() else None,
        params={name: _count_params(checkpoints / name / "model.safetensors") for name in names
                if (checkpoints / name / "model.safetensors").is_file()},  # fmt: skip
    )


def _targets(src: Sources) -> list[str]:
    """The `TARGETS` to fill: a card of an optional checkpoint only where that checkpoint is."""
    return [t for t in TARGETS if not (t.startswith("checkpoints/") and Path(t).parent.name not in src.training)]


def _count_params(path: Path) -> dict[str, int]:
    """Parameters of a checkpoint, from the tensor shapes in its safetensors header (no weights are read)."""
    counts = {"params": 0, "params_image_encoder": 0, "params_text_encoder": 0}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            n = math.prod(f.get_slice(key).get_shape())
            counts["params"] += n
            tower = {"visual": "params_image_encoder", "text": "params_text_encoder"}.get(key.split(".")[0])
            if tower:
                counts[tower] += n
    return counts


# ----------------------------------------------------------------------------- formatting


_f = compare.fmt


def _keep(r: float) -> str:
    return format(r, "g")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------- rows


row = compare.find_row  # the row of (method, keep ratio) at the file's main placement


def _methods(metrics: dict[str, Any]) -> list[str]:
    """The pruning methods of metrics.json's main placement, in its order, the baseline left out."""
    return compare.methods(compare.rows_at(metrics))


def _obj(r: dict[str, Any]) -> str:
    if r["object_recall"] is None:
        return DASH
    return f"{r['object_recall']:.2f} ({r['object_recall_random']:.2f})"


def _score(r: dict[str, Any]) -> tuple[str, float]:
    """What a method is compared by: mean R@1, or pair accuracy where it has no recall (a row or a matched point)."""
    return ("pair acc", r["pair_acc"]) if r["mean_r1"] is None else ("mean R@1", r["mean_r1"])


# ----------------------------------------------------------------------------- blocks


def _placement_note(m: dict[str, Any], placement: str) -> str:
    if compare.recorded(m):
        return f"Stages at the `{placement}` placement (`training.evaluate --placements`)."
    return f"Where the stages sat is not recorded in this file (it predates the placement key); {compare.RERUN_CMD}."


def results(src: Sources) -> str:
    """The ceiling, every method at matched GMACs, then the baseline and every method at `HEADLINE_KEEPS`."""
    m = src.metrics
    ds, mach = m["dataset"], m["machine"]
    kind = "synthetic images" if ds["synthetic"] else "images"
    threads = f", {mach['torch_threads']} threads" if mach.get("torch_threads") else ""
    placement = compare.placements(m)[0]
    lines = [
        f"Test split: {ds['images']:,} {kind} × {ds['captions']:,} captions. GMACs per image at batch 1; latency "
        f"in ms, the median of runs interleaved with the baseline, measured on {mach['processor']} with "
        f"{mach['cpu_count']} CPUs, torch {mach['torch']}{threads}. {_placement_note(m, placement)}",
        "",
        compare.ceiling_line(m),
        "",
        f"**At matched GMACs.** {compare.MATCHED_NOTE}",
        "",
        *compare.matched_table(m, placement),
        "",
        "**At nominal keep ratios** (what each method was run at; compare across methods by the GMACs ratio):",
        "",
    ]
    header = ["method", "keep", "tokens (a fused one counts)", "GMACs", "GMACs ratio", "mean R@1", "pair acc",
              "object recall (random)", "lossy-ness", "ms bs1", "ms bs32", "latency ratio bs32"]  # fmt: skip
    picked = [row(m, BASELINE, 1.0)] + [row(m, meth, k) for meth in _methods(m) for k in HEADLINE_KEEPS]
    body = [
        [r["method"], _keep(r["keep_ratio"]), "/".join(map(str, r["tokens"])), f"{r['gmacs']:.4f}",
         f"{r['gmacs_ratio']:.2f}", _f(r["mean_r1"], ".1f"), _f(r["pair_acc"], ".1f"), _obj(r),
         _f(r["lossyness"], ".3f"), _f(r["latency_ms_bs1"], ".1f"), _f(r["latency_ms_bs32"], ".1f"),
         _f(r["latency_ratio_bs32"], ".2f")]
        for r in picked
    ]  # fmt: skip
    return "\n".join(lines + table(header, "lrlrrrrrrrrr", body))


def _between(x: dict[str, Any]) -> str:
    """Which measured rows a matched figure comes from."""
    lo, hi = x["lo"], x["hi"]
    if x["exact"]:
        return f"measured at keep ratio {_keep(lo['keep_ratio'])}"
    return f"interpolated between keep ratios {_keep(hi['keep_ratio'])} and {_keep(lo['keep_ratio'])}"


def _below(drop: float) -> str:
    """How far a method's mean R@1 is below the baseline's, in words, to 0.1 point."""
    if _f(drop, ".1f") == "0.0":
        return "level with the baseline, to 0.1 point"
    return f"{abs(drop):.1f} points {'below' if drop > 0 else 'above'} the baseline"


def findings(src: Sources) -> str:
    """What the tables say, every method compared at `FOCUS_GMACS`; every figure and comparison computed."""
    m, g = src.metrics, FOCUS_GMACS
    rows = compare.rows_at(m)
    base, n = row(m, BASELINE, 1.0), m["dataset"]["images"]
    oracle = m.get("oracle")
    ceiling = ""
    if oracle and base["mean_r1"] is not None and oracle.get("mean_r1"):
        share = base["mean_r1"] / oracle["mean_r1"]
        ceiling = f", {share:.0%} of the test split's R@1 ceiling ({oracle['mean_r1']:.1f})"
    lines = [
        f"- **The baseline learned:** mean R@1 {base['mean_r1']:.1f}% over {n:,} test images (chance is "
        f"{100 / n:.1f}%{ceiling}), pair accuracy {base['pair_acc']:.1f}%."
    ]
    kinds = m.get("pair_by_kind")
    if kinds:
        parts = ", ".join(f"{k.replace('_', ' ')} {v['pair_acc']:.0f}" for k, v in kinds.items())
        lines.append(f"- **What the baseline tells apart:** pair accuracy by what the hard negative changed "
                     f"(50 is chance): {parts}.")  # fmt: skip
    at = {meth: compare.matched(rows, meth, g) for meth in _methods(m)}
    missing = [meth for meth, x in at.items() if x is None]
    at = {meth: x for meth, x in at.items() if x is not None}
    control = at.get(CONTROL)
    methods = [meth for meth in at if meth != CONTROL]
    trained = [meth for meth in methods if at[meth]["lo"]["checkpoint"] != "baseline"]
    free = [meth for meth in methods if meth not in trained and at[meth]["mean_r1"] is not None]
    where = f"at {g:.2f}× the baseline's GMACs"
    for meth in trained:
        x = at[meth]
        if x["mean_r1"] is None:  # query-aware: it prunes per caption, so it has pair accuracy, not retrieval
            vs = "" if control is None else f", against {control['object_recall']:.0%} for `{CONTROL}`"
            lines.append(
                f"- **`{meth}` (trained, caption-conditioned predictors), {where}** ({_between(x)}): it keeps "
                f"{x['object_recall']:.0%} of the object patches{vs}; pair accuracy {x['pair_acc']:.1f} "
                f"(baseline {base['pair_acc']:.1f})."
            )
            continue
        vs = ""
        if control is not None:
            gap = x["mean_r1"] - control["mean_r1"]
            vs = (f", {abs(gap):.1f} points {'above' if gap >= 0 else 'below'} `{CONTROL}`; it keeps "
                  f"{x['object_recall']:.0%} of the object patches, against {control['object_recall']:.0%} for "
                  f"`{CONTROL}`")  # fmt: skip
        t = src.training.get(x["lo"]["checkpoint"], {})
        tower = ", fine-tuned image tower" if "finetune" in t else ""
        if t.get("phase") == "dynamicvit":
            tower = ", trained with its image tower by DynamicViT's recipe"
        lines.append(
            f"- **`{meth}` (trained predictors{tower}), {where}** ({_between(x)}): mean R@1 {x['mean_r1']:.1f} "
            f"({_below(base['mean_r1'] - x['mean_r1'])}){vs}."
        )
    if free:
        best = max(free, key=lambda meth: at[meth]["mean_r1"])
        x = at[best]
        lines.append(
            f"- **The best training-free method {where} is `{best}`:** mean R@1 {x['mean_r1']:.1f} ({_between(x)})."
        )
    if control is not None:
        lines.append(
            f"- **`{CONTROL}` is the control:** mean R@1 {control['mean_r1']:.1f} {where}, pair accuracy "
            f"{control['pair_acc']:.1f}."
        )
        said = []
        for meth in methods:
            what, value = _score(at[meth])
            if value < control["pair_acc" if what == "pair acc" else "mean_r1"]:
                said.append(f"`{meth}` {value:.1f} {what}")
        if said:
            lines.append(
                f"- **Below `{CONTROL}` {where}:** {', '.join(said)} (`{CONTROL}`: "
                f"{control['mean_r1']:.1f} mean R@1, {control['pair_acc']:.1f} pair acc)."
            )
    timed = [meth for meth in methods if at[meth]["latency_ratio_bs32"] is not None]
    if timed:
        said = [f"`{meth}` {at[meth]['latency_ratio_bs32']:.2f} / {_f(at[meth]['latency_ratio_bs1'], '.2f')}"
                for meth in timed]  # fmt: skip
        lines.append(
            f"- **Latency {where},** as ratios to the baseline (batch 32 / batch 1, interpolated like the rest): "
            f"{', '.join(said)}."
        )
    if missing:
        lines.append(f"- **Not reached {where}** by the measured keep ratios: {', '.join(f'`{x}`' for x in missing)}.")
    return "\n".join(lines)


def training_time(src: Sources) -> str:
    """Per-phase wall time from training.json's ``epoch_seconds`` and metrics.json's ``seconds``."""
    parts, total = [], 0.0
    for name in CHECKPOINTS:
        t = src.training[name]
        secs = t["epoch_seconds"]
        total += sum(secs)
        each = ", ".join(f"{s:.0f}" for s in secs)
        parts.append(f"{name} {len(secs)} epoch{'s' * (len(secs) != 1)} in {_minutes(sum(secs))} ({each} s)")
        if "finetune" in t:
            ft = t["finetune"]
            total += ft["seconds"]
            parts.append(f"fine-tune {ft['steps']} steps in {_minutes(ft['seconds'])}")
    evaluation = src.metrics.get("seconds")
    if evaluation is not None:
        total += evaluation
        parts.append(f"evaluation {evaluation:.0f} s")
    text = f"Training time, as the runs behind the shipped files recorded it: {'; '.join(parts)}; "
    extra = "".join(
        f" DynamicViT's checkpoint (`python -m training.{name}`, outside the build): {t['epochs']} epoch"
        f"{'s' * (t['epochs'] != 1)} of {t['steps'] // t['epochs']} steps in {_minutes(t['seconds'])}."
        for name, t in src.training.items() if t.get("phase") == "dynamicvit"
    )  # fmt: skip
    b = src.build
    if b is None or b.get("phases") != list(PHASES) or b.get("resumed"):
        return text + f"{_minutes(total)} in all. Dataset generation is not timed in these files." + extra
    steps = ", ".join(f"{k} {_minutes(v)}" for k, v in b["parts"].items())
    return (
        text + f"{_minutes(total)} in all. The whole build, `python -m training.train` in one run with nothing "
        f"resumed, took **{_minutes(b['seconds'])}** end to end on {b['threads']} threads of {b['cpu_count']} "
        f"cores ({steps}; data: generating and loading the dataset), as `checkpoints/training.json` records."
        + extra
    )


def _stem_words(stem: Sequence[int]) -> str:
    """The card's words for `VisionConfig.stem`; nothing without one."""
    if not stem:
        return ""
    return (f"; beside the patch embedding, a convolutional stem ({len(stem)} 3 × 3 stride-2 convolutions of "
            f"{', '.join(map(str, stem))} channels, after Xiao et al. 2021) whose projected tokens add to the "
            "patches'")  # fmt: skip


def card_model(src: Sources, name: str) -> str:
    """The architecture of one checkpoint, from its config.json; parameters from its weights (else metrics.json)."""
    c = src.configs[name]
    v, t, p = c["vision"], c["text"], c["pruning"]
    grid = v["image_size"] // v["patch_size"]
    stages = " and ".join(map(str, p["stages"]))
    phase = src.training[name].get("phase")
    trained = "trained in this checkpoint" if phase == "pruned" else "left untrained here (`pruned/` trains them)"
    kind = f"an MLP each, hidden width {p['predictor_hidden']}"
    if p.get("predictor") == "lg":
        kind, trained = "DynamicViT's PredictorLG each", "trained in this checkpoint with its image tower"
    lines = [
        f"- **Image encoder:** a ViT with a CLS token; {v['image_size']} px images, {v['patch_size']} px patches "
        f"({grid} × {grid} = {grid * grid} patch tokens), width {v['width']}, {v['depth']} blocks, {v['heads']} "
        f"heads, MLP ratio {v['mlp_ratio']:g}{_stem_words(v.get('stem') or ())}.",
        f"- **Text encoder:** a transformer over a word-level vocabulary of {t['vocab_size']} tokens (`vocab.json`), "
        f"width {t['width']}, {t['depth']} blocks, {t['heads']} heads, at most {t['context_length']} tokens"
        + ("; trained from OpenAI CLIP's initialisation of its text tower." if t.get("init") == "clip" else "."),
        f"- **Embedding:** both towers project to {c['embed_dim']} dimensions, L2-normalised; a learnable logit "
        f"scale starts at {c['init_logit_scale']:g} (log 1/0.07).",
        f"- **Pruning stages:** keep predictors before blocks {stages} (counted from 0; {kind}), {trained}; the "
        f"other methods' stages follow the `{p['placement']}` placement.",
    ]
    mod = (src.params or {}).get(name) or src.metrics.get("model", {})
    if mod.get("params"):
        lines.append(
            f"- **Parameters:** {mod['params']:,} (image encoder {mod['params_image_encoder']:,}, text encoder "
            f"{mod['params_text_encoder']:,}), float32."
        )
    return "\n".join(lines)


def card_metrics(src: Sources, name: str) -> str:
    """The metrics rows measured on one checkpoint; the baseline's at `HEADLINE_KEEPS` only."""
    m = src.metrics
    rows = [r for r in compare.rows_at(m) if r["checkpoint"] == name]
    if name == "baseline":
        rows = [r for r in rows if r["method"] == BASELINE or r["keep_ratio"] in HEADLINE_KEEPS]
    header = ["method", "keep", "tokens", "GMACs", "mean R@1", "mean R@5 / R@10", "pair acc",
              "object recall (random)", "lossy-ness"]  # fmt: skip
    body = [
        [r["method"], _keep(r["keep_ratio"]), "/".join(map(str, r["tokens"])), f"{r['gmacs']:.4f}",
         _f(r["mean_r1"], ".1f"),
         DASH if r["mean_r5"] is None else f"{r['mean_r5']:.1f} / {r['mean_r10']:.1f}",
         _f(r["pair_acc"], ".1f"), _obj(r), _f(r["lossyness"], ".3f")]
        for r in rows
    ]  # fmt: skip
    ds = m["dataset"]
    lead = (
        f"On the test split ({ds['images']:,} images × {ds['captions']:,} captions), from "
        "`checkpoints/metrics.json`:"
    )
    return "\n".join([lead, "", *table(header, "lrlrrrrrr", body)])


def card_training(src: Sources, name: str) -> str:
    """One checkpoint's training run, from its training.json."""
    t = src.training[name]
    if t.get("phase") == "dynamicvit":
        return _dynamicvit_training(t)
    secs, losses = t["epoch_seconds"], t["losses"]
    lines = [
        f"- **Run:** preset `{t['preset']}`, seed {t['seed']}, {t['world_size']} process"
        f"{'es' * (t['world_size'] != 1)}, data `{t['data']}`.",
        f"- **Epochs:** {t['epochs']}, {_minutes(sum(secs))} in all ({', '.join(f'{s:.0f}' for s in secs)} s).",
        f"- **Loss per epoch:** {', '.join(f'{x:.3f}' for x in losses)}.",
    ]
    if t.get("phase") == "baseline" and t.get("hard_negatives"):
        w = t.get("hard_negative_weight", 0.0)  # a training.json from before the option has none: 0
        lines.append(
            f"- **Hard negatives:** {t['hard_negatives']} captions per image and step, each with one attribute changed "
            "or swapped, drawn afresh each epoch, as extra wrong answers in InfoNCE"
            + (f"; plus the loss of the true caption against them alone (`training.losses.pair_loss`), weight {w:g}, "
               "in the loss above." if w else " (no pair loss: `TrainConfig.hard_negative_weight` 0).")
        )
    if "layout_losses" in t:
        lines.append(
            f"- **Auxiliary layout loss** (`training/layout.py`, weight {t['layout_weight']:g}; not in the loss above) "
            f"per epoch: {', '.join(f'{x:.3f}' for x in t['layout_losses'])}."
        )
    if "keep_ratio_range" in t:
        lo, hi = t["keep_ratio_range"]
        lines.append(f"- **Monitored distillation loss** (not trained on): at keep ratios drawn from [{lo:g}, {hi:g}].")
    if "finetune" in t:
        ft = t["finetune"]
        lo, hi = ft["keep_ratio_range"]
        lines.append(
            f"- **Image tower fine-tuned** under `learned`'s pruning, after the epochs above (`training.train`'s "
            f"finetune phase): {ft['steps']} steps of {ft['batch_size']} images at keep ratios drawn from "
            f"[{lo:g}, {hi:g}], peak learning rate {ft['lr']:g}, {_minutes(ft['seconds'])}; distillation loss to the "
            f"baseline's embedding {', '.join(f'{x:.4f}' for x in ft['losses'])} (mean over the steps)."
        )
    return "\n".join(lines)


def _dynamicvit_training(t: dict[str, Any]) -> str:
    """The dynamicvit/ checkpoint's run (`training.dynamicvit`), from its training.json."""
    losses = t["losses"]
    rates = ", ".join(f"{r:.3f}" for r in t["stage_keep_rates"])
    kept = "; ".join(", ".join(f"{k:.3f}" for k in epoch) for epoch in t["kept_per_epoch"])
    return "\n".join([
        f"- **Run:** `python -m training.dynamicvit`, seed {t['seed']}, data `{t['data']}`, teacher and starting "
        f"point `{t['teacher']}/`; {t['epochs']} epochs, {t['steps']} steps of {t['batch_size']} images, "
        f"{_minutes(t['seconds'])}, {t['precision']}.",
        f"- **Recipe:** keep rates {rates} at the stages (rho {t['base_rate']:g}); ratio loss weight "
        f"{t['ratio_weight']:g} / stages, distillation weight {t['distill_weight']:g} (KL and token MSE); "
        f"predictors' peak learning rate {t['lr']:g}, the backbone's {t['backbone_lr_scale']:g} x it, frozen for "
        f"the first {t['backbone_frozen_fraction']:.0%} of the steps; AdamW, weight decay {t['weight_decay']:g}.",
        f"- **Loss per epoch:** {', '.join(f'{x:.3f}' for x in losses['loss'])} (task "
        f"{', '.join(f'{x:.3f}' for x in losses['task'])}; ratio {', '.join(f'{x:.4f}' for x in losses['ratio'])}; "
        f"KL {', '.join(f'{x:.3f}' for x in losses['kl'])}; tokens {', '.join(f'{x:.3f}' for x in losses['tokens'])}).",
        f"- **Share of the patches the Gumbel masks kept,** per stage, mean per epoch: {kept}.",
    ])  # fmt: skip


BLOCKS: dict[str, Callable[[Sources], str]] = {
    "results": results,
    "findings": findings,
    "training-time": training_time,
}
CARD_BLOCKS: dict[str, Callable[[Sources, str], str]] = {
    "card-model": card_model,
    "card-metrics": card_metrics,
    "card-training": card_training,
}


# ----------------------------------------------------------------------------- files


def render(name: str, src: Sources, target: str) -> str:
    """The inside of block `name` in file `target` (a path relative to the repository root)."""
    if name in CARD_BLOCKS:
        return CARD_BLOCKS[name](src, Path(target).parent.name)
    return BLOCKS[name](src)


def fill(text: str, target: str, src: Sources) -> str:
    """`text` with each of its generated blocks rewritten.

    Raises:
        ValueError: a block `TARGETS` asks for is missing, or one is unknown or unclosed.
    """
    found = [m.group(2) for m in _BLOCK.finditer(text)]
    wanted = TARGETS.get(target, ())
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ValueError(f"{target} has no <!-- {missing[0]}:begin --> ... <!-- {missing[0]}:end --> block.")
    unknown = [n for n in found if n not in wanted]
    if unknown:
        raise ValueError(f"{target}: unknown generated block {unknown[0]!r}; it takes {', '.join(wanted)}.")
    opened = re.findall(r"<!-- ([a-z-]+):begin -->", text)
    if len(opened) != len(found):
        raise ValueError(f"{target}: a <!-- NAME:begin --> marker has no matching end marker.")

    def body(m: re.Match[str]) -> str:
        return m.group(1) + render(m.group(2), src, target).rstrip("\n") + "\n" + m.group(4)

    return _BLOCK.sub(body, text)


def stale(root: Path = ROOT) -> list[str]:
    """The `TARGETS` whose generated blocks disagree with the checkpoints' files.

    Args:
        root: the repository root.

    Returns:
        Paths relative to `root`, in `TARGETS` order; empty when everything agrees.

    Raises:
        ValueError: a source or a target is missing or malformed.
    """
    src = load_sources(root / "checkpoints")
    out = []
    for target in _targets(src):
        text = _read_target(root, target)
        if fill(text, target, src) != text:
            out.append(target)
    return out


def write(root: Path = ROOT) -> list[str]:
    """Rewrite the generated blocks of every target; returns the targets that changed."""
    src = load_sources(root / "checkpoints")
    changed = []
    for target in _targets(src):
        text = _read_target(root, target)
        new = fill(text, target, src)
        if new != text:
            write_text_atomic(root / target, new)
            changed.append(target)
    return changed


def _read_target(root: Path, target: str) -> str:
    path = root / target
    if not path.is_file():
        raise ValueError(f"{target} is missing.")
    return path.read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a generated block is stale")
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = p.parse_args(argv)
    try:
        if args.check:
            bad = stale(args.root)
            if bad:
                print(f"error: {', '.join(bad)} disagree{'s' * (len(bad) == 1)} with checkpoints/metrics.json and "
                      "checkpoints/*/training.json; run python -m training.report", file=sys.stderr)  # fmt: skip
                return 1
            print(f"ok: {len(TARGETS)} files agree with checkpoints/")
            return 0
        changed = write(args.root)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"rewrote {', '.join(changed)}" if changed else "nothing to rewrite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
