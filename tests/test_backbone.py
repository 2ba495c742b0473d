"""Keep predictors for any backbone: train them on a tiny random CLIP, load the add-on, evaluate it.

The add-on holds ``learned``'s predictors and ``text_guided``'s caption-conditioned ones.

The CLIP is conftest's `make_clip` (random weights, a centre crop and its own mean and
std); the data is the tiny synthetic set. The whole file runs in well under a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import make_clip
from training import evaluate, train
from training.synthetic import generate
from vlm_demo import addon, api, hf_clip
from vlm_demo.pruning import PruneSpec

VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=2)  # fmt: skip
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
CAPTION = "a small red circle at the top left"


@pytest.fixture(scope="module")
def work(tmp_path_factory, tokenizer_file) -> Path:
    """One folder with the CLIP (clip/), the data (synth/) and the trained add-on (addon/) side by side."""
    root = tmp_path_factory.mktemp("backbone")
    make_clip(root / "clip", tokenizer_file, VISION, TEXT, 16, legacy=False)
    generate(root / "synth", num_images=48, seed=0, size=36, progress=False)
    train.main(["--backbone", str(root / "clip"), "--data", str(root / "synth"), "--out", str(root / "addon"),
                "--preset", "tiny", "--pruned-epochs", "2", "--threads", "1", "--quiet"])  # fmt: skip
    return root


@pytest.fixture(scope="module")
def sessions(work) -> tuple[api.Session, api.Session]:
    """(the add-on's session, the plain CLIP's)."""
    return api.load(work / "addon"), api.load(work / "clip")


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))


def test_the_addon_holds_only_the_predictors_and_no_absolute_path(work):
    folder = work / "addon"
    assert sorted(p.name for p in folder.iterdir()) == sorted(addon.ADDON_FILES)  # no backbone copy, no resume state
    tensors = load_file(str(folder / addon.PREDICTORS_FILE))
    model = hf_clip.load_clip(work / "clip").model
    prefixes = ("visual.predictors.", "visual.query_predictors.")  # learned's and text_guided's, those only
    assert tensors.keys() == {n for n in model.state_dict() if n.startswith(prefixes)}
    assert any(n.startswith("visual.query_predictors.") for n in tensors)
    text = (folder / addon.ADDON_FILE).read_text()
    assert str(work) not in text and str(Path.home()) not in text
    config = json.loads(text)
    assert config["backbone"]["source"] == "../clip" and config["backbone"]["hub"] is False
    assert config["predictors"]["stages"] == [1, 2, 3] and config["predictors"]["width"] == 32
    assert config["predictors"]["query"] is True
    facts = config["training"]
    assert facts["epochs"] == 2 and facts["seconds"] > 0 and len(facts["losses"]) == 2
    assert len(facts["query_losses"]) == 2 and facts["query_lr"] > 0
    assert facts["data"] == "../synth"  # relative to the add-on, so that the pair can move together


def test_the_addon_loads_with_its_backbone_and_trained_predictors(work, sessions):
    trained, plain = sessions
    assert trained.has_predictors and not plain.has_predictors
    assert {"learned", "text_guided"} <= set(trained.methods())
    assert set(plain.methods()) == set(trained.methods()) - {"learned", "text_guided"}
    assert trained.preprocess == plain.preprocess and trained.preprocess.shortest_edge == 38  # the CLIP's crop
    # The towers stayed frozen: every tensor but the predictors is the CLIP's own.
    a, b = trained.baseline.state_dict(), plain.baseline.state_dict()
    towers = [n for n in a if not n.startswith(("visual.predictors.", "visual.query_predictors."))]
    assert all(torch.equal(a[n], b[n]) for n in towers)
    # Both kinds of predictors trained: they moved away from where training started (the seed's initialisation).
    torch.manual_seed(0)
    start = hf_clip.load_clip(work / "clip").model.state_dict()
    for prefix in ("visual.predictors.", "visual.query_predictors."):
        assert any(not torch.equal(a[n], start[n]) for n in a if n.startswith(prefix)), prefix
    # learned runs on the add-on's session, and prunes. (On a CLIP this narrow, its predictors cost more GMACs than
    # the pruning saves; on a real one, 256 to 768 wide, they are a rounding error.)
    image = _image()
    result = trained.analyze(image, CAPTION, method="learned", keep_ratio=0.5, latency_repeats=1)
    assert result.pruned.tokens_per_stage == [16, 14, 11, 9]  # round(16 * 0.5 ** (s / 3)), plus the fused token
    assert result.baseline.score == pytest.approx(plain.analyze(image, CAPTION, "random", 0.5, 1).baseline.score)
    assert [s.method for s in trained.compare(image, CAPTION)][0] == "learned"
    assert "learned" not in [s.method for s in plain.compare(image, CAPTION)]
    learned = trained.embed_images([image], method="learned", keep_ratio=0.3)
    assert not np.allclose(learned, trained.embed_images([image]))
    # text_guided runs on the add-on's caption-conditioned predictors, with its background token.
    guided = trained.analyze(image, CAPTION, method="text_guided", keep_ratio=0.5, latency_repeats=1)
    assert guided.pruned.tokens_per_stage == [16, 14, 11, 9]


def test_learned_on_a_plain_clip_says_how_to_train_the_predictors(work, sessions):
    _, plain = sessions
    command = f"python -m training.train --backbone {work / 'clip'} --out DIR"
    image = _image()
    calls = [
        lambda: plain.analyze(image, CAPTION, method="learned"),
        lambda: plain.analyze(image, CAPTION, method="text_guided"),
        lambda: plain.sweep(image, CAPTION, method="learned"),
        lambda: plain.compare(image, CAPTION, methods=("learned",)),
        lambda: plain.embed_images([image], method="learned", keep_ratio=0.5),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="needs trained keep predictors") as info:
            call()
        assert command in str(info.value)


def test_evaluate_a_backbone_and_its_addon(work, tmp_path):
    args = ["--keep-ratios", "0.5", "--no-latency", "--quiet", "--eval-limit", "8"]
    # The add-on: its recorded data (../synth) is found, learned is evaluated on the predictors.
    m = evaluate.main(["--backbone", str(work / "addon"), "--out", str(tmp_path / "a"), "--methods", "learned",
                       "random", *args])  # fmt: skip
    rows = {(r["method"], r["keep_ratio"]): r for r in m["rows"]}
    assert set(rows) == {("none", 1.0), ("learned", 0.5), ("random", 0.5)}
    assert rows[("learned", 0.5)]["checkpoint"] == "pruned" and rows[("learned", 0.5)]["mean_r1"] is not None
    assert all(r["object_recall"] is not None for r in m["rows"])  # synthetic boxes, moved into the centre crop
    assert rows[("none", 1.0)]["object_recall"] == 1.0
    assert m["model"]["backbone"]["source"] == "../clip" and m["dataset"]["synthetic"]
    assert {"metrics.json", "report.md"} <= {p.name for p in (tmp_path / "a").iterdir()}
    # A plain CLIP, on --data: by default every method but learned.
    m = evaluate.main(["--backbone", str(work / "clip"), "--data", str(work / "synth"), "--out", str(tmp_path / "p"),
                       *args])  # fmt: skip
    assert {r["method"] for r in m["rows"]} == set(api.load(work / "clip").methods())


def test_a_hub_backbone_is_recorded_by_id_and_commit(work, tmp_path, tokenizer_file, monkeypatch):
    # A Hub cache entry laid out by hand, as huggingface_hub writes it; offline, so nothing is fetched.
    commit = "c" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    make_clip(repo / "snapshots" / commit, tokenizer_file, VISION, TEXT, 16, legacy=False)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    train.main(["--backbone", "someone/tiny-clip@main", "--data", str(work / "synth"), "--out", str(tmp_path / "a"),
                "--preset", "tiny", "--pruned-epochs", "1", "--threads", "1", "--quiet"])  # fmt: skip
    entry = json.loads((tmp_path / "a" / addon.ADDON_FILE).read_text())["backbone"]
    assert entry | {"vision": None} == {"source": "someone/tiny-clip", "hub": True, "revision": "main",
                                        "commit": commit, "vision": None}  # fmt: skip
    session = api.load(tmp_path / "a")  # the backbone, found at its commit
    assert session.has_predictors and "learned" in session.methods()


def test_resume_after_an_interruption_matches_an_uninterrupted_run(work, tmp_path, monkeypatch):
    def argv(out: Path, *extra: str) -> list[str]:
        return ["--backbone", str(work / "clip"), "--data", str(work / "synth"), "--out", str(out), "--preset", "tiny",
                "--pruned-epochs", "3", "--threads", "1", "--quiet", *extra]  # fmt: skip

    train.main(argv(tmp_path / "whole"))
    epochs, real_epoch = [], train._train_epoch

    def interrupted(*args, **kwargs):
        epochs.append(1)
        if len(epochs) == 3:
            raise KeyboardInterrupt  # as if killed during the last epoch
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv(tmp_path / "broken"))
    monkeypatch.setattr(train, "_train_epoch", real_epoch)
    assert {p.name for p in (tmp_path / "broken").iterdir()} == {".resume"}  # the predictors' state only
    train.main(argv(tmp_path / "broken", "--resume"))
    whole, resumed = (load_file(str(tmp_path / f / addon.PREDICTORS_FILE)) for f in ("whole", "broken"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert sorted(p.name for p in (tmp_path / "broken").iterdir()) == sorted(addon.ADDON_FILES)


def _exit_2(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


def test_bad_inputs_exit_2_with_one_error_line(work, tmp_path, capsys):
    clip, data = str(work / "clip"), str(work / "synth")
    assert "--out" in _exit_2(train.main, ["--backbone", clip, "--data", data], capsys)
    assert "not a HuggingFace CLIP" in _exit_2(
        train.main, ["--backbone", str(tmp_path), "--data", data, "--out", str(tmp_path / "a")], capsys
    )
    # Never over something that is not an add-on: here the backbone itself.
    assert "new folder" in _exit_2(train.main, ["--backbone", clip, "--data", data, "--out", clip], capsys)
    assert "--phases" in _exit_2(
        train.main, ["--backbone", clip, "--out", str(tmp_path / "a"), "--phases", "baseline"], capsys
    )
    # An add-on carries no backbone weight, so there is no image tower to fine-tune.
    assert "--finetune-steps" in _exit_2(
        train.main, ["--backbone", clip, "--out", str(tmp_path / "a"), "--finetune-steps", "5"], capsys
    )
    # Nor is there a text tower or a patch embedding to build: the backbone brings its own.
    for option in (["--text-init", "clip"], ["--stem", "8"]):
        assert option[0] in _exit_2(train.main, ["--backbone", clip, "--out", str(tmp_path / "a"), *option], capsys)
    line = _exit_2(evaluate.main, ["--backbone", clip, "--data", data, "--out", str(tmp_path / "e"), "--methods",
                                   "learned"], capsys)  # fmt: skip
    assert "python -m training.train --backbone" in line
    assert "pass --data" in _exit_2(evaluate.main, ["--backbone", clip, "--out", str(tmp_path / "e")], capsys)
    assert not (tmp_path / "a").exists() and (work / "clip" / "model.safetensors").is_file()


def test_an_addon_saved_before_text_guided_runs_learned_and_says_how_to_train_text_guided(work, tmp_path):
    # As written before text_guided had predictors: learned's tensors only, and no predictors.query.
    old = tmp_path / "old"
    old.mkdir()
    tensors = load_file(str(work / "addon" / addon.PREDICTORS_FILE))
    learned = {n: t for n, t in tensors.items() if n.startswith("visual.predictors.")}
    save_file(learned, str(old / addon.PREDICTORS_FILE))
    config = json.loads((work / "addon" / addon.ADDON_FILE).read_text())
    del config["predictors"]["query"]
    config["backbone"]["source"] = str(work / "clip")  # the test's own folder; add-ons record a relative path
    (old / addon.ADDON_FILE).write_text(json.dumps(config))
    backbone = addon.load_backbone(old)
    model = backbone.clip.model
    assert not len(model.visual.query_predictors) and not model.cfg.pruning.query_predictors
    pixels = torch.zeros(1, 3, 32, 32)
    text = torch.nn.functional.normalize(torch.ones(1, model.cfg.embed_dim), dim=-1)
    with torch.inference_mode():
        assert model.encode_image(pixels, PruneSpec("learned", 0.5)).shape == (1, model.cfg.embed_dim)
        with pytest.raises(ValueError, match="--backbone SOURCE --out DIR"):
            model.encode_image(pixels, PruneSpec("text_guided", 0.5, text=text))


def test_an_addon_saved_before_the_caption_mlp_runs_text_guided_with_its_linear_predictors(work, tmp_path):
    # As written before the caption MLP: no predictors.query_mlp, and one linear map per query predictor.
    old = tmp_path / "old"
    old.mkdir()
    tensors = load_file(str(work / "addon" / addon.PREDICTORS_FILE))
    linear = {n.replace(".query.0.", ".query."): t for n, t in tensors.items() if ".query.2." not in n}
    assert linear.keys() != tensors.keys()  # the add-on under test has the MLP
    save_file(linear, str(old / addon.PREDICTORS_FILE))
    config = json.loads((work / "addon" / addon.ADDON_FILE).read_text())
    assert config["predictors"].pop("query_mlp") is True
    config["backbone"]["source"] = str(work / "clip")
    (old / addon.ADDON_FILE).write_text(json.dumps(config))
    model = addon.load_backbone(old).clip.model
    assert not model.cfg.pruning.query_mlp and all(isinstance(q.query, torch.nn.Linear) for q in
                                                   model.visual.query_predictors)  # fmt: skip
    text = torch.nn.functional.normalize(torch.ones(1, model.cfg.embed_dim), dim=-1)
    with torch.inference_mode():
        assert model.encode_image(torch.zeros(1, 3, 32, 32), PruneSpec("text_guided", 0.5, text=text)).shape == (
            1, model.cfg.embed_dim)  # fmt: skip
    config["predictors"]["query_mlp"] = "false"  # text is not a boolean
    (old / addon.ADDON_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="predictors.query_mlp must be true or false"):
        addon.load_backbone(old)
