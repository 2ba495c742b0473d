"""Training on the tiny preset: the loss falls, SIGKILL + --resume is bit-exact, DDP runs on gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from training import train
from training.synthetic import generate
from vlm_demo.config import get_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "synth", num_images=64, seed=0, size=32, progress=False)


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--preset", "tiny", "--data", str(data), "--out", str(out), "--phases", "baseline,pruned,finetune",
        "--threads", "1", "--quiet", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_tiny_training_lowers_the_loss(data, tmp_path):
    summary = train.main(_cmd(data, tmp_path / "ck", "--baseline-epochs", "6", "--pruned-epochs", "2"))
    losses = summary["baseline"]["losses"]
    assert losses[-1] < losses[0] - 0.05, losses
    for name in ("baseline", "pruned"):
        folder = tmp_path / "ck" / name
        assert {"config.json", "model.safetensors", "vocab.json", "training.json"} <= {p.name for p in folder.iterdir()}
    facts = json.loads((tmp_path / "ck" / "pruned" / "training.json").read_text())
    assert facts["phase"] == "pruned" and facts["seconds_per_epoch"] > 0
    # text_guided's caption-conditioned predictors train in the same steps, with their own learning rate.
    assert len(facts["query_losses"]) == 2 and facts["query_lr"] > 0
    assert facts["finetune"]["steps"] == 2  # the tiny preset's finetune_steps
    pruned = _weights(tmp_path / "ck" / "pruned")
    assert any(name.startswith("visual.query_predictors.") for name in pruned)
    assert facts["data"] == data.name  # the data lies outside the output's parent: its name, no absolute path
    assert (tmp_path / "ck" / "caption_bank.json").is_file()
    assert not (tmp_path / "ck" / ".resume").exists()  # the resume state goes once the run has succeeded
    build = json.loads((tmp_path / "ck" / "training.json").read_text())  # the run's wall time, end to end
    assert build["phases"] == ["baseline", "pruned", "finetune"]
    assert set(build["parts"]) == {"data", "baseline", "pruned", "finetune"}
    assert build["seconds"] >= sum(build["parts"].values()) - 0.2 and build["parts"]["baseline"] > 0


def test_bf16_autocast_trains_the_baseline_and_is_recorded(data, tmp_path):
    summary = train.main(_cmd(data, tmp_path / "ck", "--phases", "baseline", "--baseline-epochs", "3",
                              "--precision", "bf16"))  # fmt: skip
    losses = summary["baseline"]["losses"]
    assert all(x == x for x in losses) and losses[-1] < losses[0], losses  # finite, and falling
    facts = json.loads((tmp_path / "ck" / "baseline" / "training.json").read_text())
    assert facts["precision"] == "bf16" and facts["layout_weight"] > 0 and len(facts["layout_losses"]) == 3
    assert json.loads((tmp_path / "ck" / "training.json").read_text())["precision"] == "bf16"
    assert facts["hard_negatives"] == 2 and facts["hard_negative_mix"] is None  # the preset's: equal odds
    assert facts["hard_negative_weight"] == 0.0 and facts["lr"] == get_preset("tiny").train.lr
    weights = _weights(tmp_path / "ck" / "baseline")
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}  # autocast leaves the weights float32


def test_the_hard_negative_weight_adds_the_pair_loss_to_the_baselines(data, tmp_path):
    def first_loss(*extra: str) -> float:
        out = tmp_path / f"ck{len(extra)}"
        summary = train.main(_cmd(data, out, "--phases", "baseline", "--baseline-epochs", "1", *extra))
        return summary["baseline"]["losses"][0]

    # Same start, same batches: the pair term (about log 3 at the start, 2 negatives) is added on top.
    assert first_loss("--hard-negative-weight", "1") > first_loss() + 0.1


def test_the_pruned_phase_on_other_data_keeps_the_baselines_tokenizer(data, tmp_path, monkeypatch):
    # Another dataset orders its vocabulary differently; the baseline's text tower knows only its own ids.
    other = generate(tmp_path / "other", num_images=40, seed=3, size=32, progress=False)
    out = tmp_path / "ck"
    train.main(_cmd(data, out, "--phases", "baseline", "--baseline-epochs", "1"))
    used = []  # the tokenizer each phase encodes its captions with
    run_phase = train.run_phase
    monkeypatch.setattr(train, "run_phase", lambda *a, **k: used.append(a[4]) or run_phase(*a, **k))
    train.main(_cmd(other, out, "--phases", "pruned", "--pruned-epochs", "1"))
    vocab = json.loads((out / "baseline" / "vocab.json").read_text())
    own = train.Tokenizer.build(c for caps in train.load_splits(other)["train"].captions for c in caps)
    assert own.itos != vocab["itos"]  # what the phase used to pair with the baseline's text tower
    assert [t.itos for t in used] == [vocab["itos"]]
    assert json.loads((out / "pruned" / "vocab.json").read_text()) == vocab


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def _same(a: dict, b: dict, names) -> bool:
    return all((a[n] == b[n]).all() for n in names)


def test_each_phase_trains_its_own_parameters():
    assert train._trains("baseline", "text.token_embed.weight") and train._trains("baseline", "visual.proj.weight")
    assert not train._trains("baseline", "visual.predictors.0.head.0.weight")
    assert train._trains("pruned", "visual.predictors.0.head.0.weight")
    assert train._trains("pruned", "visual.query_predictors.1.match.0.weight")
    assert not train._trains("pruned", "visual.proj.weight") and not train._trains("pruned", "logit_scale")
    assert train._trains("finetune", "visual.proj.weight") and train._trains("finetune", "visual.blocks.0.attn.qkv.weight")
    for frozen in ("visual.predictors.0.head.0.weight", "visual.query_predictors.0.query.0.weight",
                   "text.token_embed.weight", "logit_scale"):  # fmt: skip
        assert not train._trains("finetune", frozen), frozen


def test_the_finetune_phase_trains_the_image_tower_alone_from_the_baselines(data, tmp_path, caplog):
    out = tmp_path / "ck"
    train.main(_cmd(data, out, "--phases", "baseline,pruned", "--baseline-epochs", "2"))
    base, pruned = _weights(out / "baseline"), _weights(out / "pruned")
    before = json.loads((out / "pruned" / "training.json").read_text())
    summary = train.main(_cmd(data, out, "--phases", "finetune", "--finetune-steps", "3"))
    tuned = _weights(out / "pruned")
    assert tuned.keys() == pruned.keys()
    tower = [n for n in tuned if n.startswith("visual.") and not n.startswith(train.PREDICTOR_PREFIXES)]
    frozen = [n for n in tuned if n not in tower]  # the text tower, the logit scale, both kinds of keep predictors
    assert any(n.startswith("text.") for n in frozen) and any(n.startswith(train.QUERY) for n in frozen)
    assert _same(tuned, pruned, frozen)
    changed = [n for n in tower if not (tuned[n] == base[n]).all()]
    assert "visual.proj.weight" in changed and any(".attn." in n for n in changed), changed
    assert _same(pruned, base, tower)  # the pruned phase leaves the baseline's tower as it was
    facts = json.loads((out / "pruned" / "training.json").read_text())
    assert {k: v for k, v in facts.items() if k != "finetune"} == before  # the pruned phase's run stays on record
    ft = facts["finetune"]
    assert ft["steps"] == 3 and len(ft["losses"]) == 1 and ft["losses"] == summary["finetune"]["losses"]
    assert ft["lr"] > 0 and ft["keep_ratio_range"] == [0.1, 1.0] and ft["seconds"] > 0
    # It starts from the baseline's tower, not from pruned/'s: run again, the same weights.
    train.main(_cmd(data, out, "--phases", "finetune", "--finetune-steps", "3"))
    again = _weights(out / "pruned")
    assert _same(again, tuned, tuned)
    # More steps than an epoch has: one epoch (48 training images in batches of 16).
    train.main(_cmd(data, out, "--phases", "finetune", "--finetune-steps", "1000"))
    assert json.loads((out / "pruned" / "training.json").read_text())["finetune"]["steps"] == 3
    # No steps: pruned/ gets the baseline's tower back, and no record of a fine-tune.
    train.main(_cmd(data, out, "--phases", "finetune", "--finetune-steps", "0"))
    assert _same(_weights(out / "pruned"), pruned, pruned)
    assert json.loads((out / "pruned" / "training.json").read_text()) == before
    # The pruned phase alone writes the baseline's tower, and says how to fine-tune it.
    train.main(_cmd(data, out, "--phases", "finetune"))
    with caplog.at_level("WARNING", logger="training.train"):
        train.main(_cmd(data, out, "--phases", "pruned"))
    assert "--phases pruned,finetune" in caplog.text
    assert _same(_weights(out / "pruned"), pruned, pruned)


def test_resume_after_sigkill_matches_an_uninterrupted_run(data, tmp_path):
    extra = ("--baseline-epochs", "5", "--pruned-epochs", "2", "--finetune-steps", "3")
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-m", "training.train", *_cmd(data, whole, *extra)], check=True, env=_env(),
                   cwd=ROOT, capture_output=True, timeout=300)  # fmt: skip

    broken = tmp_path / "broken"
    proc = subprocess.Popen([sys.executable, "-m", "training.train", *_cmd(data, broken, *extra)], env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    state = broken / ".resume" / "baseline" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (broken / "pruned").exists()

    subprocess.run([sys.executable, "-m", "training.train", *_cmd(data, broken, *extra, "--resume")], check=True,
                   env=_env(), cwd=ROOT, capture_output=True, timeout=300)  # fmt: skip
    for name in ("baseline", "pruned"):
        a, b = _weights(whole / name), _weights(broken / name)
        assert a.keys() == b.keys()
        assert all((a[k] == b[k]).all() for k in a), name
        fa = json.loads((whole / name / "training.json").read_text())
        fb = json.loads((broken / name / "training.json").read_text())
        assert fa["losses"] == fb["losses"]
        assert fa.get("finetune", {}).get("losses") == fb.get("finetune", {}).get("losses")
    assert "finetune" in fa  # pruned/ is the fine-tuned one
    leftovers = [p.name for p in broken.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no half-written checkpoint folders, and no resume state after the run


def test_recorded_data_is_never_absolute(tmp_path):
    out = tmp_path / "project" / "checkpoints"
    assert train.recorded_data(tmp_path / "project" / ".cache" / "synth", out) == "../.cache/synth"
    assert train.recorded_data(out / "data", out) == "data"
    assert train.recorded_data(tmp_path / "elsewhere" / "flickr8k", out) == "flickr8k"


def test_a_bad_data_root_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "ck"
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "flickr8k", "--data-root", str(empty), "--out", str(out), "--preset", "tiny"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("python -m training.train: error: No dataset")
    assert not out.exists()


def test_two_process_ddp_on_gloo(data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training.train",
           *_cmd(data, out, "--baseline-epochs", "1", "--pruned-epochs", "1")]  # fmt: skip
    res = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    facts = json.loads((out / "pruned" / "training.json").read_text())
    assert facts["world_size"] == 2 and facts["finetune"]["steps"] > 0
    assert _weights(out / "baseline").keys() == _weights(out / "pruned").keys()
    # The run passed Dist.check_replicas after every epoch of every phase: both processes held the same weights.


_REPLICAS = """
import sys, torch
import torch.distributed as dist
from training.train import init_distributed
dd = init_distributed("cpu")
torch.manual_seed(dd.rank if sys.argv[1] == "differ" else 0)
try:
    dd.check_replicas(torch.nn.Linear(3, 2), "the test's layer")
    print("agree")
finally:
    dist.destroy_process_group()  # gloo aborts at exit without it
"""


@pytest.mark.parametrize("case", ["agree", "differ"])
def test_check_replicas_stops_a_run_whose_processes_diverged(tmp_path, case):
    script = tmp_path / "replicas.py"
    script.write_text(_REPLICAS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), case]
    res = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    if case == "agree":
        assert res.returncode == 0 and res.stdout.count("agree") == 2, res.stderr[-3000:]
    else:
        assert res.returncode != 0 and "the test's layer: the copies of ranks [1] differ from rank 0's" in res.stderr
