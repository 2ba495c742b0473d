"""The command lines' edges: help shows every option's default, a user's mistake is one error line
and exit code 2 (never a traceback), and the benchmark's exit code says whether it met its target."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from training import evaluate, synthetic, train
from vlm_demo import bench
from vlm_demo.config import get_preset
from vlm_demo.latency import Timing

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "training.train": train._parser,
    "training.evaluate": evaluate._parser,
    "training.synthetic": synthetic._parser,
    "vlm_demo.bench": bench._parser,
}
MAINS = {"training.train": train.main, "training.evaluate": evaluate.main, "training.synthetic": synthetic.main,
         "vlm_demo.bench": bench.main}  # fmt: skip


def _help_entries(text: str) -> dict[str, str]:
    """Option string -> its help text, from ``--help`` output."""
    body = text.split("options:", 1)[1]
    entries = {}
    for block in re.split(r"\n  (?=-)", "\n" + body.strip("\n")):
        block = " ".join(block.split())
        if block:
            names = re.findall(r"(?:^|, )(--?[\w-]+)", block)
            for name in names:
                entries[name] = block
    return entries


def _stderr_errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


@pytest.mark.parametrize("name", PARSERS)
def test_help_lists_every_option_with_its_default(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        MAINS[name](["--help"])
    assert e.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    visible = [a for a in PARSERS[name]()._actions if a.help != argparse.SUPPRESS and a.dest != "help"]
    assert visible
    for action in visible:
        for option in action.option_strings:
            assert option in entries, f"{name}: {option} is not in --help"
            text = entries[option]
            assert "default" in text or "(required)" in text, f"{name}: {option} does not show its default: {text}"


def test_renamed_options_keep_their_old_spelling_hidden() -> None:
    args = evaluate._parser().parse_args(["--out", "o", "--limit", "3", "--no-progress"])
    assert args.eval_limit == 3 and args.quiet
    assert evaluate._parser().parse_args(["--out", "o"]).eval_limit is None
    assert bench._parser().parse_args(["--repeats", "7"]).latency_repeats == 7
    # The same option has the same name everywhere.
    for parser in (train._parser(), evaluate._parser()):
        assert {"--eval-limit", "--quiet", "--threads", "--seed", "--out"} <= set(parser._option_string_actions)
    assert "--latency-repeats" in bench._parser()._option_string_actions
    assert "--quiet" in synthetic._parser()._option_string_actions


def test_the_hard_negative_mix_reaches_the_training_config() -> None:
    args = train.parse_args(["--hard-negative-mix", "2", "2", "1", "1"])
    assert train._schedule(args)[1].hard_negative_mix == (2.0, 2.0, 1.0, 1.0)
    assert train._schedule(train.parse_args([]))[1].hard_negative_mix is None  # the preset's: equal odds


def test_the_text_init_option_reaches_the_model_config(capsys) -> None:
    def init(*argv: str) -> str:
        return train._schedule(train.parse_args(list(argv)))[0].model.text.init

    assert init() == get_preset("default").model.text.init == "clip"
    assert init("--text-init", "trunc_normal") == "trunc_normal"
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--text-init", "xavier"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_the_stem_option_reaches_the_model_config(capsys) -> None:
    def stem(*argv: str) -> tuple[int, ...]:
        return train._schedule(train.parse_args(list(argv)))[0].model.vision.stem

    assert stem() == get_preset("default").model.vision.stem
    assert stem("--stem", "8", "16") == (8, 16)
    assert stem("--stem") == ()  # the plain patch embedding
    with pytest.raises(SystemExit):
        train.parse_args(["--stem", "0"])
    with pytest.raises(SystemExit):
        train.parse_args(["--stem", "8", "8", "8", "8"])  # four halvings do not fit an 8-pixel patch
    assert "patch_size (8) must divide by 2 ** 4" in capsys.readouterr().err


def test_the_learning_rate_reaches_the_training_config(capsys) -> None:
    assert train._schedule(train.parse_args(["--lr", "5e-4"]))[1].lr == 5e-4
    assert train._schedule(train.parse_args([]))[1].lr == get_preset("default").train.lr
    for bad in ("0", "-1e-3", "nan"):
        with pytest.raises(SystemExit):
            train.parse_args(["--lr", bad])


def test_the_hard_negative_weight_reaches_the_training_config(capsys) -> None:
    assert train._schedule(train.parse_args(["--hard-negative-weight", "1"]))[1].hard_negative_weight == 1.0
    assert train._schedule(train.parse_args([]))[1].hard_negative_weight == 0.0  # the preset's
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--hard-negative-weight", "-1"])
    assert e.value.code == 2 and "non-negative" in capsys.readouterr().err


def _bad_calls(tmp: Path) -> list[tuple[str, list[str]]]:
    missing, empty, a_file = tmp / "missing", tmp / "empty", tmp / "a_file"
    empty.mkdir()
    a_file.write_text("not a folder")
    out = ["--out", str(tmp / "out")]
    return [
        ("training.train", ["--data", str(missing), *out]),
        ("training.train", ["--dataset", "flickr8k", "--data-root", str(empty), *out]),
        ("training.train", ["--preset", "huge", *out]),
        ("training.train", ["--phases", "baseline,evaluat", *out]),
        ("training.train", ["--batch-size", "0", *out]),
        ("training.train", ["--finetune-steps", "-1", *out]),
        ("training.train", ["--hard-negative-mix", "0", "0", "0", "0", *out]),
        ("training.train", ["--hard-negative-mix", "1", "-1", "1", "1", *out]),
        ("training.train", ["--hard-negative-mix", "1e308", "1e308", "1", "1", *out]),
        ("training.evaluate", ["--checkpoints", str(missing), *out]),
        ("training.evaluate", ["--checkpoints", str(empty), "--keep-ratios", "0", *out]),
        ("training.evaluate", ["--methods", "magic", *out]),
        ("training.synthetic", ["--out", str(a_file / "data"), "--num-images", "2", "--quiet"]),
        ("training.synthetic", ["--out", str(tmp / "synth"), "--size", "8"]),
        ("vlm_demo.bench", ["--checkpoints", str(missing)]),
        ("vlm_demo.bench", ["--methods", "magic"]),
        ("vlm_demo.bench", ["--fraction", "2"]),
    ]


@pytest.mark.parametrize("case", range(17))
def test_a_user_mistake_is_one_error_line_and_exit_2(case: int, tmp_path: Path, capsys) -> None:
    name, argv = _bad_calls(tmp_path)[case]
    with pytest.raises(SystemExit) as e:
        MAINS[name](argv)
    assert e.value.code == 2, (name, argv)
    errors = _stderr_errors(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"python -m {name}: error: "), errors
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bench_exit_code_says_whether_the_target_was_met(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def fake(ratio: float):
        def interleaved(variants, protocol):
            assert set(variants) == {"base", "pruned"}
            return {"base": Timing(10.0, 0.1, protocol.repeats), "pruned": Timing(10.0 * ratio, 0.1, protocol.repeats)}

        return interleaved

    argv = ["--preset", "tiny", "--methods", "random", "--latency-repeats", "1", "--batches", "1", "32"]
    monkeypatch.setattr(bench, "interleaved", fake(1.0))  # no faster at about half the GMACs: a miss
    assert bench.main(argv) == 1
    assert "MISS" in capsys.readouterr().out
    monkeypatch.setattr(bench, "interleaved", fake(0.5))
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "0 miss(es)" in out
    monkeypatch.setattr(bench, "interleaved", fake(1.0))
    assert bench.main([*argv[:-1]]) == 0  # no batch-32 row: nothing to miss
