"""Checkpoint integrity: a damaged checkpoint gets a ValueError that names the file and the problem,
no pickle is ever unpickled, and a checkpoint being written is never visible half-written."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_demo import api
from vlm_demo.config import get_preset
from vlm_demo.model import CONFIG_FILE, WEIGHTS_FILE, DualEncoder, load_checkpoint, save_checkpoint
from vlm_demo.tokenizer import VOCAB_FILE, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a small red circle at the top left", "a large blue square in the center"]


def tiny(seed: int) -> DualEncoder:
    torch.manual_seed(seed)
    return DualEncoder(get_preset("tiny").model)


def tokenizer() -> Tokenizer:
    return Tokenizer.build(CAPTIONS, get_preset("tiny").model.text.context_length)


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a checkpoint folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def load_error(folder: Path, file: str) -> str:
    """The ValueError message of loading `folder`, which must name `folder / file`."""
    with pytest.raises(ValueError) as info:
        load_checkpoint(folder)
    message = str(info.value)
    assert str(folder / file) in message, message
    return message


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, bytes]]:
    """The files of three different checkpoints, saved by this process (seeds 0, 1, 2)."""
    root = tmp_path_factory.mktemp("versions")
    for v in range(3):
        save_checkpoint(tiny(v), tokenizer(), root / f"v{v}", version=v)
    return [files(root / f"v{v}") for v in range(3)]


@pytest.fixture()
def ck(tmp_path: Path, versions: list[dict[str, bytes]]) -> Path:
    """A good checkpoint (version 0) to damage."""
    folder = tmp_path / "ck"
    folder.mkdir()
    for name, data in versions[0].items():
        (folder / name).write_bytes(data)
    return folder


def edit(path: Path, old: bytes, new: bytes) -> None:
    """Replace the first `old` in a file (same length, so offsets stay valid)."""
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    path.write_bytes(data.replace(old, new, 1))


def header_size(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]  # u64 length, then the JSON header


def test_a_good_copy_loads(ck):
    model, tok = load_checkpoint(ck)
    assert torch.equal(model.logit_scale, tiny(0).logit_scale) and tok.itos == tokenizer().itos


# ----------------------------------------------------------------------------- model.safetensors


@pytest.mark.parametrize("keep", [0, 4, 8, 100, 0.5, -1])
def test_truncated_weights(ck, keep):
    path = ck / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep % len(data)])
    assert "is truncated or corrupt" in load_error(ck, WEIGHTS_FILE)


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (b"\x00\x00\x00\x00", b"\x00\x00\x00\x01", "is truncated or corrupt"),  # the header length
        (b'{"logit_scale"', b'\xff"logit_scale"', "is truncated or corrupt"),  # not UTF-8
        (b'"dtype":"F32"', b'"dtype":"F3\x00"', "is truncated or corrupt"),  # an unknown dtype
        (b'"data_offsets":[0,4]', b'"data_offsets":[0,5]', "is truncated or corrupt"),  # offsets off by one
        (b'"logit_scale"', b'"logit_scalf"', r"missing \(logit_scale\).*unexpected tensor\(s\) \(logit_scalf\)"),
        (b'"shape":[32,32],"data_offsets":[132,', b'"shape":[16,64],"data_offsets":[132,',
         r"wrong shape \(text.blocks.0.attn.proj.weight is \[16, 64\], not \[32, 32\]\)"),
    ],
)  # fmt: skip
def test_corrupt_header(ck, old, new, problem):
    edit(ck / WEIGHTS_FILE, old, new)
    assert re.search(problem, load_error(ck, WEIGHTS_FILE))


def test_flipped_tensor_data_goes_unnoticed_by_design(ck):
    # safetensors stores no checksum: a flipped mantissa bit is a valid float, and loads.
    path = ck / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[header_size(path) + 4] ^= 0x01  # the lowest bit of the first weight after logit_scale
    path.write_bytes(bytes(data))
    model, _ = load_checkpoint(ck)
    before, after = tiny(0).state_dict(), model.state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == ["text.blocks.0.attn.proj.bias"]


def test_non_finite_tensor_data_is_caught(ck):
    path = ck / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    start = header_size(path)
    data[start : start + 4] = struct.pack("<f", float("nan"))  # logit_scale, the first tensor
    path.write_bytes(bytes(data))
    assert "tensor logit_scale holds NaN or infinite values" in load_error(ck, WEIGHTS_FILE)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_tensor(ck, change):
    path = ck / WEIGHTS_FILE
    tensors = load_file(path)
    if change == "missing":
        del tensors["visual.cls_token"]
    else:
        tensors["visual.extra"] = torch.zeros(3)
    save_file(tensors, path)
    message = load_error(ck, WEIGHTS_FILE)
    assert f"does not match {ck / CONFIG_FILE}" in message
    expected = {"missing": "1 tensor(s) missing (visual.cls_token)", "extra": "1 unexpected tensor(s) (visual.extra)"}
    assert expected[change] in message


# ----------------------------------------------------------------------------- config.json


@pytest.mark.parametrize(
    ("tower", "key", "delta", "problem"),
    [
        ("vision", "width", 32, r"\d+ tensor\(s\) of the wrong shape \(.*is \[32\], not \[64\]"),
        ("vision", "depth", 1, r"\d+ tensor\(s\) missing \(visual.blocks.4."),
        ("text", "depth", -1, r"\d+ unexpected tensor\(s\) \(text.blocks.0."),
        ("text", "vocab_size", 1, r"text.token_embed.weight is \[\d+, 32\], not \[\d+, 32\]"),
    ],
)
def test_config_that_does_not_match_the_weights(ck, tower, key, delta, problem):
    config = json.loads((ck / CONFIG_FILE).read_text())
    config[tower][key] += delta
    (ck / CONFIG_FILE).write_text(json.dumps(config))
    message = load_error(ck, WEIGHTS_FILE)
    assert str(ck / CONFIG_FILE) in message and re.search(problem, message), message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"vision": {"width": 32', "is not valid JSON"),
        ('{"vision": {"width": "wide"}}', "does not describe a model vlm_demo can build"),
        ('{"colour": "blue"}', "does not describe a model vlm_demo can build: .*'colour'"),
        ("[1, 2, 3]", "does not describe a model vlm_demo can build"),
    ],
)
def test_config_that_is_not_a_config(ck, text, problem):
    (ck / CONFIG_FILE).write_text(text)
    assert re.search(problem, load_error(ck, CONFIG_FILE))


# ----------------------------------------------------------------------------- vocab.json


def test_missing_vocabulary(ck):
    (ck / VOCAB_FILE).unlink()
    assert "is not a checkpoint folder: vocab.json missing" in load_error(ck, "")


@pytest.mark.parametrize("text", ["{", "{}", '{"itos": "abc", "context_length": 16}', "[]"])
def test_vocabulary_that_is_not_a_vocabulary(ck, text):
    (ck / VOCAB_FILE).write_text(text)
    assert "is not a vocabulary written by vlm_demo" in load_error(ck, VOCAB_FILE)


def test_vocabulary_too_big_for_the_model(ck):
    config = json.loads((ck / CONFIG_FILE).read_text())
    words = [f"w{i}" for i in range(config["text"]["vocab_size"])]
    Tokenizer(words, config["text"]["context_length"]).save(ck)
    message = load_error(ck, VOCAB_FILE)
    assert f"does not fit {ck / CONFIG_FILE}" in message and f"room for {config['text']['vocab_size']} words" in message


# ----------------------------------------------------------------------------- pickles


class Payload:
    """Unpickling it creates `path`: proof that something was unpickled."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture()
def sentinel(tmp_path: Path) -> Path:
    return tmp_path / "UNPICKLED"


def test_the_payload_would_be_noticed(tmp_path, sentinel):
    # Without this, the tests below could pass with a payload that does nothing.
    pickle.loads(pickle.dumps(Payload(tmp_path / "a")))
    torch.save(Payload(tmp_path / "b"), tmp_path / "b.bin")
    torch.load(tmp_path / "b.bin", weights_only=False)
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_a_pickle_instead_of_safetensors_is_refused_unopened(ck, sentinel, name):
    (ck / WEIGHTS_FILE).unlink()
    torch.save(Payload(sentinel), ck / name)
    message = load_error(ck, name)
    assert "is a pickle, which vlm_demo never loads" in message and f"has no {WEIGHTS_FILE}" in message
    with pytest.raises(ValueError, match="is a pickle"):
        api.load(_as_checkpoints_root(ck))
    assert not sentinel.exists()


def test_a_pickle_named_model_safetensors_is_refused_unopened(ck, sentinel):
    (ck / WEIGHTS_FILE).write_bytes(pickle.dumps(Payload(sentinel)))
    assert "is truncated or corrupt" in load_error(ck, WEIGHTS_FILE)
    assert not sentinel.exists()


def test_a_pickle_beside_the_safetensors_is_ignored(ck, sentinel):
    torch.save(Payload(sentinel), ck / "pytorch_model.bin")
    model, _ = load_checkpoint(ck)
    assert torch.equal(model.logit_scale, tiny(0).logit_scale)
    assert not sentinel.exists()


def test_no_other_unpickling_call_in_the_library():
    # test_model.py checks for torch.load; these are the other ways in.
    calls = ["pickle.load", "Unpickler", "weights_only=False", "allow_pickle=True", "_load_as_pickle", "joblib.load"]
    for path in [*ROOT.glob("vlm_demo/*.py"), *ROOT.glob("training/*.py"), ROOT / "app.py"]:
        text = path.read_text()
        assert not [c for c in calls if c in text], path


def _as_checkpoints_root(ck: Path) -> Path:
    root = ck.parent / "root"
    root.mkdir()
    shutil.copytree(ck, root / "baseline")
    return root


# ----------------------------------------------------------------------------- atomic writes

# Builds three versions once, then forks a writer per command (so each kill costs no torch
# import): "save FOLDER V" saves version V; "loop FOLDER" saves versions 0, 1, 2, 0, ... until
# killed; "crash FOLDER V N before|after" saves V but dies at the N-th os.rename, as SIGKILL
# would (no cleanup runs). For each command it prints the writer's pid, then "done" once reaped.
WRITER = textwrap.dedent(
    f"""
    import itertools, os, sys
    import torch
    torch.set_num_threads(1)  # no OpenMP pool in the parent: forking is safe
    from vlm_demo.config import get_preset
    from vlm_demo.model import DualEncoder, save_checkpoint
    from vlm_demo.tokenizer import Tokenizer

    tok = Tokenizer.build({CAPTIONS!r}, get_preset("tiny").model.text.context_length)
    versions = []
    for seed in range(3):
        torch.manual_seed(seed)
        versions.append(DualEncoder(get_preset("tiny").model))

    def die_at_rename(n, after):
        real, calls = os.rename, []
        def rename(src, dst):
            calls.append(src)
            if len(calls) == n and not after:
                os._exit(137)
            real(src, dst)
            if len(calls) == n and after:
                os._exit(137)
        os.rename = rename

    print("ready", flush=True)
    for line in sys.stdin:
        command, folder, *args = line.split()
        pid = os.fork()
        if pid == 0:
            if command == "loop":
                for i in itertools.count():
                    save_checkpoint(versions[i % 3], tok, folder, version=i % 3)
            if command == "crash":
                die_at_rename(int(args[1]), args[2] == "after")
            save_checkpoint(versions[int(args[0])], tok, folder, version=int(args[0]))
            os._exit(0)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("done", flush=True)
    """
)


class Writer:
    """The test's side of `WRITER`."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.line() == "ready"

    def line(self, timeout: float = 120.0) -> str:
        # select first, so that a stuck writer fails the test instead of hanging it
        assert select.select([self.proc.stdout], [], [], timeout)[0], "the writer stopped answering"
        return self.proc.stdout.readline().strip()

    def send(self, command: str) -> int:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return int(self.line())

    def run(self, command: str) -> None:
        self.send(command)
        assert self.line() == "done"


@pytest.fixture(scope="module")
def writer() -> Iterator[Writer]:
    w = Writer()
    yield w
    w.proc.stdin.close()
    w.proc.wait(timeout=60)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def test_sigkill_at_random_moments_never_leaves_a_partial_checkpoint(tmp_path, writer, versions):
    folder = tmp_path / "ck"
    rng = random.Random(20240611)
    kills_mid_write = 0
    for _ in range(6):
        pid = writer.send(f"loop {folder}")
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        assert writer.line() == "done"
        if folder.exists():
            assert files(folder) in versions  # bit for bit one of the versions written
            load_checkpoint(folder)  # and it loads completely
        left = leftovers(folder)
        # Killed writers leave only hidden folders, never one named like a checkpoint.
        assert all(re.fullmatch(r"\.ck\.(tmp-\d+-\w+|old)", name) for name in left), left
        kills_mid_write += any(".tmp-" in name for name in left)
    assert kills_mid_write > 0, "no kill landed during a write: the test proved nothing"
    writer.run(f"save {folder} 2")
    assert files(folder) == versions[2]
    assert leftovers(folder) == []  # the next save removed what the killed writers left


@pytest.mark.parametrize(
    ("rename", "when", "state"),
    [
        (1, "before", "old"),  # the new version complete in a temporary folder, not yet swapped in
        (2, "before", "none"),  # between the two renames: no folder, the previous one in .ck.old
        (2, "after", "new"),  # swapped in, the previous one not yet removed
    ],
)
def test_killed_at_each_rename(tmp_path, writer, versions, rename, when, state):
    folder = tmp_path / "ck"
    writer.run(f"save {folder} 0")
    writer.run(f"crash {folder} 1 {rename} {when}")
    left = leftovers(folder)
    if state == "none":
        assert not folder.exists()
        old = folder.with_name(".ck.old")
        assert files(old) == versions[0]
        message = load_error(folder, "")
        assert f"it does not exist. A save into it was interrupted; the previous checkpoint is in {old}" in message
    else:
        assert files(folder) == versions[0 if state == "old" else 1]
    assert left and all(name.startswith(".ck.") for name in left), left
    with pytest.raises(ValueError, match="has no baseline/ checkpoint"):
        api.load(tmp_path)  # the hidden leftovers are not taken for a checkpoint
    writer.run(f"save {folder} 2")
    assert files(folder) == versions[2] and leftovers(folder) == []
