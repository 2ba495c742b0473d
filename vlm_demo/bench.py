"""Benchmark: do fewer tokens really cost less? GMACs per tower and interleaved latency, baseline vs pruned.

    python -m vlm_demo.bench                                  # the shipped default preset, untrained weights
    python -m vlm_demo.bench --config vit-b-16                # a named CLIP shape, random weights, no download
    python -m vlm_demo.bench --config path/to/config.json     # any HuggingFace CLIP config.json, random weights
    python -m vlm_demo.bench --checkpoints checkpoints --latency-repeats 40

For each method the keep ratio is the one whose GMACs are closest to half the
baseline's, at the method's paper placement unless --placement says otherwise.
Each (method, batch) pair is timed interleaved with the baseline (A B A B ...)
in one run, so both see the same machine noise. The GMACs of both towers are
printed too (the text tower for one caption of the full context length), next
to the published figures of the named CLIP shapes. The target: at batch 32,
latency ratio <= 1.15 x GMACs ratio; the exit code is 1 when a batch-32 row
misses it, 2 for a usage error. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cli, flops, pruning
from .config import PRESETS, ModelConfig
from .hf_clip import CLIP_SHAPES, ClipShape, model_config, read_model_config
from .latency import LatencyProtocol, interleaved
from .flops import Placement
from .model import DualEncoder, load_checkpoint
from .pruning import BASELINE, PruneSpec

TARGET_SLACK = 1.15  # allowed latency ratio / GMACs ratio at batch 32
TARGET_BATCH = 32  # rows at this batch size or larger are held to the target
BUDGET_S = 30.0  # default seconds of measured rounds per (method, batch): bites only on big models (ViT-B/16)
LATENCY = LatencyProtocol(warmup=5, repeats=40, budget_s=BUDGET_S)  # batch 1; larger batches: see `protocol_for`
DEFAULT_METHODS = ("learned", "cls_attention", "tome")  # one of each kind: trained, attention, merging
CONFIG_NAMES = (*sorted(PRESETS), *CLIP_SHAPES)  # what --config takes besides a path


@dataclass
class Row:
    method: str
    keep_ratio: float
    batch: int
    tokens: list[int]
    gmacs_base: float
    gmacs: float
    ms_base: float
    iqr_base: float
    ms: float
    iqr: float

    @property
    def gmacs_ratio(self) -> float:
        return self.gmacs / self.gmacs_base

    @property
    def latency_ratio(self) -> float:
        return self.ms / self.ms_base

    @property
    def meets_target(self) -> bool | None:
        """Latency ratio <= `TARGET_SLACK` x GMACs ratio; None below batch `TARGET_BATCH` (no target there)."""
        if self.batch < TARGET_BATCH:
            return None
        return self.latency_ratio <= TARGET_SLACK * self.gmacs_ratio


@dataclass(frozen=True)
class Towers:
    """fvcore GMACs of one forward pass of each tower at batch 1, with their closed forms."""

    image: float
    text: float
    image_closed: float
    text_closed: float
    context: int  # tokens of the caption the text tower is counted on

    @property
    def total(self) -> float:
        return self.image + self.text

    def of(self, towers: str) -> float:
        """The figure a `Published` entry counts: "image", "text" or "image+text"."""
        return {"image": self.image, "text": self.text, "image+text": self.total}[towers]


def resolve_config(spec: str) -> tuple[ModelConfig, ClipShape | None]:
    """A --config value as a model config, and the named CLIP shape it is (for its published figures).

    Args:
        spec: a shipped preset (`PRESETS`), a named CLIP shape (`CLIP_SHAPES`), or a path to a
            HuggingFace CLIP config.json or the folder holding one.

    Raises:
        FileNotFoundError, ValueError: for anything else.
    """
    if spec in PRESETS:
        return PRESETS[spec].model, None
    if spec in CLIP_SHAPES:
        return model_config(CLIP_SHAPES[spec].config, spec), CLIP_SHAPES[spec]
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"--config {spec!r} is neither a name ({', '.join(CONFIG_NAMES)}) nor an existing config.json or folder."
        )
    cfg = read_model_config(path)
    # A config.json of a named shape gets that shape's published figures.
    shape = next((s for name, s in CLIP_SHAPES.items() if model_config(s.config, name) == cfg), None)
    return cfg, shape


def tower_gmacs(cfg: ModelConfig) -> Towers:
    """fvcore and closed-form GMACs of the image tower (unpruned) and the text tower (one caption), batch 1."""
    return Towers(
        image=flops.gmacs(cfg, BASELINE), text=flops.text_gmacs(cfg),
        image_closed=flops.closed_form_gmacs(cfg, BASELINE), text_closed=flops.closed_form_text_gmacs(cfg),
        context=cfg.text.context_length,
    )  # fmt: skip


def format_towers(towers: Towers, shape: ClipShape | None) -> str:
    """The GMACs-per-tower lines, then each published figure with our count over it."""
    lines = [
        f"# GMACs per tower, batch 1 (fvcore; closed form in brackets): image {towers.image:.5g} "
        f"[{towers.image_closed:.5g}]  text {towers.text:.5g} [{towers.text_closed:.5g}] "
        f"(one caption, {towers.context} tokens)  total {towers.total:.5g}"
    ]
    for p in shape.published if shape else ():
        ours = towers.of(p.towers)
        lines.append(
            f"# published {p.towers} {p.gmacs:.3f} GMACs ({p.source}): ours {ours:.5g}, "
            f"ours/published {ours / p.gmacs:.3f}"
        )
    return "\n".join(lines)


def unrunnable(cfg: ModelConfig, methods: tuple[str, ...], placement: Placement) -> dict[str, str]:
    """The methods of `methods` that cannot prune this model at `placement`, each with the reason."""
    v, p = cfg.vision, cfg.pruning
    skipped = {}
    for method in methods:
        mismatch = pruning.predictor_mismatch(method, p)
        if mismatch:
            skipped[method] = mismatch
            continue
        try:
            pruning.resolve_stages(method, v.depth, p.stages, p.placement if placement is None else placement)
        except ValueError as e:
            skipped[method] = str(e)
    return skipped


def protocol_for(batch: int, protocol: LatencyProtocol) -> LatencyProtocol:
    """The protocol of one batch size: `protocol` at batch 1; larger batches cost more a call, so fewer calls."""
    if batch == 1:
        return protocol
    return protocol.replace(warmup=min(protocol.warmup, 2), repeats=max(5, protocol.repeats // 4))


def run(
    model: DualEncoder,
    methods: list[str],
    batches: list[int],
    protocol: LatencyProtocol = LATENCY,
    fraction: float = 0.5,
    placement: Placement = None,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Measure every (method, batch); returns the rows (nothing printed but through `progress`).

    GMACs are fvcore's at batch 1 times the batch (the count is linear in it, see
    tests/test_flops.py), so a big model is traced once per method, not once per batch.

    Args:
        model: the image encoder to time (and its config to count).
        methods: pruning methods, each timed against the baseline.
        batches: batch sizes.
        protocol: the batch-1 latency protocol (see `protocol_for`).
        fraction: target GMACs fraction of the baseline's, in (0, 1].
        placement: where each method's stages sit (see `PruneSpec.stages`); None: the config's.
        progress: called with one line before and after each timed pair.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    say = progress or (lambda line: None)
    cfg = model.cfg
    size = cfg.vision.image_size
    base = flops.gmacs(cfg, BASELINE)
    rows = []
    for method in methods:
        r = flops.keep_ratio_for(cfg, method, fraction, placement)
        spec = PruneSpec(method, r, stages=placement)
        say(f"{method}: keep ratio {r:.2f}; counting GMACs (fvcore)")
        pruned = flops.gmacs(cfg, method, r, placement=placement)
        tokens = flops.tokens_per_block(cfg, method, r, placement=placement)
        for b in batches:
            pixels = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b))
            proto = protocol_for(b, protocol)
            budget = f", {proto.budget_s:g} s budget" if proto.budget_s else ""
            say(f"{method} batch {b}: timing baseline and pruned, interleaved ({proto.warmup} warm-up, "
                f"up to {proto.repeats} rounds{budget})")  # fmt: skip
            start = time.perf_counter()
            t = interleaved(
                {"base": lambda: model.encode_image(pixels), "pruned": lambda: model.encode_image(pixels, spec)}, proto
            )
            say(f"{method} batch {b}: {t['base'].median_ms:.1f} vs {t['pruned'].median_ms:.1f} ms over "
                f"{t['base'].repeats} rounds in {time.perf_counter() - start:.0f} s")  # fmt: skip
            rows.append(
                Row(
                    method=method, keep_ratio=r, batch=b, tokens=tokens, gmacs_base=base * b, gmacs=pruned * b,
                    ms_base=t["base"].median_ms, iqr_base=t["base"].iqr_ms, ms=t["pruned"].median_ms,
                    iqr=t["pruned"].iqr_ms,
                )  # fmt: skip
            )
    return rows


def format_rows(rows: list[Row]) -> str:
    """A plain-text table with the batch-32 verdicts."""
    tokens = ["/".join(map(str, r.tokens)) for r in rows]
    w = max([len("tokens/block"), *map(len, tokens)]) + 2
    head = (
        f"{'method':<14}{'keep':>5}{'batch':>6}  {'tokens/block':<{w}}{'GMACs base':>11}{'GMACs':>9}{'ratio':>7}"
        f"{'ms base':>18}{'ms':>18}{'ratio':>7}  verdict"
    )
    lines = [head, "-" * len(head)]
    for r, tok in zip(rows, tokens):
        verdict = ""
        if r.meets_target is not None:
            verdict = f"{'PASS' if r.meets_target else 'MISS'} ({r.latency_ratio / r.gmacs_ratio:.2f}x of GMACs ratio)"
        lines.append(
            f"{r.method:<14}{r.keep_ratio:>5.2f}{r.batch:>6}  {tok:<{w}}"
            f"{r.gmacs_base:>11.3f}{r.gmacs:>9.3f}{r.gmacs_ratio:>7.3f}"
            f"{f'{r.ms_base:.2f} ± {r.iqr_base:.2f}':>18}{f'{r.ms:.2f} ± {r.iqr:.2f}':>18}{r.latency_ratio:>7.3f}"
            f"  {verdict}"
        )
    return "\n".join(lines)


def misses(rows: list[Row]) -> list[Row]:
    """The rows at batch `TARGET_BATCH` or more whose latency ratio exceeds `TARGET_SLACK` x their GMACs ratio."""
    return [r for r in rows if r.meets_target is False]


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m vlm_demo.bench", __doc__)
    p.add_argument(
        "--config", default=None, metavar="CONFIG_JSON_OR_PRESET",
        help=f"the model to build with random weights: a name ({', '.join(CONFIG_NAMES)}) or a HuggingFace CLIP "
        "config.json (or its folder) (default: default, unless --checkpoints)",
    )  # fmt: skip
    # The old spelling, hidden.
    p.add_argument("--preset", dest="config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument(
        "--checkpoints", default=None,
        help="a checkpoint folder whose baseline/ is timed for every method (default: none, the --config model)",
    )  # fmt: skip
    methods = pruning.names(prunes_only=True, image_only=True)  # the timed pass has no caption
    p.add_argument(
        "--methods", nargs="+", default=None, choices=methods, metavar="METHOD",
        help=f"methods to time against the baseline, of {', '.join(methods)} (default: {' '.join(DEFAULT_METHODS)}, "
        "those of them that can prune the model at the placement)",
    )  # fmt: skip
    p.add_argument(
        "--placement", type=cli.placement, default=None,
        help="where each method's stages sit: paper (each method's paper default), shared (the config's "
        "pruning.stages) or block indices like 1,3 (default: the config's pruning.placement, paper)",
    )  # fmt: skip
    p.add_argument("--batches", nargs="+", type=cli.positive_int, default=[1, TARGET_BATCH], help="batch sizes")
    p.add_argument(
        "--latency-repeats", type=cli.positive_int, default=LATENCY.repeats,
        help="measured batch-1 rounds at most per (method, batch) (larger batches use a quarter, at least 5)",
    )  # fmt: skip
    # The old spelling, hidden.
    p.add_argument("--repeats", dest="latency_repeats", type=cli.positive_int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument(
        "--latency-budget", type=cli.positive_float, default=LATENCY.budget_s,
        help=f"seconds of measuring per (method, batch), then timing stops, after at least {LATENCY.min_repeats} "
        f"rounds; small models finish their --latency-repeats well within it (default: {LATENCY.budget_s:g})",
    )  # fmt: skip
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument("--fraction", type=float, default=0.5, help="target GMACs fraction, in (0, 1]; 0.5 halves them")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    """Print the benchmark table; returns the exit code: 0 when every batch-32 row meets the target, else 1."""
    p = _parser()
    args = p.parse_args(argv)

    def say(line: str) -> None:
        if not args.quiet:
            print(f"[bench] {line}", file=sys.stderr, flush=True)

    with cli.user_errors(p):
        if not 0.0 < args.fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {args.fraction}.")
        if args.checkpoints and args.config:
            raise ValueError("give --config or --checkpoints, not both.")
        torch.manual_seed(0)
        shape = None
        if args.checkpoints:
            say(f"loading {args.checkpoints}/baseline")
            model, _ = load_checkpoint(f"{args.checkpoints}/baseline")
            label = f"checkpoints={args.checkpoints}"
        else:
            name = args.config or "default"
            cfg, shape = resolve_config(name)
            say(f"building {name} with random weights")
            model = DualEncoder(cfg).eval()
            label = f"config={name}" + (f" ({shape.hub_id} shape, random weights)" if shape else " (random weights)")
        cfg = model.cfg
        methods = args.methods
        if methods is None:
            skipped = unrunnable(cfg, DEFAULT_METHODS, args.placement)
            for method, why in skipped.items():
                say(f"skipping {method}: {why}")
            methods = [m for m in DEFAULT_METHODS if m not in skipped]
        elif problems := unrunnable(cfg, tuple(methods), args.placement):
            raise ValueError(" ".join(problems.values()))
        threads = args.threads or torch.get_num_threads()
        protocol = LATENCY.replace(repeats=args.latency_repeats, threads=threads, budget_s=args.latency_budget)
        placement = cfg.pruning.placement if args.placement is None else args.placement
        where = placement if isinstance(placement, str) else ",".join(map(str, placement))
        print(
            f"# vlm_demo.bench  {label}  placement={where}  torch {torch.__version__}  threads={threads}  "
            f"{platform.machine()} {platform.processor() or ''}".rstrip()
        )
        say("counting GMACs per tower (fvcore)")
        print(format_towers(tower_gmacs(cfg), shape))
        print("# GMACs: fvcore multiply-accumulates of the image encoder at batch 1 x batch (FLOPs = 2 x MACs); "
              "ms: median ± IQR, interleaved")  # fmt: skip
        rows = run(model, methods, args.batches, protocol, args.fraction, args.placement, say)
    print(format_rows(rows))
    missed = misses(rows)
    print(f"# batch-{TARGET_BATCH} target (latency ratio <= {TARGET_SLACK} x GMACs ratio): {len(missed)} miss(es)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
