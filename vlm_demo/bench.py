"""Benchmark: do fewer tokens really cost less? GMACs and interleaved latency, baseline vs pruned.

    python -m vlm_demo.bench                     # default preset, untrained weights
    python -m vlm_demo.bench --checkpoints checkpoints --repeats 40

For each method the keep ratio is the one whose fvcore GMACs are closest to
half the baseline's. Each (method, batch) pair is timed interleaved with the
baseline (A B A B ...) in one run, so both see the same machine noise. The
target: at batch 32, latency ratio <= 1.15 x GMACs ratio.
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass

import torch

from . import flops
from .config import ModelConfig, get_preset
from .latency import interleaved
from .model import DualEncoder, load_checkpoint
from .pruning import BASELINE, PruneSpec

TARGET_SLACK = 1.15  # allowed latency ratio / GMACs ratio at batch 32


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


def keep_ratio_for(cfg: ModelConfig, method: str, fraction: float = 0.5) -> float:
    """The keep ratio (to 0.01) whose GMACs are closest to `fraction` of the baseline's."""
    base = flops.closed_form_gmacs(cfg, BASELINE)
    grid = [r / 100 for r in range(1, 101)]
    return min(grid, key=lambda r: abs(flops.closed_form_gmacs(cfg, method, r) / base - fraction))


def run(
    model: DualEncoder, methods: list[str], batches: list[int], repeats: int, threads: int | None, fraction: float = 0.5
) -> list[Row]:
    """Measure every (method, batch); returns the rows (nothing printed)."""
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
                repeats=repeats if b == 1 else max(5, repeats // 4),
                warmup=5 if b == 1 else 2,
                threads=threads,
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
        if r.batch >= 32:
            ok = r.latency_ratio <= TARGET_SLACK * r.gmacs_ratio
            verdict = f"{'PASS' if ok else 'MISS'} ({r.latency_ratio / r.gmacs_ratio:.2f}x of GMACs ratio)"
        lines.append(
            f"{r.method:<14}{r.keep_ratio:>5.2f}{r.batch:>6}  {'/'.join(map(str, r.tokens)):<28}"
            f"{r.gmacs_base:>11.3f}{r.gmacs:>9.3f}{r.gmacs_ratio:>7.3f}"
            f"{f'{r.ms_base:.2f} ± {r.iqr_base:.2f}':>16}{f'{r.ms:.2f} ± {r.iqr:.2f}':>16}{r.latency_ratio:>7.3f}  {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlm_demo.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help="model preset when no --checkpoints (untrained weights)")
    p.add_argument("--checkpoints", help="a checkpoint folder (baseline/ is timed for every method but learned)")
    p.add_argument("--methods", nargs="+", default=["learned", "cls_attention", "tome"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--repeats", type=int, default=40, help="measured batch-1 passes (batch 32 uses a quarter)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument("--fraction", type=float, default=0.5, help="target GMACs fraction (0.5 halves them)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.checkpoints:
        model, _ = load_checkpoint(f"{args.checkpoints}/baseline")
    else:
        model = DualEncoder(get_preset(args.preset).model).eval()
    threads = args.threads or torch.get_num_threads()
    print(
        f"# vlm_demo.bench  preset={args.preset if not args.checkpoints else args.checkpoints}  "
        f"torch {torch.__version__}  threads={threads}  {platform.machine()} {platform.processor() or ''}".rstrip()
    )
    print("# GMACs: fvcore multiply-accumulates of the image encoder (FLOPs = 2 x MACs); ms: median ± IQR, interleaved")
    rows = run(model, args.methods, args.batches, args.repeats, threads, args.fraction)
    print(format_rows(rows))
    misses = [r for r in rows if r.batch >= 32 and r.latency_ratio > TARGET_SLACK * r.gmacs_ratio]
    print(f"# batch-32 target (latency ratio <= {TARGET_SLACK} x GMACs ratio): {len(misses)} miss(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
