"""benchmarks.train_step: both precisions run the training code's step, and the figures print."""

from __future__ import annotations

import pytest
import torch

from benchmarks import train_step


def test_a_step_trains_both_towers_at_each_precision():
    for precision in ("fp32", "bf16"):
        step, model = train_step.step_fn(precision, batch=2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step()
        changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(before[n], p)}
        assert {"visual", "text"} <= changed, (precision, changed)
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_the_benchmark_prints_both_medians_and_their_ratio(capsys: pytest.CaptureFixture[str]):
    medians = train_step.main(["--repeats", "1", "--batch-size", "2", "--threads", "1"])
    assert set(medians) == {"fp32", "bf16"} and all(ms > 0 for ms in medians.values())
    out = capsys.readouterr().out
    assert "fp32 / bf16 = " in out and out.count("s/step") == 2
