"""Interleaved A/B latency: the same noise hits every variant.

Variants run in turn (A B A B ...) after warm-up, under `torch.inference_mode`
with a fixed thread count; the figures are the median and inter-quartile range
over the repeats. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Timing:
    """Wall-clock milliseconds per call of one variant."""

    median_ms: float
    iqr_ms: float  # 75th minus 25th percentile
    repeats: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[None]:
    """Pin torch's intra-op thread count for the duration, then restore it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interleaved(
    variants: Mapping[str, Callable[[], object]], repeats: int = 20, warmup: int = 3, threads: int | None = None
) -> dict[str, Timing]:
    """Time several zero-argument callables, interleaved.

    Args:
        variants: name -> callable; each call is one measured unit of work.
        repeats: measured calls per variant (at least 1).
        warmup: discarded calls per variant, run first (also interleaved).
        threads: torch threads for the run; None keeps the current setting.

    Returns:
        name -> `Timing`.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1.")
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with fixed_threads(threads), torch.inference_mode():
        for i in range(warmup + repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                dt = (time.perf_counter() - t0) * 1e3
                if i >= warmup:
                    samples[name].append(dt)
    out = {}
    for name, s in samples.items():
        q25, q50, q75 = np.percentile(s, [25, 50, 75])
        out[name] = Timing(median_ms=float(q50), iqr_ms=float(q75 - q25), repeats=len(s))
    return out
