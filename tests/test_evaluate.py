"""Retrieval metrics worked out by hand, and the evaluation CLI end to end on a tiny setup."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from training.metrics import (
    lossyness,
    object_patch_mask,
    object_recall,
    pair_accuracy,
    random_expectation,
    recall_at_k,
)

# ----------------------------------------------------------------------------- recall@K


def test_recall_hand_made_matrix() -> None:
    # 3 images x 6 captions; captions 2i and 2i+1 belong to image i.
    sim = torch.tensor(
        [
            # c0   c1   c2   c3   c4   c5
            [0.9, 0.1, 0.5, 0.2, 0.3, 0.0],  # image 0: best caption c0 (own)            -> i2t rank 1
            [0.8, 0.2, 0.1, 0.3, 0.7, 0.6],  # image 1: c0, c4, c5 beat own best c3=0.3   -> i2t rank 4
            [0.1, 0.9, 0.2, 0.4, 0.3, 0.35],  # image 2: c1, c3 beat own best c5=0.35      -> i2t rank 3
        ]
    )
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    # t2i, per caption: rank of its own image in that column.
    #   c0 (img0): 0.9 is top            -> 1
    #   c1 (img0): 0.1 < 0.2, 0.9        -> 3
    #   c2 (img1): 0.1 < 0.5, 0.2        -> 3
    #   c3 (img1): 0.3 > 0.2, < 0.4      -> 2
    #   c4 (img2): 0.3 < 0.7 (img1), = 0.3 (img0): pessimistic tie -> 3
    #   c5 (img2): 0.35 < 0.6, > 0.0     -> 2
    r = recall_at_k(sim, owner, ks=(1, 2, 3, 5))
    assert r["r1_i2t"] == pytest.approx(100 / 3)  # only image 0
    assert r["r2_i2t"] == pytest.approx(100 / 3)
    assert r["r3_i2t"] == pytest.approx(200 / 3)  # images 0 and 2
    assert r["r5_i2t"] == pytest.approx(100.0)
    assert r["r1_t2i"] == pytest.approx(100 / 6)  # c0
    assert r["r2_t2i"] == pytest.approx(300 / 6)  # c0, c3, c5
    assert r["r3_t2i"] == pytest.approx(100.0)
    assert r["r5_t2i"] == pytest.approx(100.0)


def test_recall_ties_are_pessimistic() -> None:
    # A constant model must not look perfect: every competitor ties and ranks above.
    sim = torch.zeros(4, 8)
    owner = torch.arange(8) // 2
    r = recall_at_k(sim, owner, ks=(1, 4))
    assert r["r1_i2t"] == 0.0 and r["r1_t2i"] == 0.0
    # i2t: 6 non-GT captions tie with the GT ones, so the first GT caption is 7th.
    assert r["r4_i2t"] == 0.0
    # t2i: 3 other images tie, so the GT image is 4th: a hit at 4.
    assert r["r4_t2i"] == 100.0
    # Ties between two ground-truth captions of the same image do not hurt.
    sim = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = recall_at_k(sim, torch.tensor([0, 0, 1]), ks=(1,))
    assert r["r1_i2t"] == 100.0 and r["r1_t2i"] == 100.0


def test_recall_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="caption_to_image"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="index images"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([0, 2]))


# ----------------------------------------------------------------------------- lossy-ness, pairs


def test_lossyness_formula() -> None:
    assert lossyness(40.0, 50.0) == pytest.approx(0.2)
    assert lossyness(50.0, 50.0) == 0.0
    assert lossyness(60.0, 50.0) == pytest.approx(-0.2)  # better than the baseline
    assert lossyness(10.0, 0.0) is None  # undefined ratio
    assert lossyness(None, 50.0) is None


def test_pair_accuracy() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    pos = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    # image 0: pos wins; image 1: neg wins; image 2: a tie, counted as a miss.
    assert pair_accuracy(img, pos, neg) == pytest.approx(100 / 3)
    # Query-aware: each caption is scored against the image pruned with it.
    neg_img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    assert pair_accuracy(img, pos, neg, neg_img) == pytest.approx(100 * 2 / 3)


# ----------------------------------------------------------------------------- object recall


def test_object_patch_mask_half_area_rule() -> None:
    # 4x4 grid on a 40 px image: 10 px cells. The box covers cell (0,0) fully,
    # cell (0,1) on 5 of 10 columns (exactly 50%: counts), cell (1,0) on 4 of 10 rows (40%: no).
    mask = object_patch_mask([[0, 0, 15, 14]], grid=4, image_size=40).reshape(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 0] = expected[0, 1] = True
    assert torch.equal(mask, expected)


def test_object_recall_pooled() -> None:
    # Image A: object on patches 0, 1, 4, 5 (4x4 grid, 40 px); kept 0, 5 and a fused token (-1).
    # Image B: object on patch 15 only; kept 15.
    boxes = [[[0, 0, 20, 20]], [[30, 30, 40, 40]]]
    kept = torch.tensor([[0, 5, -1], [15, 2, 3]])
    # Pooled: (2 + 1) / (4 + 1) object patches kept.
    assert object_recall(kept, boxes, grid=4, image_size=40) == pytest.approx(3 / 5)
    assert object_recall(torch.arange(16)[None], [[[0, 0, 40, 40]]], 4, 40) == 1.0
    assert math.isnan(object_recall(kept, [[], []], 4, 40))
    assert random_expectation(0.5) == 0.5
    assert random_expectation(0.3, num_patches=16) == 5 / 16  # round(4.8) = 5


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset root, checkpoints folder): 24 synthetic 32 px images, random-init tiny models."""
    return _tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


def _tiny_checkpoints(tmp_path: Path, num_images: int = 24) -> tuple[Path, Path]:
    from training.data import load_splits
    from training.synthetic import generate
    from vlm_demo.config import get_preset
    from vlm_demo.model import DualEncoder, save_checkpoint
    from vlm_demo.tokenizer import Tokenizer

    data = generate(tmp_path / "data", num_images=num_images, seed=0, size=32, workers=1, progress=False)
    splits = load_splits(data)
    captions = [c for s in splits.values() for caps in s.captions for c in caps]
    tok = Tokenizer.build(captions, context_length=16)
    cfg = get_preset("tiny").model
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tok)))
    ckpt = tmp_path / "ckpt"
    for i, name in enumerate(("baseline", "pruned")):
        torch.manual_seed(i)
        extra = {"seconds_per_epoch": 1.0 + i, "epochs": 1, "data": str(data), "preset": "tiny"}
        save_checkpoint(DualEncoder(cfg), tok, ckpt / name, **extra)
    return data, ckpt


def test_main_writes_metrics_report_and_plot(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from training.evaluate import main
    from vlm_demo.pruning import names

    METHODS = names()

    _, ckpt = tiny
    out = tmp_path / "eval"
    args = ["--checkpoints", str(ckpt), "--out", str(out), "--latency-repeats", "2", "--keep-ratios", "1.0", "0.5"]
    args += ["--quiet", "--threads", "1"]  # two threads on a busy 2-core machine spin against each other
    result = main(args)
    m = json.loads((out / "metrics.json").read_text())
    assert m == result
    assert {"dataset", "model", "training", "machine", "rows"} <= set(m)
    assert m["dataset"]["split"] == "test" and m["dataset"]["synthetic"] is True
    assert m["dataset"]["images"] == 3 and m["dataset"]["captions"] == 15  # 24 images: 18/3/3
    assert m["training"]["seconds_per_epoch"] == {"none": 1.0, "learned": 2.0, "text_guided": 2.0}
    assert m["model"]["params"] > 0
    assert m["options"]["placements"] == ["paper", "shared"]  # the placement ablation is part of the default
    assert {r["placement"] for r in m["rows"]} == {"paper", "shared"}
    assert set(m["oracle"]) == {"r1_t2i", "r1_i2t", "mean_r1"}
    kinds = m["pair_by_kind"]  # the baseline's pair accuracy per kind of hard negative
    assert all(k.split("_")[0] in ("swap", "change") for k in kinds)
    assert sum(v["images"] for v in kinds.values()) == m["dataset"]["pair_images"]
    assert all(0 <= v["pair_acc"] <= 100 for v in kinds.values())

    rows = m["rows"]
    # Every method, but dynamicvit: this folder has no dynamicvit/, so the default evaluation leaves it out.
    assert {r["method"] for r in rows} == set(METHODS) - {"dynamicvit"}
    assert [(r["method"], r["keep_ratio"]) for r in rows if r["method"] == "none"] == [("none", 1.0)]
    required = {
        "method", "keep_ratio", "tokens", "gmacs", "gmacs_ratio", "r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i",
        "r5_t2i", "r10_t2i", "mean_r1", "pair_acc", "object_recall", "lossyness", "latency_ms_bs1",
        "latency_ms_bs32", "latency_ratio_bs32", "baseline_latency_ms_bs32",
    }  # fmt: skip
    for r in rows:
        assert required <= set(r), required - set(r)
        assert r["latency_ms_bs1"] > 0 and r["latency_ms_bs32"] > 0 and r["baseline_latency_ms_bs32"] > 0
        assert 0 <= r["pair_acc"] <= 100
        assert 0 <= r["object_recall"] <= 1
        if r["method"] == "text_guided":
            assert all(r[f"r{k}_{d}"] is None for k in (1, 5, 10) for d in ("i2t", "t2i"))
            assert r["mean_r1"] is None and r["lossyness"] is None
        else:
            assert all(0 <= r[f"r{k}_{d}"] <= 100 for k in (1, 5, 10) for d in ("i2t", "t2i"))
            assert r["r1_i2t"] <= r["r5_i2t"] <= r["r10_i2t"]
    by = {(r["method"], r["keep_ratio"]): r for r in rows if r["placement"] == "paper"}  # the main placement
    none = by[("none", 1.0)]
    assert none["lossyness"] == 0.0 and none["gmacs_ratio"] == 1.0 and none["object_recall"] == 1.0
    for method in [m for m in METHODS[1:] if m != "dynamicvit"]:  # not in this folder (above)
        full, half = by[(method, 1.0)], by[(method, 0.5)]
        assert half["gmacs"] < full["gmacs"], method
        # Tiny: 4x4 patches, 4 blocks, each method at its paper placement (see test_api for the hand working).
        expected = {"learned": [16, 12, 9], "text_guided": [16, 12, 9], "cls_attention": [16, 14, 11, 9],
                    "tome": [16, 14, 12, 10, 8]}  # fmt: skip
        assert half["tokens"] == expected.get(method, [16, 11, 8]), method
        assert full["tokens"] == [16] * len(half["tokens"]), method
    # At keep ratio 1 a baseline-checkpoint method is the baseline itself.
    assert by[("random", 1.0)]["r1_t2i"] == none["r1_t2i"]
    assert by[("random", 1.0)]["same_as_baseline"] and not by[("learned", 1.0)]["same_as_baseline"]
    assert by[("random", 1.0)]["latency_ms_bs32"] == none["latency_ms_bs32"]
    assert by[("cls_attention", 1.0)]["gmacs"] == pytest.approx(none["gmacs"])

    report = (out / "report.md").read_text()
    assert "| method | keep |" in report and "text_guided" in report and "MACs" in report
    assert (out / "tradeoff.png").stat().st_size > 1000


def test_placements_paper_and_shared_each_get_rows(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from training.evaluate import main

    _, ckpt = tiny
    out = tmp_path / "eval"
    m = main(["--checkpoints", str(ckpt), "--out", str(out), "--keep-ratios", "0.5", "--placements", "paper", "shared",
              "--no-latency", "--quiet", "--threads", "1"])  # fmt: skip
    assert m["options"]["placements"] == ["paper", "shared"]
    rows = m["rows"]
    assert [(r["method"], r["placement"]) for r in rows if r["method"] == "none"] == [("none", "paper")]  # one, shared
    by = {(r["method"], r["placement"]): r for r in rows if r["method"] != "none"}
    assert set(by) == {(meth, p) for meth in ("learned", "cls_attention", "text_guided", "tome", "random")
                       for p in ("paper", "shared")}  # fmt: skip
    # Tiny: 4 blocks, predictors before blocks 1 and 2 (the shared placement).
    assert by[("cls_attention", "paper")]["stage_blocks"] == [1, 2, 3]
    assert by[("tome", "paper")]["stage_blocks"] == [0, 1, 2, 3]
    for meth in ("cls_attention", "tome"):  # the two whose paper placement differs: measured again
        shared = by[(meth, "shared")]
        assert shared["stage_blocks"] == [1, 2] and shared["same_as_placement"] is None
        assert len(shared["tokens"]) == 3 and shared["gmacs"] != by[(meth, "paper")]["gmacs"]
    for meth in ("learned", "text_guided", "random"):  # the same blocks either way: copied, marked
        paper, shared = by[(meth, "paper")], by[(meth, "shared")]
        assert shared["same_as_placement"] == "paper" and paper["same_as_placement"] is None
        assert {k: v for k, v in shared.items() if k not in ("placement", "same_as_placement")} == {
            k: v for k, v in paper.items() if k not in ("placement", "same_as_placement")
        }
    # The oracle: 3 test images whose scenes differ, so every caption fits its own image alone.
    assert m["oracle"] == {"r1_t2i": 100.0, "r1_i2t": 100.0, "mean_r1": 100.0}
    report = (out / "report.md").read_text()
    assert "## Placement ablation" in report and "| tome | 0.5 | shared | 1,2 |" in report
    assert "| learned | 0.5 | shared (= paper) | 1,2 |" in report
    assert "**Shared placement:**" in report and "of a ceiling of 100.0" in report


def test_the_pair_pruning_benchmark_reports_what_evaluate_does_and_needs_hard_negatives(
    tmp_path: Path, capsys
) -> None:
    from benchmarks import pair_pruning
    from training.evaluate import evaluate

    data, ckpt = _tiny_checkpoints(tmp_path, num_images=240)  # 30 test images
    shutil.rmtree(ckpt / "baseline")  # one image tower for both checkpoints (no finetune phase): keep 1 is none
    shutil.copytree(ckpt / "pruned", ckpt / "baseline")
    result = pair_pruning.main(["--checkpoints", str(ckpt), "--data", str(data), "--keep-ratios", "1", "0.2"])
    m = evaluate(ckpt, tmp_path / "eval", data, methods=["text_guided"], keep_ratios=[1.0, 0.2],
                 placements=["paper"], latency=False, progress=False, threads=1)  # fmt: skip
    reported = {r["keep_ratio"]: r["pair_acc"] for r in m["rows"] if r["method"] == "text_guided"}
    assert result["unpruned"] == pytest.approx(m["rows"][0]["pair_acc"])  # the baseline's
    for row in result["rows"]:
        assert row["own"] == pytest.approx(reported[row["keep"]])  # the figure training.evaluate reports
        # The two scores differ by the pairs right one way only.
        assert (row["same"] - row["own"]) * result["images"] / 100 == pytest.approx(row["only_same"] - row["only_own"])
    at_one, pruned = result["rows"]
    assert at_one["own"] == at_one["same"] and at_one["only_own"] == at_one["only_same"] == 0  # nothing pruned
    assert pruned["own"] != pruned["same"]  # on these 30 pairs the two ways differ, so the columns are told apart
    real = tmp_path / "real"
    shutil.copytree(data, real)
    (real / "objects.json").unlink()
    with pytest.raises(SystemExit) as e:
        pair_pruning.main(["--checkpoints", str(ckpt), "--data", str(real)])
    assert e.value.code == 2 and "no objects.json" in capsys.readouterr().err


def test_real_data_without_ground_truth(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """Without objects.json (the real Flickr8k) pair accuracy and object recall are null, not made up."""
    from training.evaluate import evaluate

    data, ckpt = tiny
    real = tmp_path / "real"
    shutil.copytree(data, real)
    (real / "objects.json").unlink()
    m = evaluate(ckpt, tmp_path / "eval", real, methods=["text_guided", "random"], keep_ratios=[0.5],
                 placements=["paper"], latency=False, progress=False, threads=1)  # fmt: skip
    assert m["dataset"]["synthetic"] is False and m["dataset"]["root"] == str(real)
    assert [(r["method"], r["keep_ratio"]) for r in m["rows"]] == [("none", 1.0), ("text_guided", 0.5), ("random", 0.5)]
    assert m["oracle"] is None  # no ground truth, no ceiling
    for r in m["rows"]:
        assert r["pair_acc"] is None and r["object_recall"] is None and r["latency_ms_bs32"] is None
    guided = m["rows"][1]
    assert guided["mean_r1"] is None and guided["gmacs_ratio"] < 1 and guided["tokens"] == [16, 12, 9]
    assert (tmp_path / "eval" / "tradeoff.png").stat().st_size > 1000


def test_bad_inputs_get_clear_errors(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from training.evaluate import evaluate, main

    _, ckpt = tiny
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        evaluate(tmp_path / "nowhere", tmp_path / "eval")
    with pytest.raises(ValueError, match="Keep ratios"):
        evaluate(ckpt, tmp_path / "eval", keep_ratios=[0.0])
    with pytest.raises(ValueError, match="is not a folder"):
        evaluate(ckpt, tmp_path / "eval", tmp_path / "missing")
    with pytest.raises(SystemExit):
        main(["--checkpoints", str(tmp_path / "nowhere"), "--out", str(tmp_path / "eval")])


def test_the_recorded_dataset_is_found_old_style_and_new(tmp_path: Path) -> None:
    from training.evaluate import resolve_data

    ckpt, data = tmp_path / "project" / "checkpoints", tmp_path / "project" / ".cache" / "synth"
    data.mkdir(parents=True)
    ckpt.mkdir()
    assert resolve_data(None, "../.cache/synth", ckpt).resolve() == data.resolve()  # new: relative to checkpoints
    assert resolve_data(None, str(data), ckpt) == data  # old: absolute
    assert resolve_data(None, ".cache/synth", ckpt).resolve() == data.resolve()  # old: relative to the run's folder
    with pytest.raises(ValueError, match="pass --data"):
        resolve_data(None, "synth", ckpt)  # only the name, and not beside the checkpoints
