"""HuggingFace CLIP checkpoints in the project's own model code, equal to transformers.

Every reference here is a random tiny `transformers.CLIPModel` saved the real way
(config.json + model.safetensors), with a BPE tokenizer.json trained on a few
sentences and a preprocessor_config.json (conftest's `make_clip`): no download, a few
seconds in all.
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from conftest import CONTEXT, make_clip
from vlm_demo import api, flops, hf_clip
from vlm_demo.config import ModelConfig
from vlm_demo.model import load_checkpoint
from vlm_demo.pruning import PruneSpec
from vlm_demo.transforms import Preprocess, crop_box, to_tensor, visible_region

CAPTIONS = [
    "a photo of a cat",
    "A RED  Sofa!!",
    "zebras unseen before, 42 of them",
    "Émile's café: déjà vu",
    "a cat <|endoftext|> a dog",  # a literal special token is matched whole, as in transformers
    "two dogs run across the green grass and a man riding a bicycle down the street",  # truncated
]
# (id, vision_config, text_config, projection_dim, legacy eos rule)
CASES = [
    (
        "quick_gelu-32px-8-legacy_eos",
        dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=3),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        24,
        True,
    ),
    (
        "gelu-48px-16-eos_id",
        dict(image_size=48, patch_size=16, hidden_size=32, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=2, hidden_act="gelu"),
        dict(hidden_size=40, intermediate_size=72, num_hidden_layers=1, num_attention_heads=5, hidden_act="gelu"),
        20,
        False,
    ),
    (
        "mixed-64px-16-eos_id",
        dict(image_size=64, patch_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=8, layer_norm_eps=1e-6),
        dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu"),
        16,
        False,
    ),
]  # fmt: skip


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def clip(request, tmp_path_factory, tokenizer_file):
    """(folder, reference CLIPModel, Session loaded through api.load)."""
    _, vision, text, projection_dim, legacy = request.param
    folder = tmp_path_factory.mktemp("clip")
    model = make_clip(folder, tokenizer_file, vision, text, projection_dim, legacy)
    return folder, model, api.load(folder)


def images() -> list[Image.Image]:
    """Non-square RGB images, landscape and portrait, with detail at every scale."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 75), (67, 41))]


def test_image_embeddings_equal_transformers(clip):
    folder, model, session = clip
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    pixels = processor(images=images(), return_tensors="pt").pixel_values
    with torch.inference_mode():
        expected = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        ours = session.baseline.encode_image(pixels)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # The whole path, preprocessing included.
    np.testing.assert_allclose(session.embed_images(images()), expected.numpy(), atol=1e-5, rtol=0)


def test_text_embeddings_and_ids_equal_transformers(clip, tokenizer_file):
    folder, model, session = clip
    hf_tok = transformers.CLIPTokenizerFast(tokenizer_file=str(tokenizer_file))
    enc = hf_tok(CAPTIONS, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")
    assert torch.equal(session.tokenizer.encode_batch(CAPTIONS), enc.input_ids)
    with torch.inference_mode():
        out = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        expected = F.normalize(out.pooler_output, dim=-1)
        # Random ids, end-of-text anywhere or nowhere: the pooling rule itself is compared.
        vocab, generator = model.config.text_config.vocab_size, torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (6, CONTEXT), generator=generator)
        ids[:3, 5] = session.tokenizer.pad_id  # CLIP pads with <|endoftext|>: an end-of-text in 3 rows
        random_expected = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
        random_ours = session.baseline.encode_text(ids)
    np.testing.assert_allclose(session.embed_texts(CAPTIONS), expected.numpy(), atol=1e-5, rtol=0)
    torch.testing.assert_close(random_ours, random_expected, atol=1e-5, rtol=0)


def test_ids_equal_transformers_for_a_file_without_added_tokens(tmp_path, tokenizer_file):
    # transformers makes the special tokens added tokens, matched whole, even when the file does not.
    data = json.loads(tokenizer_file.read_text())
    data["added_tokens"] = []
    path = tmp_path / hf_clip.TOKENIZER_FILE
    path.write_text(json.dumps(data))
    hf_tok = transformers.CLIPTokenizerFast(tokenizer_file=str(path))
    expected = hf_tok(CAPTIONS, padding="max_length", truncation=True, max_length=CONTEXT).input_ids
    assert hf_clip.ClipTokenizer(path, CONTEXT).encode_batch(CAPTIONS).tolist() == expected


def test_pixels_equal_the_image_processor(clip):
    folder, _, session = clip
    processor = transformers.CLIPImageProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "CLIPImageProcessorPil"  # no torchvision: the PIL backend is the reference
    for image in images():
        expected = processor(images=image, return_tensors="pt").pixel_values[0]
        torch.testing.assert_close(to_tensor(image, session.preprocess), expected, atol=1e-6, rtol=0)


def test_config_maps_the_architecture(clip):
    folder, model, session = clip
    cfg, hf = session.cfg, model.config
    assert (cfg.vision.image_size, cfg.vision.patch_size) == (hf.vision_config.image_size, hf.vision_config.patch_size)
    assert cfg.vision.mlp_width == hf.vision_config.intermediate_size and cfg.embed_dim == hf.projection_dim
    assert cfg.vision.pre_norm and not cfg.vision.patch_bias and cfg.text.causal and cfg.text.pool == "eos"
    assert session.cfg.text.context_length == session.tokenizer.context_length == CONTEXT
    assert session.baseline is session.pruned and not session.has_predictors
    # Both kinds of keep predictors (learned's, text_guided's) have no CLIP tensors: untrained, and listed.
    untrained = hf_clip.load_clip(folder).untrained
    assert untrained and all(n.startswith(("visual.predictors.", "visual.query_predictors.")) for n in untrained)
    assert any(n.startswith("visual.query_predictors.") for n in untrained)
    assert torch.equal(session.baseline.logit_scale, model.logit_scale)  # the checkpoint's, not the initial value
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_training_free_methods_at_full_keep_equal_none(clip):
    _, _, session = clip
    pixels = torch.stack([to_tensor(im, session.preprocess) for im in images()])
    text = torch.from_numpy(session.embed_texts(CAPTIONS[:1]))
    with torch.inference_mode():
        base = session.baseline.encode_image(pixels)
        for method in ("cls_attention", "tome", "random", "text_guided"):  # text_guided: on untrained predictors
            spec = PruneSpec(method, 1.0, text=text if method == "text_guided" else None)
            assert torch.equal(session.baseline.encode_image(pixels, spec), base), method


def test_pruning_and_flops_run_on_a_clip(clip):
    _, _, session = clip
    cfg, image = session.cfg, images()[0]
    pixels = to_tensor(image, session.preprocess)[None]
    text = torch.from_numpy(session.embed_texts(CAPTIONS[:1]))
    with torch.inference_mode():
        for method in ("cls_attention", "tome", "text_guided", "random"):  # the model runs untrained predictors too
            spec = PruneSpec(method, 0.5, text=text if method == "text_guided" else None)
            _, trace = session.baseline.encode_image_with_trace(pixels, spec)
            assert trace.tokens_per_stage() == flops.tokens_per_stage(cfg, method, 0.5), method
            assert trace.tokens_per_stage()[-1] < cfg.vision.num_patches, method
    # The session offers neither trained-predictor method on a plain CLIP, and says how to train them.
    assert "text_guided" not in session.methods() and "learned" not in session.methods()
    with pytest.raises(ValueError, match="needs trained keep predictors.*--backbone"):
        session.analyze(image, CAPTIONS[0], method="text_guided", keep_ratio=0.5, latency_repeats=1)
    # One method through the app's entry point: fvcore (pre-norm, CLIP's MLP width and a projection unequal
    # to the width all counted) against the closed form.
    a = session.analyze(image, CAPTIONS[0], method="cls_attention", keep_ratio=0.5, latency_repeats=1)
    assert a.pruned.gmacs < a.baseline.gmacs
    assert a.pruned.gmacs == pytest.approx(flops.closed_form_gmacs(cfg, "cls_attention", 0.5), rel=0.02)
    assert a.baseline.gmacs == pytest.approx(flops.closed_form_gmacs(cfg), rel=0.02)
    # The overlay covers the centre square the model saw (side / (side + 6) of the shorter side), at the
    # upload's resolution.
    side = round(50 * cfg.vision.image_size / (cfg.vision.image_size + 6))
    assert a.overlays["kept"].size == visible_region(image, session.preprocess).size == (side, side)


def test_caption_checks_ask_the_tokenizer(clip):
    _, _, session = clip
    assert session.check_caption(CAPTIONS[0]) == (CAPTIONS[0], False)
    assert session.check_caption(CAPTIONS[-1]) == (CAPTIONS[-1], True)
    assert session.check_caption("!?") == ("!?", False)  # BPE reads punctuation, unlike the word tokenizer


def test_crop_box_worked_example():
    # 100 x 50 -> shorter side 40 -> 80 x 40; the 32 px centre crop starts at (24, 4) there.
    spec = Preprocess(32, shortest_edge=40)
    assert crop_box((100, 50), spec) == (30.0, 5.0, 70.0, 45.0)
    assert crop_box((100, 50), Preprocess(32)) == (0.0, 0.0, 100.0, 50.0)  # the shipped square resize
    image = Image.new("RGB", (100, 50))
    assert visible_region(image, spec).size == (40, 40) and visible_region(image, Preprocess(32)) is image
    with pytest.raises(ValueError, match="shortest_edge"):
        Preprocess(32, shortest_edge=30)


def test_defaults_are_transformers_defaults():
    # config.json and preprocessor_config.json leave out values equal to these.
    text, vision = transformers.CLIPTextConfig(), transformers.CLIPVisionConfig()
    assert {k: getattr(text, k) for k in hf_clip.TEXT_DEFAULTS} == hf_clip.TEXT_DEFAULTS
    assert {k: getattr(vision, k) for k in hf_clip.VISION_DEFAULTS} == hf_clip.VISION_DEFAULTS
    processor = transformers.CLIPImageProcessor()
    for key, value in hf_clip.PROCESSOR_DEFAULTS.items():
        got = getattr(processor, key)
        assert (dict(got) if key in ("size", "crop_size") else got) == pytest.approx(value), key


def test_legacy_config_dicts_are_read_as_transformers_reads_them():
    # Early exports carry text_config_dict next to text_config; transformers lets the former win, defaults filled.
    hf = {
        "model_type": "clip",
        "text_config": {"hidden_size": 512, "eos_token_id": 2, "hidden_act": "gelu"},
        "text_config_dict": {"hidden_size": 384, "intermediate_size": 1536},
        "vision_config": {"hidden_size": 96, "image_size": 64, "patch_size": 16},
    }
    ours, ref = hf_clip.model_config(hf), transformers.CLIPConfig.from_dict(hf)
    t = ref.text_config
    assert (ours.text.width, ours.text.mlp_width, ours.text.act) == (t.hidden_size, t.intermediate_size, t.hidden_act)
    assert ours.text.eos_token_id == t.eos_token_id and ours.vision.width == ref.vision_config.hidden_size
    assert ours.pruning.stages == (3, 6, 9)  # DynamicViT's stages in a 12-block ViT


def _unpickled(*args):
    raise AssertionError("a pickle was unpickled")


class _Trap:
    def __reduce__(self):
        return (_unpickled, ())


def test_pickle_only_weights_are_refused_unopened(tmp_path, tokenizer_file, monkeypatch):
    folder = tmp_path / "clip"
    make_clip(folder, tokenizer_file, *CASES[0][1:])
    (folder / hf_clip.WEIGHTS_FILE).unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap()))
    monkeypatch.setattr(torch, "load", _unpickled)
    monkeypatch.setattr(pickle, "load", _unpickled)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin, a pickle.*@refs/pr/N"):
        api.load(folder)


def test_mismatched_weights_are_named(tmp_path, tokenizer_file):
    folder = tmp_path / "clip"
    make_clip(folder, tokenizer_file, *CASES[0][1:])
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3
    config["text_config"]["intermediate_size"] = 65
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing \(vision_model\.encoder\.layers\.2\..*wrong shape.*mlp\.fc1"):
        api.load(folder)


def test_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port, as on a machine without network
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot be reached"):
        api.load("someone/tiny-clip@refs/pr/1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="not in the Hub cache"):
        api.load("someone/not-cached")
    assert time.monotonic() - t0 < 10


def test_hub_id_loads_from_the_cache_offline(tmp_path, tokenizer_file, monkeypatch):
    # A Hub cache entry laid out by hand, as huggingface_hub writes it.
    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    make_clip(repo / "snapshots" / ("a" * 40), tokenizer_file, *CASES[0][1:])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    session = api.load("someone/tiny-clip")
    assert not session.has_predictors and session.embed_texts(CAPTIONS).shape == (len(CAPTIONS), 24)


# Embeddings of the shipped checkpoints, pinned when they were shipped (the current recipe's baseline, with the
# clip text init, and pruned/ after its finetune phase): (method, keep ratio) -> first six values and
# sum(i * e_i) of the image embedding. The checkpoints before them were pinned the same way by the code before
# HuggingFace CLIP support, and held.
SHIPPED = {
    ("none", 1.0): ([0.1186824, -0.0726767, -0.0167786, 0.1187264, -0.0554566, -0.0003355], 11.4549063),
    ("learned", 0.5): ([0.0665325, -0.0552419, 0.0052693, 0.1283159, -0.0500855, -0.0108533], 14.653402),
}  # tome is left out on purpose: its schedule is the method's, not the weights'
SHIPPED_TEXT = ([-0.0449595, -0.1528333, 0.0286926, -0.0843545, 0.1499901, 0.1376463], 34.2044129)
# Keys a config.json written before HuggingFace CLIP support lacks; they default to the project's own model.
NEW_KEYS = {"vision": ("act", "layer_norm_eps", "mlp_hidden", "patch_bias", "pre_norm"),
            "text": ("act", "causal", "eos_token_id", "layer_norm_eps", "mlp_hidden", "pad_id", "pool")}  # fmt: skip


def _pinned_image() -> Image.Image:
    yy, xx = np.mgrid[0:90, 0:130]
    return Image.fromarray(np.stack([xx * 2 % 256, yy * 3 % 256, (xx + yy) * 5 % 256], -1).astype(np.uint8))


def test_shipped_checkpoints_are_unchanged():
    root = Path(__file__).resolve().parents[1] / "checkpoints"
    (baseline, tokenizer), (pruned, _) = load_checkpoint(root / "baseline"), load_checkpoint(root / "pruned")
    session = api.Session(baseline, pruned, tokenizer)  # as api.load builds it, without the caption bank's cost
    assert session.has_predictors and session.preprocess == Preprocess(112)
    image = _pinned_image()
    for (method, ratio), (head, weighted) in SHIPPED.items():
        e = session.embed_images([image], method, ratio)[0]
        np.testing.assert_allclose(e[:6], head, atol=1e-5)
        assert float(e @ np.arange(e.size)) == pytest.approx(weighted, abs=1e-4)
    t = session.embed_texts(["a small red circle at the top left"])[0]
    np.testing.assert_allclose(t[:6], SHIPPED_TEXT[0], atol=1e-5)
    assert float(t @ np.arange(t.size)) == pytest.approx(SHIPPED_TEXT[1], abs=1e-4)


def test_a_config_written_before_huggingface_clip_support_loads_the_same_model(tmp_path):
    root = Path(__file__).resolve().parents[1] / "checkpoints" / "baseline"
    old = tmp_path / "old"
    shutil.copytree(root, old)
    config = json.loads((old / "config.json").read_text())
    for tower, keys in NEW_KEYS.items():
        for key in keys:
            del config[tower][key]
    (old / "config.json").write_text(json.dumps(config))
    (model, tokenizer), (again, _) = load_checkpoint(root), load_checkpoint(old)
    assert again.cfg == model.cfg
    image = _pinned_image()
    want = api.Session(model, model, tokenizer).embed_images([image], "none", 1.0)
    np.testing.assert_array_equal(api.Session(again, again, tokenizer).embed_images([image], "none", 1.0), want)
