"""Quick SIGKILL fault injection on the tiny preset; ``python -m benchmarks.fault_injection`` runs the full one.

The same functions as the script: kills at seeded points (a phase and a delay into it, or the phase's next
checkpoint write), read from the process's own stack, then ``--resume`` and exact comparison.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fault_injection import (
    TRAIN_TARGETS,
    WRITERS,
    inject_cache,
    inject_generation,
    inject_training,
    make_dataset,
)
from vlm_demo.config import get_preset

TINY = get_preset("tiny")
DATASET_FILES = TINY.train.num_images + 5  # the images, 3 split files, the captions and objects.json


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, _ = make_dataset(tmp_path_factory.mktemp("fault_injection"))
    return data


def test_training_killed_three_times_resumes_to_identical_weights(dataset: Path, tmp_path: Path) -> None:
    # Evaluation takes most of a full run and is covered by the script; three kills spread over the rest.
    extra = ("--phases", "baseline,pruned,finetune", "--baseline-epochs", "3", "--pruned-epochs", "2",
             "--finetune-steps", "3")
    report = inject_training(dataset, tmp_path, kills=3, seed=2, extra=extra)
    # An attempt that completes before its kill point (a noisy machine runs a tiny phase faster than the
    # reference did) is started again, aiming earlier: it counts as an attempt and a resume, not a kill.
    attempts = [k.attempt for k in report.kills]
    assert len(attempts) == 3 and attempts == sorted(set(attempts)) and report.early <= 3
    assert attempts[-1] == 3 + report.early and report.resumes == attempts[-1]
    assert {k.phase for k in report.kills} <= set(TRAIN_TARGETS) - {"evaluate"}
    assert "finetune" in {k.phase for k in report.kills}  # seed 2's plan: data, pruned, finetune
    assert any(k.aim.endswith("a write") for k in report.kills)
    for k in report.kills:
        if k.aim.endswith("a write") and k.phase in k.aim:
            assert k.where in WRITERS  # it died inside save_state / save_checkpoint
    assert report.checks > 0
    assert [f.split("/")[0] for f in report.facts if "weight tensors bit-identical" in f] == ["baseline", "pruned"]
    assert "no temporaries of killed writers left in OUT" in report.facts


def test_interrupted_generation_is_repaired_by_a_rerun(dataset: Path, tmp_path: Path) -> None:
    report = inject_generation(dataset, tmp_path, kills=1, seed=0)
    (kill,) = report.kills
    assert kill.phase in ("images", "index") and "no objects.json" in kill.after
    assert report.files == DATASET_FILES  # byte-identical to the uninterrupted generation


def test_training_regenerates_a_half_generated_cache(dataset: Path, tmp_path: Path) -> None:
    report = inject_cache(dataset, tmp_path, seed=0)
    assert report.kills[0].phase in ("images", "index") and "no objects.json" in report.kills[0].after
    assert report.regenerated and report.files == DATASET_FILES
