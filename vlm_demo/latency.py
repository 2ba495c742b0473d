"""Interleaved A/B latency: the same noise hits every variant.

One protocol for every figure the project reports (`LatencyProtocol`): variants
run in turn (A B A B ...), first `warmup` discarded rounds, then up to `repeats`
measured ones, under `torch.inference_mode` with a fixed thread count; the
figures are the median and inter-quartile range over the measured rounds. With
a time budget, measuring stops once ``budget_s`` seconds have gone into measured
rounds, but never before ``min_repeats`` of them. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LatencyProtocol:
    """How a latency figure is measured.

    Raises:
        ValueError: for counts below their minimum or a non-positive budget.
    """

    warmup: int = 3  # discarded rounds run first (interleaved too): caches, allocator, lazy init
    repeats: int = 20  # measured rounds at most; each round calls every variant once
    threads: int | None = None  # torch intra-op threads for the run; None keeps the current setting
    budget_s: float | None = None  # stop once measured rounds have taken this long (None: always `repeats`)
    min_repeats: int = 3  # measured rounds even past the budget (capped at `repeats`): a median needs a few

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.min_repeats < 1 or self.warmup < 0:
            raise ValueError(
                f"Latency protocol needs repeats >= 1, min_repeats >= 1 and warmup >= 0; got {self.repeats}, "
                f"{self.min_repeats} and {self.warmup}."
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1 (or None), got {self.threads}.")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ValueError(f"budget_s must be positive (or None), got {self.budget_s}.")

    def replace(self, **changes: object) -> LatencyProtocol:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Timing:
    """Wall-clock milliseconds per call of one variant."""

    median_ms: float
    iqr_ms: float  # 75th minus 25th percentile
    repeats: int  # measured calls: fewer than the protocol's repeats when its time budget ran out


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
    variants: Mapping[str, Callable[[], object]],
    protocol: LatencyProtocol = LatencyProtocol(),
    clock: Callable[[], float] = time.perf_counter,
    grad: bool = False,
) -> dict[str, Timing]:
    """Time several zero-argument callables, interleaved, under one `LatencyProtocol`.

    Args:
        variants: name -> callable; each call is one measured unit of work.
        protocol: warm-up, repeats, threads and time budget.
        clock: seconds, monotonic (tests pass a fake one).
        grad: run with autograd (a training step); by default under `torch.inference_mode`.

    Returns:
        name -> `Timing`; every variant has the same number of repeats.
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    least = min(protocol.min_repeats, protocol.repeats)
    with fixed_threads(protocol.threads), torch.inference_mode(not grad):
        for _ in range(protocol.warmup):
            for fn in variants.values():
                fn()
        start = clock()
        for done in range(1, protocol.repeats + 1):
            for name, fn in variants.items():
                t0 = clock()
                fn()
                samples[name].append((clock() - t0) * 1e3)
            if protocol.budget_s is not None and done >= least and clock() - start >= protocol.budget_s:
                break
    out = {}
    for name, s in samples.items():
        q25, q50, q75 = np.percentile(s, [25, 50, 75])
        out[name] = Timing(median_ms=float(q50), iqr_ms=float(q75 - q25), repeats=len(s))
    return out
