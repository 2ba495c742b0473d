"""Benchmark: do fewer tokens really cost less? GMACs and interleaved latency, baseline vs pruned.

    python -m vlm_demo.bench                     # default preset, untrained weights
    python -m vlm_demo.bench --checkpoints checkpoints --latency-repeats 40

For each method the keep ratio is the one whose fvcore GMACs are closest to
half the baseline's. Each (method, batch) pair is timed interleaved with the
baseline (A B A B ...) in one run, so both see the same machine noise. The
target: at batch 32, latency ratio <= 1.15 x GMACs ratio; the exit code is 1
when a batch-32 row misses it, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass

import torch

from . import cli, flops, pruning
from .config import PRESETS, ModelConfig, get_preset
from .latency import LatencyProtocol, interleaved
from .model import DualEncoder, load_checkpoint
from .pruning import BASELINE, PruneSpec

TARGET_SLACK = 1.15  # allowed latency ratio / GMACs ratio at batch 32
TARGET_BATCH = 32  # rows at this batch size or larger are held to the target
LATENCY = LatencyProtocol(warmup=5, repeats=40)  # batch 1; larger batches: see `protocol_for`
DEFAULT_METHODS = ("learned", "cls_attention", "tome")  # one of each kind: trained, attention, merging


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


def keep_ratio_for(cfg: ModelConfig, method: str, fraction: float = 0.5) -> float:
    """The keep ratio (to 0.01) whose GMACs are closest to `fraction` of the baseline's."""
    base = flops.closed_form_gmacs(cfg, BASELINE)
    grid = [r / 100 for r in range(1, 101)]
    return min(grid, key=lambda r: abs(flops.closed_form_gmacs(cfg, method, r) / base - fraction))


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
) -> list[Row]:
    """Measure every (method, batch); returns the rows (nothing printed).

    Args:
        model: the image encoder to time (and its config to count).
        methods: pruning methods, each timed against the baseline.
        batches: batch sizes.
        protocol: the batch-1 latency protocol (see `protocol_for`).
        fraction: target GMACs fraction of the baseline's, in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    cfg = model.cfg
    size = cfg.vision.image_size
    rows = []
    for method in methods:
        r = keep_ratio_for(cfg, method, fraction)
        spec = PruneSpec(method, r)
        for b in batches:
            pixels = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b))
            t = interleaved(
                {"base": lambda: model.encode_image(pixels), "pruned": lambda: model.encode_image(pixels, spec)},
                protocol_for(b, protocol),
            )
            rows.append(
                Row(
                    method=method, keep_ratio=r, batch=b, tokens=flops.tokens_per_block(cfg, method, r),
                    gmacs_base=flops.gmacs(cfg, BASELINE, 1.0, b), gmacs=flops.gmacs(cfg, method, r, b),
                    ms_base=t["base"].median_ms, iqr_base=t["base"].iqr_ms, ms=t["pruned"].median_ms,
                    iqr=t["pruned"].iqr_ms,
                )  # fmt: skip
            )
    return rows


def format_rows(rows: list[Row]) -> str:
    """A plain-text table with the batch-32 verdicts."""
    head = (
        f"{'method':<14}{'keep':>5}{'batch':>6}  {'tokens/block':<28}{'GMACs base':>11}{'GMACs':>9}{'ratio':>7}"
        f"{'ms base':>16}{'ms':>16}{'ratio':>7}  verdict"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = ""
        if r.meets_target is not None:
            verdict = f"{'PASS' if r.meets_target else 'MISS'} ({r.latency_ratio / r.gmacs_ratio:.2f}x of GMACs ratio)"
        lines.append(
            f"{r.method:<14}{r.keep_ratio:>5.2f}{r.batch:>6}  {'/'.join(map(str, r.tokens)):<28}"
            f"{r.gmacs_base:>11.3f}{r.gmacs:>9.3f}{r.gmacs_ratio:>7.3f}"
            f"{f'{r.ms_base:.2f} ± {r.iqr_base:.2f}':>16}{f'{r.ms:.2f} ± {r.iqr:.2f}':>16}{r.latency_ratio:>7.3f}  {verdict}"
        )
    return "\n".join(lines)


def misses(rows: list[Row]) -> list[Row]:
    """The rows at batch `TARGET_BATCH` or more whose latency ratio exceeds `TARGET_SLACK` x their GMACs ratio."""
    return [r for r in rows if r.meets_target is False]


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m vlm_demo.bench", __doc__)
    p.add_argument(
        "--preset", default="default", choices=sorted(PRESETS), help="model preset when no --checkpoints (untrained)"
    )
    p.add_argument(
        "--checkpoints", default=None,
        help="a checkpoint folder whose baseline/ is timed for every method (default: none, the preset's model)",
    )  # fmt: skip
    methods = pruning.names(prunes_only=True, image_only=True)  # the timed pass has no caption
    p.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), choices=methods, metavar="METHOD",
        help=f"methods to time against the baseline, of {', '.join(methods)}",
    )  # fmt: skip
    p.add_argument("--batches", nargs="+", type=cli.positive_int, default=[1, TARGET_BATCH], help="batch sizes")
    p.add_argument(
        "--latency-repeats", type=cli.positive_int, default=LATENCY.repeats,
        help="measured batch-1 passes per model (larger batches use a quarter, at least 5)",
    )  # fmt: skip
    # The old spelling, hidden.
    p.add_argument("--repeats", dest="latency_repeats", type=cli.positive_int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument(
        "--latency-budget", type=cli.positive_float, default=None,
        help=f"seconds of measuring per (method, batch), then timing stops, after at least {LATENCY.min_repeats} "
        "passes (default: no budget, always --latency-repeats)",
    )  # fmt: skip
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument("--fraction", type=float, default=0.5, help="target GMACs fraction, in (0, 1]; 0.5 halves them")
    return p


def main(argv: list[str] | None = None) -> int:
    """Print the benchmark table; returns the exit code: 0 when every batch-32 row meets the target, else 1."""
    p = _parser()
    args = p.parse_args(argv)
    with cli.user_errors(p):
        if not 0.0 < args.fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {args.fraction}.")
        torch.manual_seed(0)
        if args.checkpoints:
            model, _ = load_checkpoint(f"{args.checkpoints}/baseline")
        else:
            model = DualEncoder(get_preset(args.preset).model).eval()
        threads = args.threads or torch.get_num_threads()
        protocol = LATENCY.replace(repeats=args.latency_repeats, threads=threads, budget_s=args.latency_budget)
        print(
            f"# vlm_demo.bench  preset={args.preset if not args.checkpoints else args.checkpoints}  "
            f"torch {torch.__version__}  threads={threads}  {platform.machine()} {platform.processor() or ''}".rstrip()
        )
        print("# GMACs: fvcore multiply-accumulates of the image encoder (FLOPs = 2 x MACs); "
              "ms: median ± IQR, interleaved")  # fmt: skip
        rows = run(model, args.methods, args.batches, protocol, args.fraction)
    print(format_rows(rows))
    missed = misses(rows)
    print(f"# batch-{TARGET_BATCH} target (latency ratio <= {TARGET_SLACK} x GMACs ratio): {len(missed)} miss(es)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
