"""`python -m vlm_demo.bench --config`: any CLIP shape, built with random weights, counted per tower and timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMALL_CLIP

from vlm_demo import bench, flops, hf_clip
from vlm_demo.latency import Timing


def _fake_interleaved(variants, protocol):
    assert set(variants) == {"base", "pruned"}
    return {"base": Timing(10.0, 0.1, protocol.repeats), "pruned": Timing(5.0, 0.1, protocol.repeats)}


def _errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


def test_a_config_json_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SMALL_CLIP))
    argv = ["--config", str(path), "--batches", "1", "2", "--latency-repeats", "1", "--latency-budget", "0.1"]
    assert bench.main(argv) == 0  # real timing, one round: no batch-32 row, so nothing to miss
    out, err = capsys.readouterr()
    assert f"config={path} (random weights)" in out and "placement=paper" in out
    assert "GMACs per tower" in out and "(one caption, 16 tokens)" in out and "published" not in out
    table = [line.split() for line in out.splitlines() if line.split()[0] in bench.DEFAULT_METHODS]
    assert [(row[0], row[2]) for row in table] == [(m, b) for m in bench.DEFAULT_METHODS for b in ("1", "2")]
    assert "[bench] tome batch 2: timing" in err  # progress on stderr
    # The folder holding the config.json works as well; --quiet silences the progress.
    assert bench.main(["--config", str(tmp_path), "--methods", "tome", "--batches", "1", "--latency-repeats", "1",
                       "--quiet"]) == 0  # fmt: skip
    assert "[bench]" not in capsys.readouterr().err


def test_a_named_shape_prints_its_published_figures(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(bench, "interleaved", _fake_interleaved)
    assert bench.main(["--config", "tinyclip-8m-16", "--methods", "tome", "--batches", "1", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wkcn/TinyCLIP-ViT-8M-16-Text-3M-YFCC15M shape, random weights" in out
    assert "(one caption, 77 tokens)" in out and "published image+text 2.000 GMACs" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("tome")]
    assert [r[2] for r in rows] == ["1", "32"]
    assert float(rows[1][4]) == pytest.approx(32 * float(rows[0][4]), rel=1e-3)  # GMACs base scale with the batch
    assert rows[0][3].startswith("197/")  # 14 x 14 patches and the CLS token enter block 0


@pytest.mark.parametrize("name", hf_clip.CLIP_SHAPES)
def test_the_named_shapes_match_their_published_costs(name: str) -> None:
    cfg, shape = bench.resolve_config(name)
    assert shape is hf_clip.CLIP_SHAPES[name] and shape.published
    closed = {"image": flops.closed_form_gmacs(cfg), "text": flops.closed_form_text_gmacs(cfg)}
    closed["image+text"] = closed["image"] + closed["text"]
    for p in shape.published:
        assert closed[p.towers] == pytest.approx(p.gmacs, rel=0.02), (name, p)


def test_a_config_json_of_a_named_shape_gets_its_figures(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf_clip.CLIP_SHAPES["vit-b-16"].config))
    assert bench.resolve_config(str(path))[1] is hf_clip.CLIP_SHAPES["vit-b-16"]
    assert bench.resolve_config("tiny")[1] is None


def test_placement_moves_the_stages_and_skips_a_default_method_that_cannot_follow(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "interleaved", _fake_interleaved)
    assert bench.main(["--config", "tiny", "--placement", "2", "--batches", "1"]) == 0
    out, err = capsys.readouterr()
    assert "placement=2" in out and "skipping learned" in err  # its predictors sit where they were trained
    tokens = {line.split()[0]: line.split()[3] for line in out.splitlines() if line.startswith(("cls", "tome"))}
    assert set(tokens) == {"cls_attention", "tome"}
    assert all(t.split("/")[:3] == ["17", "17", "17"] for t in tokens.values())  # blocks 0-2 see every token


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "missing/config.json"],
        ["--config", "not_a_preset"],
        ["--config", "{tmp}/bad.json"],
        ["--config", "{tmp}/other.json"],
        ["--config", "tiny", "--methods", "cls_attention", "--placement", "0,9"],
        ["--config", "tiny", "--checkpoints", "{tmp}"],
        ["--config", "tiny", "--placement", "first"],
    ],
)
def test_a_bad_config_is_one_error_line_and_exit_2(argv: list[str], tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SystemExit) as e:
        bench.main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("python -m vlm_demo.bench: error: "), errors
