"""Latency helper: behaviour only (no timing thresholds; these machines are shared)."""

import pytest
import torch

from vlm_demo.latency import fixed_threads, interleaved


def test_interleaved_runs_each_variant_in_turn():
    calls = []
    out = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=2)
    assert calls == ["a", "b"] * 6
    assert set(out) == {"a", "b"}
    assert out["a"].repeats == 4 and out["a"].median_ms >= 0 and out["a"].iqr_ms >= 0


def test_runs_under_inference_mode_and_restores_threads():
    seen = []
    before = torch.get_num_threads()
    interleaved({"x": lambda: seen.append((torch.is_inference_mode_enabled(), torch.get_num_threads()))}, 1, 0, threads=1)
    assert seen == [(True, 1)]
    assert torch.get_num_threads() == before
    with fixed_threads(None):
        assert torch.get_num_threads() == before


def test_a_slower_variant_has_a_larger_median():
    import time

    out = interleaved({"fast": lambda: None, "slow": lambda: time.sleep(0.01)}, repeats=3, warmup=0)
    assert out["slow"].median_ms > out["fast"].median_ms


def test_rejects_no_repeats():
    with pytest.raises(ValueError):
        interleaved({"a": lambda: None}, repeats=0)
