"""Model configuration as dataclasses, plus the named presets.

A checkpoint folder stores ``ModelConfig.to_dict()`` in its ``config.json``, so
one folder is all that is needed to rebuild a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("gelu", "quick_gelu")  # MLP activations: exact (erf) GELU, and CLIP's x * sigmoid(1.702 x)
TEXT_POOLS = ("cls", "eos")  # how the text encoder picks the token it projects
TEXT_INITS = ("trunc_normal", "clip")  # TextConfig.init: how a text tower trained from scratch starts
POS_INITS = ("random", "sincos")  # VisionConfig.pos_init


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 112  # side in pixels of the square input (vlm_demo.transforms says how an image becomes it)
    patch_size: int = 8  # side of one patch; 112 / 8 gives a 14x14 grid, the grid of ViT-B/16 at 224 px
    width: int = 128  # token dimension C of the ViT
    depth: int = 6  # number of transformer blocks
    heads: int = 4  # attention heads; width must divide by heads
    mlp_ratio: float = 4.0  # MLP hidden size = mlp_ratio * width, unless mlp_hidden is set
    mlp_hidden: int | None = None  # explicit MLP hidden size (CLIP's intermediate_size); None uses mlp_ratio
    act: str = "gelu"  # MLP activation, one of ACTIVATIONS; OpenAI's CLIPs use "quick_gelu"
    layer_norm_eps: float = 1e-5  # epsilon of every layer norm of the tower (torch's default, and CLIP's)
    patch_bias: bool = True  # the patch-embedding convolution has a bias; CLIP's has none
    pre_norm: bool = False  # a layer norm on the embedded tokens before block 0 (CLIP's pre_layrnorm)
    pos_init: str = "random"  # initial patch position embeddings, one of POS_INITS (learned either way): "random",
    # N(0, 0.02) as CLIP's; "sincos", MAE's 2-D sine-cosine codes, which let a small ViT trained from scratch
    # tell where things are early (the default preset's; docs/training.md)
    stem: tuple[int, ...] = ()  # channels of a convolutional stem beside the patch embedding: 3x3 stride-2
    # convolutions with GELU (after Xiao et al., "Early convolutions help transformers see better", NeurIPS 2021),
    # then a projection of patch_size / 2 ** len(stem) pixels, zero-initialised, whose tokens are added to the
    # patch embedding's: training starts from the plain ViT. (): the plain patch embedding alone (ViT's, CLIP's
    # and the default preset's; a stem of (32, 64, 128) trained a baseline with better retrieval and worse pair
    # accuracy, docs/training.md#runs)

    def __post_init__(self) -> None:
        _check_act(self.act)
        if self.pos_init not in POS_INITS:
            raise ValueError(f"Unknown pos_init {self.pos_init!r}; choose one of {', '.join(POS_INITS)}.")
        object.__setattr__(self, "stem", tuple(int(c) for c in self.stem))  # a config.json holds a list
        if any(c < 1 for c in self.stem) or self.patch_size % 2 ** len(self.stem):
            raise ValueError(f"stem {self.stem}: channels must be positive, and patch_size ({self.patch_size}) "
                             f"must divide by 2 ** {len(self.stem)} (each stem layer halves the side).")

    @property
    def stem_patch(self) -> int:
        """Side, in stem output pixels, of the square the patch projection spans (patch_size without a stem)."""
        return self.patch_size // 2 ** len(self.stem)

    @property
    def mlp_width(self) -> int:
        """Hidden size of each block's MLP."""
        return _mlp_width(self.width, self.mlp_ratio, self.mlp_hidden)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens, without the CLS token."""
        return self.grid**2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 512  # rows of the token embedding; set from the tokenizer's vocabulary when training
    context_length: int = 32  # tokens per caption including the leading <cls>; longer captions are truncated
    width: int = 128  # token dimension of the text transformer
    depth: int = 3  # number of transformer blocks
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden size = mlp_ratio * width, unless mlp_hidden is set
    mlp_hidden: int | None = None  # explicit MLP hidden size (CLIP's intermediate_size); None uses mlp_ratio
    act: str = "gelu"  # MLP activation, one of ACTIVATIONS
    layer_norm_eps: float = 1e-5  # epsilon of every layer norm of the tower
    causal: bool = False  # each token attends only to itself and earlier ones (CLIP's text encoder)
    pool: str = "cls"  # "cls": the first token (the word tokenizer's <cls>); "eos": CLIP's end-of-text token
    eos_token_id: int | None = None  # pool="eos": id of the end-of-text token; 2 selects transformers' legacy
    # rule, the position of the largest id (old CLIP configs say 2, and their <|endoftext|> is the largest id)
    pad_id: int | None = 0  # keys with this id are never attended to; None masks nothing, as for CLIP, whose
    # causal mask already hides the padding after <|endoftext|> from the pooled token (and whose pad may equal it)
    init: str = "trunc_normal"  # the weights of a tower trained from scratch (loaded weights replace them):
    # "trunc_normal", std 0.02 everywhere, as the image tower; "clip", OpenAI CLIP's text-tower initialisation
    # (attention in-projection std width^-0.5 and depth-scaled output projections, `model.clip_text_init`)

    def __post_init__(self) -> None:
        _check_act(self.act)
        if self.pool not in TEXT_POOLS:
            raise ValueError(f"Unknown text pool {self.pool!r}; choose one of {', '.join(TEXT_POOLS)}.")
        if self.init not in TEXT_INITS:
            raise ValueError(f"Unknown text init {self.init!r}; choose one of {', '.join(TEXT_INITS)}.")
        if self.pool == "eos" and self.eos_token_id is None:
            raise ValueError("pool='eos' needs eos_token_id, the id of the end-of-text token.")

    @property
    def mlp_width(self) -> int:
        """Hidden size of each block's MLP."""
        return _mlp_width(self.width, self.mlp_ratio, self.mlp_hidden)


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}.")


def _mlp_width(width: int, mlp_ratio: float, mlp_hidden: int | None) -> int:
    return int(width * mlp_ratio) if mlp_hidden is None else mlp_hidden


PREDICTOR_KINDS = ("mlp", "lg")  # `PruningConfig.predictor`


@dataclass(frozen=True)
class PruningConfig:
    stages: tuple[int, ...] = (1, 3)  # the blocks the learned keep predictors run before (one predictor each), and
    # the "shared" placement; after block 0 the tokens have context, and pruning early is where the cost goes down
    predictor_hidden: int = 64  # hidden size of the keep predictors' MLP (after DynamicViT's predictor), one per stage
    placement: str = "paper"  # where the other methods' stages sit: "paper", each method's paper default for
    # the depth (EViT inside blocks at 1/4, 1/2, 3/4; ToMe in every block), or "shared", every method at `stages`
    query_predictors: bool = True  # caption-conditioned keep predictors for text_guided, one per stage (trained in
    # the pruned phase); False in a config.json saved before they existed (see `ModelConfig.from_dict`)
    query_mlp: bool = True  # their caption side is an MLP (`vlm_demo.pruning.QueryKeepPredictor`); False, a linear
    # map, in a config.json saved before it existed
    predictor: str = "mlp"  # the keep predictors' kind: "mlp", `vlm_demo.pruning.KeepPredictor` (pruned/), or "lg",
    # DynamicViT's own `vlm_demo.pruning.PredictorLG` (dynamicvit/, whose stages are DynamicViT's)

    def __post_init__(self) -> None:
        if self.predictor not in PREDICTOR_KINDS:
            raise ValueError(f"Unknown keep predictor {self.predictor!r}; choose one of {', '.join(PREDICTOR_KINDS)}.")


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)  # the image encoder
    text: TextConfig = field(default_factory=TextConfig)  # the text encoder
    pruning: PruningConfig = field(default_factory=PruningConfig)  # where and how tokens are pruned
    embed_dim: int = 128  # size of the shared, L2-normalised embedding space (CLIP's projection_dim)
    init_logit_scale: float = 2.6592  # log(1 / 0.07), as in CLIP; a checkpoint's own logit_scale replaces it

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; `from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Rebuild a config from `to_dict` output; unknown keys raise, missing ones take their defaults."""
        d = dict(d)
        pruning = dict(d.pop("pruning", {}))
        pruning.setdefault("query_predictors", False)  # a checkpoint saved before they existed has none
        pruning.setdefault("query_mlp", False)  # nor, saved before it, their caption MLP
        if "stages" in pruning:
            pruning["stages"] = tuple(pruning["stages"])
        return cls(
            vision=VisionConfig(**d.pop("vision", {})),
            text=TextConfig(**d.pop("text", {})),
            pruning=PruningConfig(**pruning),
            **d,
        )

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # contrastive batch; 64 gives 468 steps an epoch at 30,000 training images
    baseline_epochs: int = 12  # epochs of contrastive training from scratch (times per epoch: training.json)
    pruned_epochs: int = 1  # epochs of training the keep predictors on the baseline's saliency
    lr: float = 1e-3  # peak AdamW learning rate for the baseline
    pruned_lr: float = 1e-3  # peak learning rate of the keep predictors; the towers stay frozen in that phase
    # (the finetune phase then fine-tunes the image tower)
    finetune_steps: int = 160  # steps (of batch_size, at most one epoch) of the finetune phase: pruned/'s image
    # tower, started from the baseline's, learns under learned's pruning to give the baseline's embedding, as
    # DynamicViT fine-tunes its backbone (training/train.py); 0: pruned/ keeps the baseline's image tower
    finetune_lr: float = 1e-4  # peak learning rate of that fine-tune
    query_lr: float = 1e-2  # peak learning rate of text_guided's caption-conditioned predictors (pruned phase too):
    # their caption match is a product of two projections, which learns too slowly in one epoch at pruned_lr
    weight_decay: float = 0.05  # AdamW weight decay (not on norms, biases, embeddings)
    warmup_steps: int = 100  # linear warm-up before cosine decay
    layout_weight: float = 10.0  # weight of the baseline's auxiliary layout loss (training.layout: both embeddings
    # must tell each of the 9 cells' colour, shape and size); synthetic data only; 0: off
    hard_negatives: int = 2  # hard-negative captions per image and step, extra wrong answers (NegCLIP): drawn
    # afresh each epoch from the image's objects (objects.json; one attribute changed or swapped); 0: none
    hard_negative_mix: tuple[float, float, float, float] | None = None  # relative odds that a training hard
    # negative changes or swaps colour, shape, size, position; None: equal odds, drawn as the test set's are.
    # (2, 2, 1, 1), aimed at the shipped baseline's misses, trained a worse baseline (docs/training.md#runs)
    hard_negative_weight: float = 0.0  # weight of the loss of each image's true caption against its own hard
    # negatives alone (training.losses.pair_loss), on top of InfoNCE; 0: InfoNCE alone. 1 trained a worse
    # baseline (docs/training.md#runs)
    keep_ratio_range: tuple[float, float] = (0.1, 1.0)  # keep ratios the pruned phase monitors and the finetune
    # phase trains at (one drawn per batch)
    num_images: int = 40000  # images in the generated synthetic dataset (75 % train): more scenes, better binding
    eval_images: int = 1000  # test images scored by the evaluation (the Flickr8k protocol uses 1,000)
    num_workers: int = 0  # DataLoader workers; 0 keeps CPU runs deterministic and light
    precision: str = "bf16"  # the baseline and finetune phases' matmuls: "bf16" (autocast; losses and attention
    # in float32) or "fp32"; bf16 is 1.5x faster per step on CPUs with AMX (benchmarks.train_step), slower on CPUs without


PRECISIONS = ("fp32", "bf16")  # TrainConfig.precision


@dataclass(frozen=True)
class Preset:
    model: ModelConfig  # architecture
    train: TrainConfig  # schedule and data size


PRESETS: dict[str, Preset] = {
    # The current recipe, the shipped checkpoints' (how they were made and how long a build takes:
    # docs/training.md#runs).
    "default": Preset(
        model=ModelConfig(vision=VisionConfig(pos_init="sincos"), text=TextConfig(depth=6, init="clip")),
        train=TrainConfig(),
    ),
    # For tests: trains end to end in seconds.
    "tiny": Preset(
        model=ModelConfig(
            vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=4, heads=2),
            text=TextConfig(context_length=16, width=32, depth=1, heads=2),
            pruning=PruningConfig(stages=(1, 2), predictor_hidden=16),
            embed_dim=32,
        ),
        train=TrainConfig(
            batch_size=16,
            baseline_epochs=2,
            pruned_epochs=1,
            finetune_steps=2,
            warmup_steps=2,
            num_images=64,
            eval_images=16,
            precision="fp32",
        ),
    ),
}


def get_preset(name: str) -> Preset:
    """Return a named preset.

    Args:
        name: one of `PRESETS`.

    Returns:
        The preset.

    Raises:
        ValueError: for an unknown name.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.") from None
