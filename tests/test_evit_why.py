"""The EViT explanation (benchmarks.evit_why): its two ablations and an end-to-end run on tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import evit_why
from tests.test_evaluate import _tiny_checkpoints
from vlm_demo import pruning
from vlm_demo.config import get_preset
from vlm_demo.model import DualEncoder
from vlm_demo.pruning import PruneSpec


@pytest.fixture(scope="module")
def ablations():
    saved = dict(pruning.REGISTRY)
    evit_why.register_ablations()
    yield
    pruning.REGISTRY.clear()
    pruning.REGISTRY.update(saved)


def test_ablations_change_only_what_they_name(ablations):
    torch.manual_seed(0)
    model = DualEncoder(get_preset("tiny").model).eval()
    x = torch.randn(3, 3, 32, 32)
    evit = model.encode_image_with_trace(x, PruneSpec(evit_why.EVIT, 0.3))[1]
    shuffled = model.encode_image_with_trace(x, PruneSpec(evit_why.SHUFFLED, 0.3))[1]
    bare = model.encode_image_with_trace(x, PruneSpec(evit_why.NO_FUSION, 0.3))[1]
    assert shuffled.stage_blocks == evit.stage_blocks == bare.stage_blocks  # EViT's own blocks
    assert shuffled.tokens_per_stage() == evit.tokens_per_stage()  # same counts, a fused token included
    assert [n + 1 for n in bare.tokens_per_stage()[1:]] == evit.tokens_per_stage()[1:]  # no fused token
    assert not torch.equal(shuffled.stages[0].kept, evit.stages[0].kept)  # other patches chosen
    assert torch.equal(bare.stages[0].kept, evit.stages[0].kept[:, :-1])  # the same patches; -1 is the fused token
    for m in (evit_why.SHUFFLED, evit_why.NO_FUSION):  # keep 1 prunes nothing
        assert torch.equal(model.encode_image(x, PruneSpec(m, 1.0)), model.encode_image(x))


def test_main_prints_the_table_and_writes_the_figure(ablations, tmp_path: Path, capsys) -> None:
    data, ckpt = _tiny_checkpoints(tmp_path)
    out = tmp_path / "evit.png"
    assert evit_why.main(["--checkpoints", str(ckpt), "--data", str(data), "--limit", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 10_000
    for label in ("CLS attention (EViT)", "EViT, random scores", "EViT, no fused token", "Random", "No pruning"):
        assert label in text
    lines = text.splitlines()
    start = lines.index("block  CLS attention on objects  chance  entropy") + 1
    blocks = [line.split() for line in lines[start : start + 5]]
    assert blocks[4] == []  # four blocks, then the blank line
    assert [int(b[0]) for b in blocks[:4]] == [0, 1, 2, 3]  # one row per block of the tiny ViT
    assert all(0.0 <= float(v) <= 1.0 for b in blocks[:4] for v in b[1:])
