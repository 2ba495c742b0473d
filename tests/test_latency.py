"""Latency helper: behaviour only (no timing thresholds; these machines are shared)."""

import time

import pytest
import torch

from vlm_demo.latency import LatencyProtocol, fixed_threads, interleaved


class FakeTime:
    """A clock that only moves when a fake callable "runs": no dependence on the machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float, log: list | None = None, name: str = ""):
        def fn() -> None:
            self.now += seconds
            if log is not None:
                log.append(name)

        return fn


def test_interleaved_runs_each_variant_in_turn():
    calls = []
    out = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, LatencyProtocol(2, 4))
    assert calls == ["a", "b"] * 6
    assert set(out) == {"a", "b"}
    assert out["a"].repeats == 4 and out["a"].median_ms >= 0 and out["a"].iqr_ms >= 0


def test_runs_under_inference_mode_and_restores_threads():
    seen = []
    before = torch.get_num_threads()
    fn = lambda: seen.append((torch.is_inference_mode_enabled(), torch.get_num_threads()))  # noqa: E731
    interleaved({"x": fn}, LatencyProtocol(warmup=0, repeats=1, threads=1))
    assert seen == [(True, 1)]
    assert torch.get_num_threads() == before
    with fixed_threads(None):
        assert torch.get_num_threads() == before


def test_a_slower_variant_has_a_larger_median():
    out = interleaved({"fast": lambda: None, "slow": lambda: time.sleep(0.01)}, LatencyProtocol(0, 3))
    assert out["slow"].median_ms > out["fast"].median_ms


def test_the_budget_stops_early_and_timing_says_how_many():
    clock, calls = FakeTime(), []
    variants = {"a": clock.work(0.25, calls, "a"), "b": clock.work(0.25, calls, "b")}  # a round takes 0.5 s
    out = interleaved(variants, LatencyProtocol(warmup=1, repeats=100, budget_s=2.0), clock)
    assert out["a"].repeats == out["b"].repeats == 4  # 4 rounds x 0.5 s spend the 2 s budget
    assert calls == ["a", "b"] * 5  # the warm-up round is not measured, nor counted against the budget
    assert out["a"].median_ms == 250.0 and out["a"].iqr_ms == 0.0


def test_the_budget_never_cuts_below_min_repeats_nor_past_repeats():
    def repeats(**fields) -> int:
        clock = FakeTime()
        return interleaved({"x": clock.work(1.0)}, LatencyProtocol(warmup=0, **fields), clock)["x"].repeats

    assert repeats(repeats=10, budget_s=0.5, min_repeats=3) == 3  # a slow callable: over budget after one call
    assert repeats(repeats=2, budget_s=0.5, min_repeats=3) == 2
    assert repeats(repeats=7, budget_s=1e6) == 7
    assert repeats(repeats=7) == 7


def test_the_budget_with_a_real_slow_callable():
    # 20 ms a call against a 50 ms budget: generous bounds, so a busy machine only makes it stop sooner.
    out = interleaved({"slow": lambda: time.sleep(0.02)}, LatencyProtocol(0, repeats=50, budget_s=0.05, min_repeats=2))
    assert 2 <= out["slow"].repeats <= 4


@pytest.mark.parametrize(
    "fields", [{"repeats": 0}, {"warmup": -1}, {"min_repeats": 0}, {"threads": 0}, {"budget_s": 0.0}]
)
def test_rejects_a_bad_protocol(fields):
    with pytest.raises(ValueError):
        LatencyProtocol(**fields)
