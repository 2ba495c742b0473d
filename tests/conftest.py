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
