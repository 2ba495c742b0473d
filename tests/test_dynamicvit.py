"""DynamicViT as its paper runs it: PredictorLG, attention under a keep policy, its loss and schedule, and the
dynamicvit/ checkpoint that training writes and the evaluation and api serve."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training import dynamicvit as dv
from vlm_demo import api, flops, pruning
from vlm_demo.config import get_preset
from vlm_demo.model import DualEncoder, load_checkpoint, policy_attention, same_text_tower, save_checkpoint
from vlm_demo.pruning import PredictorLG, PruneSpec, Signals


def tokens(n: int = 6, c: int = 3) -> torch.Tensor:
    """(1, 1 + n, c): CLS = -1s, patch i = i + 1 in every channel."""
    patches = torch.arange(1, n + 1, dtype=torch.float32)[:, None].expand(n, c)
    return torch.cat([-torch.ones(1, c), patches])[None]


# ----------------------------------------------------------------------------- the method at inference


def test_dynamicvit_keeps_the_top_k_and_drops_the_rest_outright():
    x = tokens()
    scores = torch.tensor([[-0.1, -2.0, -0.3, -0.05, -3.0, -1.0]])  # keep log-probabilities
    red = pruning.dynamicvit(x, 3, Signals(predictor=scores))
    # Patches 0, 2, 3 (values 1, 3, 4) score highest; they stay in order, and no fused token is added.
    assert torch.equal(red.x, torch.tensor([[[-1.0] * 3, [1.0] * 3, [3.0] * 3, [4.0] * 3]]))
    assert red.source.tolist() == [[0, -1, 1, 2, -1, -1]] and red.rep.tolist() == [[0, 2, 3]]


def test_predictor_lg_is_dynamicvits():
    torch.manual_seed(0)
    pred = PredictorLG(8)
    x = torch.randn(2, 5, 8)
    out = pred(x)
    assert out.shape == (2, 5, 2)
    assert torch.allclose(out.exp().sum(-1), torch.ones(2, 5))  # log-probabilities of (keep, drop)
    assert torch.allclose(pred(x, torch.ones(2, 5)), out, atol=1e-6)  # an all-kept policy is the plain mean
    assert torch.equal(pred.keep_scores(x), out[..., 0])
    # The global half averages only the kept tokens: a dropped token's value moves no other token's output.
    policy = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]] * 2)
    y = x.clone()
    y[:, 2] = torch.randn(2, 8)
    a, b = pred(x, policy), pred(y, policy)
    others = [0, 1, 3, 4]
    assert torch.allclose(a[:, others], b[:, others], atol=1e-6) and not torch.allclose(a[:, 2], b[:, 2])
    with pytest.raises(ValueError, match="divisible by 4"):
        PredictorLG(6)
    # Its scoring cost, as flops prices it: norm 5C, then C x C, C x C/2, C/2 x C/4, C/4 x 2 per token.
    shape = pruning.StageShape(n_in=5, n_out=3, width=8, heads=2, embed_dim=4, predictor_hidden=2)
    assert pruning.get("dynamicvit").scoring_macs(shape) == 5 * (40 + 64 + 32 + 8 + 4)


def test_policy_attention_masks_dropped_keys_and_passes_gradient():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    full = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(policy_attention(q, k, v, torch.ones(1, 5)), full, atol=1e-5)
    policy = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]], requires_grad=True)
    out = policy_attention(q, k, v, policy)
    keep = [0, 1, 3]
    # A kept query attends to the kept keys only: as if tokens 2 and 4 were gone.
    sub = F.scaled_dot_product_attention(q[:, :, keep], k[:, :, keep], v[:, :, keep])
    assert torch.allclose(out[:, :, keep], sub, atol=1e-5)
    # A dropped query still sees itself (the diagonal), besides the kept keys.
    own = [0, 1, 2, 3]
    mine = F.scaled_dot_product_attention(q[:, :, 2:3], k[:, :, own], v[:, :, own])
    assert torch.allclose(out[:, :, 2:3], mine, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(policy.grad).all() and policy.grad.abs().sum() > 0  # exact 0s and 1s still train


def test_each_checkpoint_runs_only_its_own_predictors():
    cfg = get_preset("tiny").model
    own = pruning.checkpoint_config(cfg, "dynamicvit")
    assert own.pruning.predictor == "lg" and own.pruning.stages == pruning.quarter_points(cfg.vision.depth)
    assert pruning.checkpoint_config(own, "dynamicvit") == own and pruning.checkpoint_config(cfg, "learned") == cfg
    pixels = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"load its own checkpoint \(pruned/\)"):
        DualEncoder(own).encode_image(pixels, PruneSpec("learned", 0.5))
    with pytest.raises(ValueError, match=r"load its own checkpoint \(dynamicvit/\)"):
        DualEncoder(cfg).encode_image(pixels, PruneSpec("dynamicvit", 0.5))
    # flops prices dynamicvit on its own checkpoint's config, from either config; counts are DynamicViT's own.
    default = get_preset("default").model
    assert flops.tokens_per_stage(default, "dynamicvit", 0.343) == [196, 137, 96, 67]  # int(196 * 0.7 ** s)
    own_model = DualEncoder(pruning.checkpoint_config(default, "dynamicvit"))  # fvcore on the model built by hand
    counted = flops.analysis(own_model, PruneSpec("dynamicvit", 0.343)).total() / 1e9
    assert flops.gmacs(default, "dynamicvit", 0.343) == pytest.approx(counted)


# ----------------------------------------------------------------------------- training


def test_ratio_loss_and_schedule_by_hand():
    decisions = [torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)]
    # Stage 1: kept 0.5 and 1.0 against 0.7: (0.04 + 0.09) / 2; stage 2: 0.25 against 0.49: 0.0576.
    assert float(dv.ratio_loss(decisions, [0.7, 0.49])) == pytest.approx(0.065 + 0.0576)
    total, peak = 600, 1e-3
    head0, back0 = dv.learning_rates(0, total, peak)
    assert head0 == pytest.approx(peak) and back0 == 0.0  # the backbone is frozen at first
    assert dv.learning_rates(99, total, peak)[1] == 0.0 and dv.learning_rates(100, total, peak)[1] == pytest.approx(
        dv.BACKBONE_SCALE * peak)  # fmt: skip  # from the sixth on, at 0.01 x the predictors' peak
    head, back = dv.learning_rates(total, total, peak)
    assert head == pytest.approx(dv.MIN_LR) and back == pytest.approx(dv.MIN_LR)  # the cosine's floor caps it


def test_train_forward_keeps_every_token_and_trains_the_predictors():
    torch.manual_seed(0)
    teacher = DualEncoder(get_preset("tiny").model).eval()
    model = dv.from_baseline(teacher)
    assert same_text_tower(model, teacher) and model.cfg.pruning.predictor == "lg"
    base_state = teacher.state_dict()
    assert all(torch.equal(t, base_state[n]) for n, t in model.state_dict().items() if not n.startswith("visual.pred"))
    pixels = torch.randn(4, 3, 32, 32)
    targets = [0.7, 0.49, 0.343]
    out = dv.train_forward(model, pixels, targets)
    P = model.cfg.vision.num_patches
    assert out.tokens.shape == (4, P, model.cfg.vision.width) and len(out.decisions) == 3
    for before, after in zip(out.decisions, out.decisions[1:]):
        assert (after <= before).all()  # a token dropped at one stage stays dropped
    ids = torch.randint(1, 20, (4, model.cfg.text.context_length))
    terms = dv.dynamicvit_loss(model, teacher, pixels, ids, targets)
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual.predictors.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("text."))
    assert set(terms) == {"loss", "task", "ratio", "kl", "tokens", "kept"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny baseline on 24 synthetic images, and dynamicvit/ trained from it by the CLI (two steps)."""
    from training.data import load_splits
    from training.synthetic import generate
    from vlm_demo.tokenizer import Tokenizer

    tmp = tmp_path_factory.mktemp("dynamicvit")
    data = generate(tmp / "data", num_images=24, seed=0, size=32, workers=1, progress=False)
    captions = [c for s in load_splits(data).values() for caps in s.captions for c in caps]
    tok = Tokenizer.build(captions, context_length=16)
    cfg = get_preset("tiny").model
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tok)))
    ckpt = tmp / "ckpt"
    for seed, name in ((0, "baseline"), (1, "pruned")):
        torch.manual_seed(seed)
        save_checkpoint(DualEncoder(cfg), tok, ckpt / name, data=str(data), epochs=1, seconds_per_epoch=1.0)
    (ckpt / "pruned" / "model.safetensors").unlink()  # pruned/ must share baseline/'s towers: copy them
    save_checkpoint(load_checkpoint(ckpt / "baseline")[0], tok, ckpt / "pruned", data=str(data), epochs=1)
    dv.main(["--checkpoints", str(ckpt), "--epochs", "1", "--steps", "2", "--batch-size", "4", "--precision", "fp32",
             "--quiet", "--threads", "1"])  # fmt: skip
    return ckpt


def test_training_writes_a_checkpoint_of_dynamicvits_own(trained: Path):
    model, _ = load_checkpoint(trained / "dynamicvit")
    base, _ = load_checkpoint(trained / "baseline")
    assert model.cfg.pruning.predictor == "lg" and model.cfg.pruning.stages == (1, 2, 3)
    assert same_text_tower(model, base)
    record = json.loads((trained / "dynamicvit" / "training.json").read_text())
    assert record["steps"] == 2 and record["stage_keep_rates"] == pytest.approx([0.7, 0.49, 0.343])
    assert record["ratio_weight"] == dv.RATIO_WEIGHT == 40.0 and record["distill_weight"] == 0.5
    assert record["backbone_lr_scale"] == 0.01
    assert all(math.isfinite(v) for v in record["losses"]["loss"])
    with torch.inference_mode():
        _, trace = model.encode_image_with_trace(torch.randn(1, 3, 32, 32), PruneSpec("dynamicvit", 0.343))
    assert trace.tokens_per_stage() == [16, 11, 8, 5]  # round(16 * 0.7 ** s) on the tiny 4 x 4 grid


def test_evaluate_and_the_api_serve_it(trained: Path, tmp_path: Path):
    from training.evaluate import main

    out = tmp_path / "eval"
    main(["--checkpoints", str(trained), "--out", str(out), "--methods", "dynamicvit", "--keep-ratios", "0.5",
          "--latency-repeats", "1", "--quiet", "--threads", "1", "--placements", "paper"])  # fmt: skip
    rows = [r for r in json.loads((out / "metrics.json").read_text())["rows"] if r["method"] == "dynamicvit"]
    assert len(rows) == 1 and rows[0]["checkpoint"] == "dynamicvit" and rows[0]["stage_blocks"] == [1, 2, 3]
    base_cfg = load_checkpoint(trained / "baseline")[0].cfg
    assert rows[0]["gmacs"] == pytest.approx(flops.gmacs(base_cfg, "dynamicvit", 0.5))
    session = api.load(trained)
    assert "dynamicvit" in session.methods() and session.model_for("dynamicvit") is session.others["dynamicvit"]
    a = session.analyze(Image.new("RGB", (40, 40), "red"), "a red circle", method="dynamicvit", keep_ratio=0.5,
                        latency_repeats=1)  # fmt: skip
    assert a.pruned.tokens_per_stage == flops.tokens_per_stage(base_cfg, "dynamicvit", 0.5)


def test_a_missing_or_stale_checkpoint_is_left_out_or_refused(trained: Path, tmp_path: Path):
    from training.evaluate import main

    stale = tmp_path / "stale"
    for name in ("baseline", "pruned", "dynamicvit"):
        model, tok = load_checkpoint(trained / name)
        if name != "dynamicvit":
            with torch.no_grad():
                model.logit_scale.add_(0.5)  # a new baseline: its caption side differs from dynamicvit/'s
        record = json.loads((trained / name / "training.json").read_text())
        save_checkpoint(model, tok, stale / name, **record)
    session = api.load(stale)
    assert "dynamicvit" not in session.methods()
    with pytest.raises(ValueError, match="python -m training.dynamicvit"):
        session.method_info("dynamicvit")
    args = ["--checkpoints", str(stale), "--out", str(tmp_path / "e"), "--keep-ratios", "0.5", "--no-latency",
            "--quiet", "--threads", "1", "--placements", "paper"]  # fmt: skip
    with pytest.raises(SystemExit):  # asked for by name: a clear error (exit 2)
        main([*args, "--methods", "dynamicvit"])
    rows = main([*args, "--methods", "random", "learned"])["rows"]
    assert {r["method"] for r in rows} == {"none", "random", "learned"}
    result = main(args)  # every method by default: dynamicvit is left out, the rest run
    assert "dynamicvit" not in {r["method"] for r in result["rows"]} and "tome" in {r["method"] for r in result["rows"]}


def test_the_folders_a_session_loads_are_checked(trained: Path, tmp_path: Path, caplog):
    """dynamicvit/ alone serves without pruned/; one with the wrong predictors, or corrupt, is left out."""
    from training.evaluate import main

    only = tmp_path / "only"
    for name in ("baseline", "dynamicvit"):
        model, tok = load_checkpoint(trained / name)
        save_checkpoint(model, tok, only / name, **json.loads((trained / name / "training.json").read_text()))
    session = api.load(only)
    assert "dynamicvit" in session.methods() and "learned" not in session.methods()
    session.method_info("dynamicvit")  # served, though pruned/ is missing
    # Another kind of predictor in dynamicvit/ (pruned/'s weights): not what flops prices, so it is left out.
    wrong = tmp_path / "wrong"
    for name, source in (("baseline", "baseline"), ("pruned", "pruned"), ("dynamicvit", "baseline")):
        model, tok = load_checkpoint(trained / source)
        save_checkpoint(model, tok, wrong / name, **json.loads((trained / "baseline" / "training.json").read_text()))
    assert "dynamicvit" not in api.load(wrong).methods() and "'mlp' keep predictors" in caplog.text
    # A corrupt dynamicvit/: the default evaluation leaves it out and runs the rest.
    (wrong / "dynamicvit" / "model.safetensors").write_bytes(b"not safetensors")
    rows = main(["--checkpoints", str(wrong), "--out", str(tmp_path / "e"), "--keep-ratios", "0.5", "--no-latency",
                 "--quiet", "--threads", "1", "--placements", "paper", "--methods", "random"])["rows"]  # fmt: skip
    assert {r["method"] for r in rows} == {"none", "random"}
    result = main(["--checkpoints", str(wrong), "--out", str(tmp_path / "f"), "--keep-ratios", "0.5", "--no-latency",
                   "--quiet", "--threads", "1", "--placements", "paper"])  # fmt: skip
    assert "dynamicvit" not in {r["method"] for r in result["rows"]}
