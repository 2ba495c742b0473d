"""training.report: the pages' figures agree with the shipped files, and the generator is right by hand."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from training import report

ROOT = Path(__file__).resolve().parents[1]


def test_readme_docs_and_cards_agree_with_the_shipped_metrics():
    stale = report.stale(ROOT)
    assert not stale, f"{', '.join(stale)} disagree with checkpoints/; run python -m training.report"


# ----------------------------------------------------------------------------- a hand-made run


def _row(method: str, keep: float, r1: float | None, pair: float, obj: float, bs32: float) -> dict:
    base_r1 = 40.0
    return {
        "method": method, "keep_ratio": keep, "checkpoint": "pruned" if method == "learned" else "baseline",
        "tokens": [4, 3, 2], "gmacs": 0.5 * keep + 0.1, "gmacs_ratio": (0.5 * keep + 0.1) / 0.6,
        "mean_r1": r1, "mean_r5": None if r1 is None else r1 + 10, "mean_r10": None if r1 is None else r1 + 20,
        "pair_acc": pair, "object_recall": obj, "object_recall_random": keep,
        "lossyness": None if r1 is None else 1 - r1 / base_r1,
        "latency_ms_bs1": 2.0, "latency_ratio_bs1": 0.9, "latency_ms_bs32": bs32, "latency_ratio_bs32": bs32 / 60.0,
    }  # fmt: skip


@pytest.fixture
def src() -> report.Sources:
    rows = [_row("none", 1.0, 40.0, 80.0, 1.0, 60.0)]
    for keep in (0.5, 0.3, 0.1):
        rows += [
            _row("learned", keep, 39.0 - (0.3 - keep), 79.0, 0.9, 30.0),
            _row("tome", keep, 35.0, 78.0, 0.5, 33.0),
            _row("cls_attention", keep, 10.0, 60.0, 0.6, 31.0),
            _row("text_guided", keep, None, 75.0, 0.2, 32.0),
            _row("random", keep, 20.0, 70.0, keep, 29.0),
        ]
    metrics = {
        "dataset": {"images": 200, "captions": 1000, "synthetic": True},
        "machine": {"processor": "x86_64", "cpu_count": 4, "torch": "2.13.0+cpu", "torch_threads": 4},
        "model": {"params": 1234, "params_image_encoder": 1000, "params_text_encoder": 234},
        "rows": rows,
        "seconds": 60.0,
    }
    config = {
        "embed_dim": 16, "init_logit_scale": 2.6592,
        "pruning": {"placement": "paper", "predictor_hidden": 8, "stages": [1, 3]},
        "text": {"context_length": 8, "depth": 1, "heads": 2, "mlp_ratio": 4.0, "vocab_size": 20, "width": 16},
        "vision": {"depth": 4, "heads": 2, "image_size": 32, "mlp_ratio": 4.0, "patch_size": 8, "width": 16},
    }  # fmt: skip
    facts = {"preset": "tiny", "seed": 0, "world_size": 1, "data": ".cache/x"}
    training = {
        "baseline": {"phase": "baseline", "epochs": 2, "losses": [2.0, 1.0], "epoch_seconds": [300.0, 120.0], **facts},
        "pruned": {"phase": "pruned", "epochs": 1, "losses": [3.0], "epoch_seconds": [60.0],
                   "keep_ratio_range": [0.1, 1.0], **facts},
    }  # fmt: skip
    return report.Sources(metrics, training, {"baseline": config, "pruned": config})


def test_results_table_has_the_baseline_then_every_method_at_the_headline_keeps(src):
    lines = report.results(src).splitlines()
    assert lines[0].startswith("Test split: 200 synthetic images × 1,000 captions.") and "4 CPUs" in lines[0]
    assert "not recorded in this file" in lines[0]  # a file from before the placement key
    assert "R@1 ceiling of the test split (oracle):** not measured in this file" in lines[2]
    nominal = lines[lines.index(next(x for x in lines if x.startswith("**At nominal keep ratios**"))):]
    body = [line for line in nominal if line.startswith("| ") and not line.startswith("| method")]
    assert len(body) == 1 + 5 * 3
    assert body[0] == "| none | 1 | 4/3/2 | 0.6000 | 1.00 | 40.0 | 80.0 | 1.00 (1.00) | 0.000 | 2.0 | 60.0 | 1.00 |"
    guided = next(line for line in body if line.startswith("| text_guided | 0.3 |"))
    assert guided.split(" | ")[5] == "–" and guided.split(" | ")[8] == "–"  # no recall, no lossy-ness


def test_results_compare_at_matched_gmacs_before_the_nominal_table(src):
    text = report.results(src)
    assert text.index("**At matched GMACs.**") < text.index("**At nominal keep ratios**")
    assert "DynamicViT and EViT state a per-stage keep rate ρ" in text
    # GMACs ratios 0.58 (keep 0.5) and 0.42 (keep 0.3) bracket 0.5 halfway: learned's R@1 39.2 and 39.0 -> 39.1.
    learned = "| 0.50 | learned | keep 0.5: 0.58 and keep 0.3: 0.42, interpolated | 39.1 | 79.0 | 0.90 | 0.50 / 0.90 |"
    assert learned in text
    assert "| 0.65 | tome | not reached by the measured keep ratios |" in text  # no row above 0.58


def test_findings_compute_every_figure_and_comparison(src):
    text = report.findings(src)
    assert "mean R@1 40.0% over 200 test images (chance is 0.5%), pair accuracy 80.0%" in text
    assert "at 0.50× the baseline's GMACs** (interpolated between keep ratios 0.5 and 0.3)" in text
    assert "mean R@1 39.1 (0.9 points below the baseline), 19.1 points above `random`" in text
    assert "keeps 90% of the object patches, against 40% for `random`" in text
    assert "The best training-free method at 0.50× the baseline's GMACs is `tome`:** mean R@1 35.0" in text
    assert "`cls_attention` 10.0 mean R@1" in text  # below random's 20.0 mean R@1
    assert "`text_guided`" not in text.split("Below")[1].split("\n")[0]  # 75.0 pair acc beats random's 70.0
    assert "`learned` 0.50 / 0.90" in text
    assert "**`learned` (trained predictors), at 0.50×" in text  # no finetune record: the baseline's tower
    src.training["pruned"]["finetune"] = {"steps": 40}
    assert "**`learned` (trained predictors, fine-tuned image tower), at 0.50×" in report.findings(src)


def test_findings_say_level_or_above_where_a_method_does_not_lose(src):
    assert report._below(0.04) == report._below(-0.04) == "level with the baseline, to 0.1 point"
    assert report._below(-0.3) == "0.3 points above the baseline"
    assert report._below(0.9) == "0.9 points below the baseline"


def test_findings_put_the_baseline_against_the_ceiling(src):
    src.metrics["oracle"] = {"r1_i2t": 80.0, "r1_t2i": 80.0, "mean_r1": 80.0}
    assert "(chance is 0.5%, 50% of the test split's R@1 ceiling (80.0))" in report.findings(src)
    assert "baseline mean R@1 40.0 of a ceiling of 80.0 (50%)" in report.results(src)


def test_findings_say_what_the_baseline_tells_apart(src):
    assert "tells apart" not in report.findings(src)  # an older metrics.json has no pair_by_kind
    src.metrics["pair_by_kind"] = {"change_color": {"images": 3, "pair_acc": 100.0},
                                   "swap_position": {"images": 4, "pair_acc": 50.0}}  # fmt: skip
    assert "hard negative changed (50 is chance): change color 100, swap position 50." in report.findings(src)


def test_training_time_sums_the_recorded_epochs(src):
    text = report.training_time(src)
    assert "baseline 2 epochs in 7.0 min (300, 120 s)" in text and "pruned 1 epoch in 1.0 min (60 s)" in text
    assert "evaluation 60 s; 9.0 min in all" in text and "Dataset generation is not timed" in text
    src.training["pruned"]["finetune"] = {"steps": 40, "batch_size": 8, "lr": 1e-4, "keep_ratio_range": [0.1, 1.0],
                                          "precision": "bf16", "losses": [0.0123], "seconds": 30.0}  # fmt: skip
    text = report.training_time(src)
    assert "pruned 1 epoch in 1.0 min (60 s); fine-tune 40 steps in 0.5 min; evaluation 60 s; 9.5 min in all" in text
    build = {"phases": ["baseline", "pruned", "finetune", "evaluate"], "seconds": 690.0, "threads": 2,
             "cpu_count": 2, "resumed": False,
             "parts": {"data": 120.0, "baseline": 420.0, "pruned": 60.0, "finetune": 30.0, "evaluate": 60.0}}
    text = report.training_time(dataclasses.replace(src, build=build))
    assert "took **11.5 min** end to end on 2 threads of 2 cores (data 2.0 min, baseline 7.0 min" in text
    assert "Dataset generation is not timed" not in text
    for partial in ({**build, "resumed": True}, {**build, "phases": ["baseline", "pruned", "evaluate"]}):
        assert "end to end" not in report.training_time(dataclasses.replace(src, build=partial))


def test_cards_describe_their_own_checkpoint(src):
    assert "trained in this checkpoint" in report.card_model(src, "pruned")
    assert "left untrained here" in report.card_model(src, "baseline")
    assert "32 px images, 8 px patches (4 × 4 = 16 patch tokens)" in report.card_model(src, "baseline")
    assert "stem" not in report.card_model(src, "baseline")  # the tiny preset has none
    src.configs["baseline"]["vision"]["stem"] = [4, 8]
    assert "a convolutional stem (2 3 × 3 stride-2 convolutions of 4, 8 channels" in report.card_model(src, "baseline")
    assert "CLIP's initialisation" not in report.card_model(src, "baseline")  # the tiny preset's is trunc_normal
    src.configs["baseline"]["text"]["init"] = "clip"
    assert "trained from OpenAI CLIP's initialisation of its text tower." in report.card_model(src, "baseline")
    pruned = report.card_metrics(src, "pruned")
    assert "| learned | 0.3 |" in pruned and "| tome |" not in pruned
    assert "| tome | 0.3 |" in report.card_metrics(src, "baseline")
    assert "drawn from [0.1, 1]" in report.card_training(src, "pruned")
    assert "fine-tuned" not in report.card_training(src, "pruned")
    src.training["pruned"]["finetune"] = {"steps": 40, "batch_size": 8, "lr": 1e-4, "keep_ratio_range": [0.2, 0.7],
                                          "precision": "bf16", "losses": [0.0123], "seconds": 30.0}  # fmt: skip
    assert ("fine-tuned** under `learned`'s pruning, after the epochs above (`training.train`'s finetune phase): 40 "
            "steps of 8 images at keep ratios drawn from [0.2, 0.7], peak learning rate 0.0001, 0.5 min; distillation "
            "loss to the baseline's embedding 0.0123") in report.card_training(src, "pruned")  # fmt: skip
    assert "layout" not in report.card_training(src, "baseline")
    src.training["baseline"].update(phase="baseline", hard_negatives=2)  # a training.json from before the pair loss
    assert "2 captions per image and step" in report.card_training(src, "baseline")
    assert "(no pair loss: `TrainConfig.hard_negative_weight` 0)." in report.card_training(src, "baseline")
    src.training["baseline"]["hard_negative_weight"] = 1.0
    assert "(`training.losses.pair_loss`), weight 1, in the loss above." in report.card_training(src, "baseline")
    src.training["baseline"].update(layout_losses=[1.5, 0.25], layout_weight=1.0)
    assert "(`training/layout.py`, weight 1; not in the loss above) per epoch: 1.500, 0.250." in report.card_training(
        src, "baseline")  # fmt: skip


def test_fill_rewrites_only_inside_the_markers(src):
    text = "intro 1.0\n<!-- training-time:begin -->\nold 9 epochs\n<!-- training-time:end -->\noutro 2.0\n"
    new = report.fill(text, "docs/training.md", src)
    assert new.startswith("intro 1.0\n<!-- training-time:begin -->\nTraining time,")
    assert new.endswith("<!-- training-time:end -->\noutro 2.0\n") and "old 9 epochs" not in new
    assert report.fill(new, "docs/training.md", src) == new
    with pytest.raises(ValueError, match="has no <!-- training-time:begin -->"):
        report.fill("no markers\n", "docs/training.md", src)
    with pytest.raises(ValueError, match="unknown generated block 'results'"):
        report.fill(text + "<!-- results:begin -->\n<!-- results:end -->\n", "docs/training.md", src)


def test_check_names_the_stale_file_in_one_line(tmp_path, capsys):
    for rel in [*report.TARGETS, "checkpoints/metrics.json", "checkpoints/training.json",
                *(f"checkpoints/{c}/{f}" for c in (*report.CHECKPOINTS, *report.OPTIONAL)
                  for f in ("training.json", "config.json", "model.safetensors"))]:  # a card counts its weights
        if (ROOT / rel).exists():  # checkpoints/training.json: only when one run made the shipped files
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, tmp_path / rel)
    assert report.main(["--check", "--root", str(tmp_path)]) == 0
    training = tmp_path / "checkpoints/baseline/training.json"
    facts = json.loads(training.read_text())
    facts["epoch_seconds"][0] /= 10  # one figure the README quotes
    training.write_text(json.dumps(facts, indent=2))
    capsys.readouterr()
    assert report.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: README.md, docs/results.md, docs/training.md, checkpoints/baseline/README.md ")
    assert len(err.splitlines()) == 1 and "pruned/README.md" not in err
    assert report.main(["--root", str(tmp_path)]) == 0 and report.stale(tmp_path) == []


def test_a_cards_parameters_are_counted_from_its_own_weights(tmp_path):
    from vlm_demo.config import get_preset
    from vlm_demo.model import DualEncoder, save_checkpoint
    from vlm_demo.tokenizer import Tokenizer

    tok = Tokenizer.build(["a red circle"], 16)
    cfg = get_preset("tiny").model
    model = DualEncoder(cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tok))))
    save_checkpoint(model, tok, tmp_path)
    counts = report._count_params(tmp_path / "model.safetensors")
    assert counts == {
        "params": sum(p.numel() for p in model.parameters()),
        "params_image_encoder": sum(p.numel() for p in model.visual.parameters()),
        "params_text_encoder": sum(p.numel() for p in model.text.parameters()),
    }


def test_an_optional_checkpoint_is_reported_only_where_it_is(tmp_path):
    for rel in ["checkpoints/metrics.json", *(f"checkpoints/{c}/{f}" for c in report.CHECKPOINTS
                                             for f in ("training.json", "config.json"))]:  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    without = report.load_sources(tmp_path / "checkpoints")
    assert "dynamicvit" not in without.training
    assert "checkpoints/dynamicvit/README.md" not in report._targets(without)
    assert "DynamicViT's checkpoint" not in report.training_time(without)
    shipped = report.load_sources(ROOT / "checkpoints")
    assert "checkpoints/dynamicvit/README.md" in report._targets(shipped)
    said = report.training_time(shipped)
    assert "DynamicViT's checkpoint (`python -m training.dynamicvit`, outside the build)" in said
    assert "rho 0.7" in report.card_training(shipped, "dynamicvit")
