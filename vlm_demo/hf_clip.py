"""Pretrained HuggingFace CLIP checkpoints, run by this project's own model code.

A HuggingFace CLIP folder (``config.json`` with ``"model_type": "clip"``,
``model.safetensors``, ``tokenizer.json`` and optionally ``preprocessor_config.json``)
becomes a `DualEncoder` whose outputs equal transformers' ``CLIPModel``
(``get_image_features`` / ``get_text_features``), so every pruning method, trace,
FLOP count and latency measurement runs on it unchanged:

- `model_config` maps transformers' config to a `ModelConfig` (pre-norm, quick GELU,
  no patch bias, causal text attention pooled at the end-of-text token);
- `load_clip` maps the tensors by name (q, k and v fused into one ``qkv``) with a
  strict check: every tensor of the model is filled but the keep predictors (``learned``'s
  and ``text_guided``'s caption-conditioned ones), which stay randomly initialised
  (untrained) and are reported in `ClipCheckpoint.untrained` (`vlm_demo.addon` trains
  them and loads them back);
- `ClipTokenizer` encodes as transformers' ``CLIPTokenizerFast`` does;
- `preprocess_config` reads the image processor's resize, crop and normalisation.

Weights are read with ``safetensors`` only. Nothing is ever unpickled: a folder whose
weights exist only as ``pytorch_model.bin`` (or another pickle) is refused unopened.
A local folder never touches the network; Hub ids go through `vlm_demo.hub.pull`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import processors

from .config import ACTIVATIONS, ModelConfig, PruningConfig, TextConfig, VisionConfig
from .model import CONFIG_FILE, PICKLE_SUFFIXES, PREDICTOR_PREFIXES, WEIGHTS_FILE, DualEncoder, _some
from .pruning import quarter_points
from .tokenizer import CaptionFit
from .transforms import MEAN, STD, Preprocess

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
HUB_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, PREPROCESSOR_FILE)  # all that a Hub download fetches
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # transformers' CLIPTokenizer defaults

# transformers' CLIPTextConfig / CLIPVisionConfig defaults: config.json omits values equal to them.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}  # fmt: skip
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip
# transformers' CLIPImageProcessor defaults, used for keys preprocessor_config.json leaves out.
PROCESSOR_DEFAULTS: dict[str, Any] = {
    "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
    "image_mean": list(MEAN), "image_std": list(STD), "rescale_factor": 1 / 255, "do_resize": True,
    "do_center_crop": True, "do_rescale": True, "do_normalize": True,
}  # fmt: skip
# Non-persistent buffers that older exports still hold; the model rebuilds them.
IGNORED_SUFFIXES = ("embeddings.position_ids",)
SAFETENSORS_HINT = (
    "Use a revision that has model.safetensors: on the Hub, the model page's pull request "
    "'Adding `safetensors` variant of this model' is the revision owner/name@refs/pr/N; or convert the weights "
    "yourself in an environment you trust (CLIPModel.from_pretrained(...).save_pretrained(folder))."
)


@dataclass(frozen=True)
class Published:
    """A cost figure a model's authors or a model zoo publish, in GMACs (their GFLOPs halved where FLOPs = 2 MACs)."""

    towers: str  # what it counts: "image", "text" or "image+text"
    gmacs: float
    source: str  # where the figure is printed, and how it was converted


@dataclass(frozen=True)
class ClipShape:
    """A published CLIP architecture, to build with random weights (no download) and measure."""

    hub_id: str  # the HuggingFace repository whose config.json this restates
    config: dict[str, Any]  # its architecture as a config.json dict (`model_config` maps it)
    published: tuple[Published, ...] = ()  # cost figures to reconcile with the count


# Named CLIP shapes for `python -m vlm_demo.bench --config NAME`: the architecture fields of each
# model's config.json (the rest take transformers' defaults, as in `model_config`). Costs do not
# depend on the activation, the eps or the token ids.
CLIP_SHAPES: dict[str, ClipShape] = {
    "tinyclip-8m-16": ClipShape(
        hub_id="wkcn/TinyCLIP-ViT-8M-16-Text-3M-YFCC15M",
        config={
            "model_type": "clip", "projection_dim": 512,
            "vision_config": {
                "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 10, "num_attention_heads": 4,
                "patch_size": 16, "image_size": 224, "hidden_act": "gelu",
            },
            # TinyCLIP trained in open_clip without quick_gelu (its model config does not ask for it), so
            # nn.GELU, "gelu" in transformers' terms; the ONNX export of this checkpoint says "gelu" too.
            "text_config": {
                "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 4,
                "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu",
            },
        },
        published=(
            Published("image+text", 2.0, "TinyCLIP model card / README table, 'MACs (G)' 2.0"),
        ),
    ),
    "vit-b-16": ClipShape(
        hub_id="openai/clip-vit-base-patch16",
        config={
            "model_type": "clip", "projection_dim": 512,
            "vision_config": {
                "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "patch_size": 16, "image_size": 224, "hidden_act": "quick_gelu",
            },
            "text_config": {
                "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
                "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "eos_token_id": 2,
            },
        },
        published=(
            Published("image", 35.13 / 2, "open_clip docs/model_profile.csv, ViT-B-16 image_gflops 35.13 (= 2 x MACs)"),
            Published("text", 5.96 / 2, "open_clip docs/model_profile.csv, ViT-B-16 text_gflops 5.96 (= 2 x MACs)"),
        ),
    ),
}  # fmt: skip

@dataclass
class ClipCheckpoint:
    """A loaded HuggingFace CLIP."""

    model: DualEncoder  # in eval mode
    tokenizer: "ClipTokenizer"
    preprocess: Preprocess  # the image processor's resize, crop and normalisation
    untrained: list[str]  # parameters the checkpoint does not hold (both kinds of keep predictors): random, untrained


def is_clip_folder(folder: str | os.PathLike) -> bool:
    """True if `folder` holds a config.json whose ``model_type`` is ``clip``."""
    path = Path(folder) / CONFIG_FILE
    try:
        return path.is_file() and json.loads(path.read_text()).get("model_type") == "clip"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def model_config(hf: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
    """Map transformers' CLIPConfig (as a config.json dict) to a `ModelConfig`.

    Args:
        hf: the parsed config.json.
        source: where it came from, for error messages.

    Returns:
        The config of the `DualEncoder` that computes what ``CLIPModel`` computes.

    Raises:
        ValueError: for an architecture the project's model cannot express.
    """
    text, vision = _sub_config(hf, "text", TEXT_DEFAULTS), _sub_config(hf, "vision", VISION_DEFAULTS)
    for name, sub in (("text_config", text), ("vision_config", vision)):
        if sub["hidden_act"] not in ACTIVATIONS:
            raise ValueError(
                f"{source}: {name}.hidden_act is {sub['hidden_act']!r}; vlm_demo runs {', '.join(ACTIVATIONS)}."
            )
    for key in ("image_size", "patch_size"):
        if not isinstance(vision[key], int):
            raise ValueError(f"{source}: vision_config.{key} must be one integer (square images and patches).")
    if vision["num_channels"] != 3:
        raise ValueError(f"{source}: vision_config.num_channels is {vision['num_channels']}; only RGB (3) runs.")
    if not isinstance(text["eos_token_id"], int):
        raise ValueError(f"{source}: text_config.eos_token_id must be one integer, not {text['eos_token_id']!r}.")
    size = {"image_size": vision["image_size"], "patch_size": vision["patch_size"]}
    v = VisionConfig(**size, patch_bias=False, pre_norm=True, **_tower(vision))
    t = TextConfig(
        vocab_size=text["vocab_size"],
        context_length=text["max_position_embeddings"],
        causal=True,
        pool="eos",
        eos_token_id=text["eos_token_id"],
        pad_id=None,
        **_tower(text),
    )
    return ModelConfig(
        vision=v,
        text=t,
        pruning=PruningConfig(stages=quarter_points(v.depth)),  # DynamicViT: before blocks 3, 6, 9 of 12
        embed_dim=hf.get("projection_dim", 512),
        init_logit_scale=hf.get("logit_scale_init_value", 2.6592),
    )


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a HuggingFace CLIP ``config.json`` (or of the folder holding one); reads nothing else.

    Raises:
        FileNotFoundError: when there is no such file.
        ValueError: for a file that is not a CLIP config, or an architecture `model_config` refuses.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file: give a HuggingFace CLIP config.json or its folder.")
    hf = _read_json(path)
    if hf.get("model_type") != "clip":
        raise ValueError(
            f"{path} is not a HuggingFace CLIP config: its model_type is {hf.get('model_type')!r}, not 'clip'."
        )
    return model_config(hf, str(path))


def _tower(sub: dict[str, Any]) -> dict[str, Any]:
    """The fields both towers share, from a CLIPTextConfig or CLIPVisionConfig dict."""
    return {
        "width": sub["hidden_size"],
        "depth": sub["num_hidden_layers"],
        "heads": sub["num_attention_heads"],
        "mlp_hidden": sub["intermediate_size"],
        "act": sub["hidden_act"],
        "layer_norm_eps": sub["layer_norm_eps"],
    }


def _sub_config(hf: dict[str, Any], tower: str, defaults: dict[str, Any]) -> dict[str, Any]:
    # As CLIPConfig does: a legacy "<tower>_config_dict" (with defaults filled) wins over "<tower>_config".
    legacy = hf.get(f"{tower}_config_dict")
    return {**defaults, **(legacy if legacy is not None else hf.get(f"{tower}_config") or {})}


def preprocess_config(data: dict[str, Any] | None, image_size: int, source: str = PREPROCESSOR_FILE) -> Preprocess:
    """Map a CLIPImageProcessor config to a `Preprocess`.

    Args:
        data: the parsed preprocessor_config.json; None when the folder has none, which
            resizes the shorter side to the model's image size and normalises with CLIP's mean and std.
        image_size: the model's input side (the crop must equal it).
        source: where `data` came from, for error messages.

    Returns:
        The preprocessing.

    Raises:
        ValueError: for settings this library does not implement.
    """
    if data is None:
        return Preprocess(image_size, shortest_edge=image_size)
    d = {**PROCESSOR_DEFAULTS, **data}
    off = [k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if not d[k]]
    if off or not math.isclose(d["rescale_factor"], 1 / 255):
        raise ValueError(
            f"{source}: vlm_demo implements CLIP's resize, centre crop, rescale by 1/255 and normalisation; "
            f"this file sets {', '.join(off) or 'rescale_factor'} differently. Use CLIP's preprocessing settings."
        )
    # Older files give plain integers; transformers reads them as a shortest edge and a square crop.
    size, crop = d["size"], d["crop_size"]
    shortest = size if isinstance(size, int) else size.get("shortest_edge")
    crop_hw = (crop, crop) if isinstance(crop, int) else (crop.get("height"), crop.get("width"))
    if shortest is None or crop_hw != (image_size, image_size):
        raise ValueError(
            f"{source}: size {size} and crop_size {crop} are not a shortest-edge resize and a centre crop of "
            f"{image_size} x {image_size}, the model's image size."
        )
    return Preprocess(
        image_size,
        shortest_edge=shortest,
        resample=d["resample"],
        mean=tuple(d["image_mean"]),
        std=tuple(d["image_std"]),
    )


class ClipTokenizer:
    """CLIP's byte-level BPE, read from a tokenizer.json with the ``tokenizers`` library.

    The ids equal ``transformers.CLIPTokenizerFast(tokenizer_file=...)`` called with
    ``padding="max_length", truncation=True, max_length=context_length``: like it, every
    caption is wrapped in <|startoftext|> ... <|endoftext|> whatever post-processor the
    file names, truncation keeps the closing <|endoftext|>, and padding repeats it.

    Args:
        path: the tokenizer.json.
        context_length: ids per caption (the model's max_position_embeddings).
    """

    def __init__(self, path: str | os.PathLike, context_length: int):
        try:
            tokenizer = RustTokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises a bare Exception for any malformed file
            raise ValueError(f"{path} is not a tokenizer.json the tokenizers library can read: {error}") from error
        ids = {token: tokenizer.token_to_id(token) for token in (BOS, EOS)}
        if None in ids.values():
            raise ValueError(f"{path} lacks CLIP's special tokens {BOS} and {EOS}: is it a CLIP tokenizer?")
        # What CLIPTokenizerFast does on loading: the specials become added tokens, matched whole in any
        # caption, and its own post-processor replaces the file's.
        tokenizer.add_special_tokens([BOS, EOS])
        tokenizer.post_processor = processors.RobertaProcessing(
            (EOS, ids[EOS]), (BOS, ids[BOS]), trim_offsets=False, add_prefix_space=False
        )
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._full = tokenizer  # untruncated, to tell whether a caption is cut
        self._fixed = RustTokenizer.from_str(tokenizer.to_str())
        self._fixed.enable_truncation(max_length=context_length)
        self._fixed.enable_padding(length=context_length, pad_id=ids[EOS], pad_token=EOS)
        self.context_length = context_length
        self.pad_id = ids[EOS]

    def __len__(self) -> int:
        """Tokens in the vocabulary, added tokens included."""
        return self._full.get_vocab_size()

    def encode_batch(self, texts: Iterable[str]) -> torch.Tensor:
        """(B, context_length) int64 ids."""
        encodings = self._fixed.encode_batch(list(texts))
        return torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(-1, self.context_length)

    def fit(self, text: str) -> CaptionFit:
        """Whether `text` has a token besides the two specials, and whether it is cut to the context."""
        n = len(self._full.encode(text).ids)
        return CaptionFit(readable=n > 2, truncated=n > self.context_length)


def load_clip(
    folder: str | os.PathLike, device: str | torch.device = "cpu", pruning: PruningConfig | None = None
) -> ClipCheckpoint:
    """Load a HuggingFace CLIP folder into a `DualEncoder`; never touches the network, never unpickles.

    Args:
        folder: a local folder with config.json (``model_type`` clip), model.safetensors,
            tokenizer.json and optionally preprocessor_config.json.
        device: where to put the model.
        pruning: the keep predictors' stages and width; None is `model_config`'s default
            (DynamicViT's quarter points). A predictor add-on passes the ones it was trained with.

    Returns:
        The `ClipCheckpoint`.

    Raises:
        ValueError: a missing file, pickle-only weights, an architecture or preprocessing
            the project's code cannot express, or tensors missing, unexpected or misshapen.
    """
    folder = Path(folder)
    _check_files(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    cfg = model_config(_read_json(config_path), str(config_path))
    if pruning is not None:
        cfg = cfg.replace(pruning=pruning)
    tokenizer = ClipTokenizer(folder / TOKENIZER_FILE, cfg.text.context_length)
    if len(tokenizer) > cfg.text.vocab_size:
        raise ValueError(
            f"{folder / TOKENIZER_FILE} has {len(tokenizer)} tokens but {config_path} embeds only "
            f"{cfg.text.vocab_size}: the files come from different models."
        )
    processor_path = folder / PREPROCESSOR_FILE
    processor = _read_json(processor_path) if processor_path.is_file() else None
    preprocess = preprocess_config(processor, cfg.vision.image_size, str(processor_path))

    model = DualEncoder(cfg)
    trained = _read_weights(weights_path, {k: v.shape for k, v in model.state_dict().items()}, cfg)
    model.load_state_dict(trained, strict=False)
    untrained = sorted(model.state_dict().keys() - trained.keys())
    # Only the keep predictors (learned's and text_guided's) have no CLIP counterpart; anything else here is a model
    # change `_sources` misses.
    assert all(name.startswith(PREDICTOR_PREFIXES) for name in untrained), untrained
    log.debug("%s: %d keep-predictor tensors are not in a CLIP checkpoint; they start random.", folder, len(untrained))
    return ClipCheckpoint(model.to(device).eval(), tokenizer, preprocess, untrained)


def _check_files(folder: Path) -> None:
    """Raise a ValueError naming what `folder` lacks, refusing pickles without opening them."""
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = (
            f"its weights are only in {', '.join(pickles)}, a pickle, which vlm_demo never loads "
            "(unpickling can run arbitrary code)"
            if pickles
            else f"it has no {WEIGHTS_FILE}"
        )
        raise ValueError(f"{folder} is a HuggingFace CLIP, but {found}. {SAFETENSORS_HINT}")
    if not (folder / TOKENIZER_FILE).is_file():
        raise ValueError(
            f"{folder} has no {TOKENIZER_FILE}. Take the CLIP's tokenizer.json from the same Hub repository."
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); download it again.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; download it again.")
    return data


def _sources(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """For each tensor of the project's model but the keep predictors, the CLIPModel tensors it is made of."""
    out = {
        "logit_scale": ("logit_scale",),
        "visual.cls_token": ("vision_model.embeddings.class_embedding",),
        "visual.pos_embed": ("vision_model.embeddings.position_embedding.weight",),
        "visual.patch_embed.weight": ("vision_model.embeddings.patch_embedding.weight",),
        "visual.proj.weight": ("visual_projection.weight",),
        "text.token_embed.weight": ("text_model.embeddings.token_embedding.weight",),
        "text.pos_embed": ("text_model.embeddings.position_embedding.weight",),
        "text.proj.weight": ("text_projection.weight",),
    }
    for p in ("weight", "bias"):
        out[f"visual.pre_norm.{p}"] = (f"vision_model.pre_layrnorm.{p}",)
        out[f"visual.norm.{p}"] = (f"vision_model.post_layernorm.{p}",)
        out[f"text.norm.{p}"] = (f"text_model.final_layer_norm.{p}",)
    for ours, theirs, depth in (("visual", "vision_model", cfg.vision.depth), ("text", "text_model", cfg.text.depth)):
        for i in range(depth):
            a, b = f"{ours}.blocks.{i}.", f"{theirs}.encoder.layers.{i}."
            for p in ("weight", "bias"):
                out[f"{a}attn.qkv.{p}"] = tuple(f"{b}self_attn.{x}_proj.{p}" for x in "qkv")  # fused in this order
                out[f"{a}attn.proj.{p}"] = (f"{b}self_attn.out_proj.{p}",)
                out[f"{a}norm1.{p}"] = (f"{b}layer_norm1.{p}",)
                out[f"{a}norm2.{p}"] = (f"{b}layer_norm2.{p}",)
                out[f"{a}mlp.0.{p}"] = (f"{b}mlp.fc1.{p}",)
                out[f"{a}mlp.2.{p}"] = (f"{b}mlp.fc2.{p}",)
    return out


def _read_weights(path: Path, shapes: dict[str, torch.Size], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The project's state dict, but the keep predictors, built from a CLIPModel safetensors file.

    The header is checked before any tensor is read: every tensor of the file must be
    used and every one of the model filled, at its shape (a CLIP tensor may lack the
    model's leading 1-dimensions: the CLS token and the position tables).
    """
    sources = _sources(cfg)
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys() if not n.endswith(IGNORED_SUFFIXES)}
            problems = _header_problems(found, sources, shapes)
            if problems:
                raise ValueError(
                    f"{path} does not match its config.json as a CLIPModel: {'; '.join(problems)}. Were the "
                    "weights and the config taken from different checkpoints?"
                )
            out = {}
            for ours, theirs in sources.items():
                parts = [f.get_tensor(n) for n in theirs]
                # q, k and v concatenate along the output dimension, the layout of the fused qkv Linear.
                out[ours] = (torch.cat(parts) if len(parts) > 1 else parts[0]).reshape(shapes[ours])
            return out
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is truncated or corrupt ({error}). Download it again.") from error


def _header_problems(
    found: dict[str, tuple[int, ...]], sources: dict[str, tuple[str, ...]], shapes: dict[str, torch.Size]
) -> list[str]:
    """What is missing, unexpected or misshapen in a file holding the tensors `found` (name -> shape)."""
    needed = {n for group in sources.values() for n in group}
    problems = []
    if missing := sorted(needed - found.keys()):
        problems.append(f"{len(missing)} tensor(s) missing ({_some(missing)})")
    if unexpected := sorted(found.keys() - needed):
        problems.append(f"{len(unexpected)} unexpected tensor(s) ({_some(unexpected)})")
    misshapen = []
    for ours, theirs in sources.items():
        if any(n not in found for n in theirs):
            continue
        parts = [found[n] for n in theirs]
        joined = parts[0]
        if len(parts) > 1:
            same_tail = len({p[1:] for p in parts}) == 1
            joined = (sum(p[0] for p in parts), *parts[0][1:]) if same_tail else None
        if joined is None or not _fits(joined, tuple(shapes[ours])):
            given = " + ".join(str(list(p)) for p in parts)
            misshapen.append(f"{'+'.join(theirs)} is {given}, not {list(shapes[ours])}")
    if misshapen:
        problems.append(f"{len(misshapen)} tensor(s) of the wrong shape ({_some(misshapen)})")
    return problems


def _fits(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """True if `shape` is `target`, or `target` without some of its leading 1-dimensions."""
    lead = len(target) - len(shape)
    return lead >= 0 and target[lead:] == shape and all(n == 1 for n in target[:lead])
