"""Shared fixtures: tiny, randomly initialised checkpoints saved the real way.

The shipped model's (`make_checkpoints`), and HuggingFace CLIPs (`make_clip`: a random
tiny `transformers.CLIPModel` with a BPE tokenizer.json trained on a few sentences).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer

from benchmarks.random_clip import build_tokenizer
from vlm_demo import hf_clip
from vlm_demo.config import get_preset
from vlm_demo.model import DualEncoder, save_checkpoint
from vlm_demo.tokenizer import Tokenizer

# One fvcore-count cache for the whole test run (the app servers the tests start inherit it), apart from the
# developer's own ~/.cache/vlm_demo: the tests never read counts they did not make.
os.environ["VLM_DEMO_CACHE"] = tempfile.mkdtemp(prefix="vlm-demo-cache-")

CAPTIONS = [
    "a small red circle at the top left",
    "a large blue square in the center",
    "a green triangle on the right and a yellow star at the bottom",
    "a little purple heart in the bottom right corner",
]

# A small HuggingFace CLIP config.json: causal text attention pooled at the end-of-text token, quick GELU,
# pre-norm, no patch bias; built with random weights in a fraction of a second.
SMALL_CLIP = {
    "model_type": "clip", "projection_dim": 24,
    "vision_config": dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                          num_attention_heads=3),
    "text_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=16, vocab_size=100),
}  # fmt: skip


def make_checkpoints(folder: Path, preset: str = "tiny") -> Path:
    """baseline/ and pruned/ with random weights (different seeds), dynamicvit/ as `training.dynamicvit` starts it
    from the baseline (untrained PredictorLGs), plus a caption bank."""
    from training.dynamicvit import from_baseline

    tok = Tokenizer.build(CAPTIONS, get_preset(preset).model.text.context_length)
    cfg = get_preset(preset).model
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tok)))
    for seed, name in ((0, "baseline"), (1, "pruned")):
        torch.manual_seed(seed)
        model = DualEncoder(cfg)
        save_checkpoint(model, tok, folder / name, phase=name)
        if name == "baseline":
            save_checkpoint(from_baseline(model), tok, folder / "dynamicvit", phase="dynamicvit")
    (folder / "caption_bank.json").write_text(json.dumps({"split": "test", "captions": CAPTIONS}))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def default_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoints(tmp_path_factory.mktemp("ckpt_default"), "default")


# ----------------------------------------------------------------------------- HuggingFace CLIPs

CONTEXT = 16  # max_position_embeddings of the tiny CLIPs: short, so that captions get truncated
@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / hf_clip.TOKENIZER_FILE
    build_tokenizer(path)
    return path


def make_clip(folder: Path, tokenizer_file: Path, vision: dict, text: dict, projection_dim: int, legacy: bool):
    """Save a random CLIPModel, its tokenizer and image processor in `folder`; return the model."""
    import transformers  # here, not at the top: it takes seconds to import, and most tests never build a CLIP

    eos = RustTokenizer.from_file(str(tokenizer_file)).token_to_id(hf_clip.EOS)
    cfg = transformers.CLIPConfig(
        text_config=dict(
            text, vocab_size=eos + 9, max_position_embeddings=CONTEXT, bos_token_id=eos - 1, pad_token_id=eos,
            eos_token_id=2 if legacy else eos,
        ),
        vision_config=vision,
        projection_dim=projection_dim,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # biases and norms away from 0 and 1, so that a mixed-up tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    shutil.copy(tokenizer_file, folder / hf_clip.TOKENIZER_FILE)
    side = vision["image_size"]
    transformers.CLIPImageProcessor(
        size={"shortest_edge": side + 6},
        crop_size={"height": side, "width": side},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    ).save_pretrained(folder)
    return model
