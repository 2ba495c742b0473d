"""Trained keep predictors for a HuggingFace CLIP, kept in a small add-on folder beside it.

A CLIP checkpoint has no keep predictors, so ``learned`` and ``text_guided`` pruning cannot
run on it.
``python -m training.train --backbone SOURCE --out DIR`` trains them with both towers
frozen and writes DIR with `save_addon`. DIR holds two small files and no backbone weight:

- ``predictors.safetensors``: the ``visual.predictors.*`` tensors (``learned``) and the
  ``visual.query_predictors.*`` tensors (``text_guided``'s caption-conditioned ones), nothing else;
- ``predictors.json``: the backbone (``source``: a Hub id with the revision asked for
  and the commit the Hub resolved, or a local folder relative to DIR), the predictors'
  stages and hidden width, whether ``text_guided``'s are in (``query``; absent in an
  add-on saved before they existed, which then runs ``learned`` only), the backbone's
  image encoder they fit, and the training facts.

`load_backbone` reads a plain CLIP or an add-on alike: for an add-on it finds the
backbone again (a Hub id at its recorded commit), loads it with the add-on's stages and
puts the predictors in. No path in ``predictors.json`` is absolute, so the add-on and its
backbone can move together.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import hf_clip
from .config import PruningConfig, VisionConfig
from .hub import looks_like_repo_id, pull, split_revision
from .model import PREDICTOR_PREFIXES, DualEncoder, _check_weights, atomic_folder

ADDON_FILE = "predictors.json"
PREDICTORS_FILE = "predictors.safetensors"
ADDON_FILES = (ADDON_FILE, PREDICTORS_FILE)  # all an add-on holds, and what a Hub download of one fetches
FORMAT = "vlm_demo/keep-predictors"  # ``format`` in predictors.json
VERSION = 1  # ``version`` in predictors.json
VISION_KEYS = ("image_size", "patch_size", "width", "depth")  # the image encoder the predictors were trained on
_COMMIT = re.compile(r"[0-9a-f]{40}")


def train_command(source: str) -> str:
    """The command line that trains keep predictors for the backbone `source`."""
    return f"python -m training.train --backbone {source} --out DIR"


@dataclass(frozen=True)
class BackboneRef:
    """Where a HuggingFace CLIP (or an add-on) came from, and where its files are."""

    source: str  # as given: a local folder, or a Hub id ``owner/name`` (the revision apart)
    folder: Path  # the local files; for a Hub id, its snapshot in the Hub cache
    hub: bool = False  # `source` is a Hub id
    revision: str | None = None  # the Hub revision asked for (branch, tag, ``refs/pr/N``); None: the default branch
    commit: str | None = None  # the commit the Hub resolved it to, when known

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (predictors.json, metrics.json): the source, and the Hub's revision and commit."""
        return {"source": self.source, "hub": self.hub, "revision": self.revision, "commit": self.commit}


def locate(
    source: str | os.PathLike, allow_patterns: Sequence[str] = (*hf_clip.HUB_FILES, *ADDON_FILES)
) -> BackboneRef:
    """Where `source` is: an existing local path as it is, else a Hub id ``owner/name[@revision]``, downloaded.

    Args:
        source: a local folder, or a Hub id.
        allow_patterns: the files of a Hub repository to fetch.

    Returns:
        The `BackboneRef`; its folder may not exist (the caller says what it expected).

    Raises:
        ConnectionError: when a Hub repository cannot be fetched.
    """
    src = str(source)
    if not Path(src).exists() and looks_like_repo_id(src):
        repo_id, revision = split_revision(src)
        folder = pull(repo_id, revision, allow_patterns=list(allow_patterns))
        # huggingface_hub's snapshot folders are named after the commit they hold.
        commit = folder.name if _COMMIT.fullmatch(folder.name) else None
        return BackboneRef(repo_id, folder, hub=True, revision=revision, commit=commit)
    return BackboneRef(src, Path(src).expanduser())


def is_addon(folder: str | os.PathLike) -> bool:
    """True if `folder` holds a keep-predictor add-on (``predictors.json``)."""
    return (Path(folder) / ADDON_FILE).is_file()


@dataclass
class Backbone:
    """A HuggingFace CLIP, with trained keep predictors when it came from an add-on."""

    clip: hf_clip.ClipCheckpoint  # model (eval mode), tokenizer, preprocessing
    ref: BackboneRef  # the CLIP's own source
    addon: Path | None = None  # the add-on folder the predictors came from; None for a plain CLIP
    training: dict[str, Any] = field(default_factory=dict)  # the add-on's training facts

    @property
    def has_predictors(self) -> bool:
        return self.addon is not None


def load_backbone(source: str | os.PathLike | BackboneRef, device: str | torch.device = "cpu") -> Backbone:
    """Load a HuggingFace CLIP, or an add-on's backbone with its trained keep predictors in it.

    Args:
        source: a CLIP folder or Hub id, an add-on folder or Hub id, or a `locate` result.
        device: where to put the model.

    Returns:
        The `Backbone`.

    Raises:
        ValueError: `source` is neither, or an add-on does not fit its backbone.
        ConnectionError: when a Hub repository cannot be fetched.
    """
    ref = source if isinstance(source, BackboneRef) else locate(source)
    if is_addon(ref.folder):
        return _load_addon(ref.folder, device)
    if not ref.folder.is_dir():
        raise ValueError(f"{ref.source} is no folder, nor a Hub id owner/name[@revision]; name a HuggingFace CLIP.")
    if not hf_clip.is_clip_folder(ref.folder):
        raise ValueError(
            f"{ref.source} is not a HuggingFace CLIP (a folder whose config.json has model_type clip, or a Hub id "
            f"owner/name[@revision]) nor a keep-predictor add-on (a folder with {ADDON_FILE})."
        )
    return Backbone(hf_clip.load_clip(ref.folder, device), ref)


def _load_addon(folder: Path, device: str | torch.device) -> Backbone:
    config = read_config(folder)
    entry, pred = config["backbone"], config["predictors"]
    if entry["hub"]:  # fetched at the commit the predictors were trained on
        pin = entry.get("commit") or entry.get("revision")
        ref = replace(locate(f"{entry['source']}@{pin}" if pin else entry["source"]), revision=entry.get("revision"))
    else:  # a local backbone sits where it sat, relative to the add-on
        ref = BackboneRef(entry["source"], folder / entry["source"])
    if not hf_clip.is_clip_folder(ref.folder):
        raise ValueError(
            f"{folder / ADDON_FILE} names the backbone {entry['source']}, and no HuggingFace CLIP is at "
            f"{ref.folder}. Move the add-on and its backbone together, or train the predictors again."
        )
    pruning = PruningConfig(
        stages=tuple(pred["stages"]), predictor_hidden=pred["hidden"], query_predictors=pred.get("query", False),
        query_mlp=pred.get("query_mlp", False),  # an add-on written before the caption MLP has a linear one
    )
    clip = hf_clip.load_clip(ref.folder, device, pruning)
    vision = {k: getattr(clip.model.cfg.vision, k) for k in VISION_KEYS}
    if vision != entry["vision"]:
        raise ValueError(
            f"{folder} was trained on an image encoder {entry['vision']}, but {entry['source']} now has {vision}: "
            f"the backbone changed. Train its predictors again: {train_command(entry['source'])}."
        )
    load_predictors(clip.model, folder / PREDICTORS_FILE, folder / ADDON_FILE)
    return Backbone(clip, ref, addon=folder, training=config.get("training", {}))


def read_config(folder: Path) -> dict[str, Any]:
    """The checked predictors.json of the add-on in `folder`."""
    path = folder / ADDON_FILE
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); train the predictors again.") from error
    problem = _config_problem(config)
    if problem:
        raise ValueError(f"{path} is not a keep-predictor add-on vlm_demo reads: {problem}.")
    return config


def _config_problem(config: Any) -> str:
    """What is wrong with a parsed predictors.json, or ``""``."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        return f"its format is not {FORMAT!r}"
    if config.get("version") != VERSION:
        return f"version {config.get('version')!r}; this vlm_demo reads version {VERSION}"
    entry = config.get("backbone") if isinstance(config.get("backbone"), dict) else {}
    pred = config.get("predictors") if isinstance(config.get("predictors"), dict) else {}
    if not isinstance(entry.get("source"), str) or not isinstance(entry.get("hub"), bool):
        return "backbone.source (text) and backbone.hub (true or false) are required"
    if not isinstance(entry.get("vision"), dict):
        return "backbone.vision is required"
    stages, hidden = pred.get("stages"), pred.get("hidden")
    if not isinstance(stages, list) or not all(isinstance(s, int) for s in stages) or not isinstance(hidden, int):
        return "predictors.stages (block indices) and predictors.hidden (a width) are required"
    for key in ("query", "query_mlp"):
        if not isinstance(pred.get(key, False), bool):
            return f"predictors.{key} must be true or false"
    return ""


def load_predictors(model: DualEncoder, path: Path, config_path: Path) -> None:
    """Put the keep predictors saved in `path` into `model`, checking names, shapes and values first."""
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if n.startswith(PREDICTOR_PREFIXES)}
    _check_weights(path, expected, config_path)
    tensors = load_file(str(path))
    for name, tensor in tensors.items():
        if not np.isfinite(tensor.float().numpy()).all():
            raise ValueError(f"{path}: tensor {name} holds NaN or infinite values; train the predictors again.")
    model.load_state_dict(tensors, strict=False)  # exactly the predictors' tensors: checked above


def check_destination(folder: str | os.PathLike, spare: Sequence[str] = ()) -> None:
    """Refuse to write an add-on over anything but an add-on: it replaces the whole folder.

    Args:
        folder: where the add-on will go.
        spare: names that may be in it all the same (training's resume state).

    Raises:
        ValueError: `folder` is a file, or a folder that holds anything but an add-on's files
            (a backbone, the shipped checkpoints, anything else).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file; name a folder for the add-on.")
    other = sorted(p.name for p in folder.iterdir() if p.name not in {*ADDON_FILES, *spare}) if folder.is_dir() else []
    if other:
        raise ValueError(
            f"--out {folder} holds {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}, not only a keep-predictor "
            "add-on, and writing one replaces the whole folder; name a new folder."
        )


def save_addon(folder: str | os.PathLike, model: DualEncoder, ref: BackboneRef, training: dict[str, Any]) -> Path:
    """Write the keep predictors of `model` and what they belong to, atomically (see `atomic_folder`).

    Args:
        folder: the add-on folder (replaced whole; see `check_destination`).
        model: the backbone with its trained predictors.
        ref: where the backbone came from.
        training: JSON-ready training facts, with no absolute path.

    Returns:
        The folder.
    """
    folder = Path(folder)
    entry = ref.to_dict()
    if not ref.hub:  # relative to the add-on, so that both can move together; never absolute
        entry["source"] = Path(os.path.relpath(ref.folder.resolve(), folder.resolve())).as_posix()
    vision: VisionConfig = model.cfg.vision
    entry["vision"] = {k: getattr(vision, k) for k in VISION_KEYS}
    config = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": entry,
        "predictors": {
            "stages": list(model.cfg.pruning.stages),
            "hidden": model.cfg.pruning.predictor_hidden,
            "query": bool(len(model.visual.query_predictors)),  # text_guided's caption-conditioned predictors
            "query_mlp": model.cfg.pruning.query_mlp,
            "width": vision.width,
            "file": PREDICTORS_FILE,
        },
        "training": training,
    }
    tensors = {
        n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n.startswith(PREDICTOR_PREFIXES)
    }
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / PREDICTORS_FILE))
        (tmp / ADDON_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder
