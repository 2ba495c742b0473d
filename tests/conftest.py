"""Shared fixtures: tiny, randomly initialised checkpoints saved the real way."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from vlm_demo.config import get_preset
from vlm_demo.model import DualEncoder, save_checkpoint
from vlm_demo.tokenizer import Tokenizer

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
    """baseline/ and pruned/ with random weights (different seeds), plus a caption bank."""
    tok = Tokenizer.build(CAPTIONS, get_preset(preset).model.text.context_length)
    cfg = get_preset(preset).model
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=len(tok)))
    for seed, name in ((0, "baseline"), (1, "pruned")):
        torch.manual_seed(seed)
        save_checkpoint(DualEncoder(cfg), tok, folder / name, phase=name)
    (folder / "caption_bank.json").write_text(json.dumps({"split": "test", "captions": CAPTIONS}))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def default_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoints(tmp_path_factory.mktemp("ckpt_default"), "default")
