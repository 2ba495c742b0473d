"""One baseline training step of the default model, float32 against bf16 autocast, interleaved.

    python -m benchmarks.train_step                 # batch 64, 2 hard negatives, the layout objective
    python -m benchmarks.train_step --repeats 10 --batch-size 32

Each variant runs the training code's own step (`training.train._contrastive_loss` with the layout
objective, backward, AdamW) on one fixed random batch, alternating with the other (`vlm_demo.latency`),
and prints the median seconds per step and the ratio. bf16 is `TrainConfig.precision`'s default; it pays
only on CPUs with bf16 matrix units (AMX), so run this before choosing it on another machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Callable

import torch

from training.layout import CELLS, LayoutCode
from training.train import _contrastive_loss
from vlm_demo import cli
from vlm_demo.config import PRECISIONS, get_preset
from vlm_demo.latency import LatencyProtocol, interleaved
from vlm_demo.model import DualEncoder


def step_fn(precision: str, batch: int, seed: int = 0) -> tuple[Callable[[], None], DualEncoder]:
    """A zero-argument training step of a fresh default model at `precision`, on a fixed random batch; and
    the model it trains."""
    torch.manual_seed(seed)
    cfg = get_preset("default").model
    model = DualEncoder(dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=64)))
    layout = LayoutCode(cfg.embed_dim)
    ph = types.SimpleNamespace(net=model, model=model, layout=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=g)
    ids = torch.randint(3, 64, (batch, 24), generator=g)
    hard = torch.randint(3, 64, (2 * batch, 24), generator=g)
    target = torch.randint(0, 3, (batch, 3, CELLS), generator=g)

    def step() -> None:
        loss, extra = _contrastive_loss(ph, images, ids, hard, target, precision)
        opt.zero_grad(set_to_none=True)
        (loss + extra).backward()
        opt.step()

    return step, model


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = cli.parser("python -m benchmarks.train_step", __doc__)
    p.add_argument("--batch-size", type=cli.positive_int, default=get_preset("default").train.batch_size)
    p.add_argument("--repeats", type=cli.positive_int, default=8, help="measured steps per variant")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads (default: all cores)")
    args = p.parse_args(argv)
    protocol = LatencyProtocol(warmup=2, repeats=args.repeats, threads=args.threads)
    timings = interleaved({pr: step_fn(pr, args.batch_size)[0] for pr in PRECISIONS}, protocol, grad=True)
    print(f"default model, batch {args.batch_size}, {torch.get_num_threads()} threads, {args.repeats} steps each")
    for name, t in timings.items():
        print(f"{name:>5}  {t.median_ms / 1e3:.3f} s/step  (IQR {t.iqr_ms / 1e3:.3f})")
    speedup = timings["fp32"].median_ms / timings["bf16"].median_ms
    print(f"fp32 / bf16 = {speedup:.2f}x")
    return {name: t.median_ms for name, t in timings.items()}


if __name__ == "__main__":
    main()
