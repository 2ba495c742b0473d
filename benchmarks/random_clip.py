"""Write a random CLIP of a named shape as a HuggingFace folder: real architecture, random weights, no download.

    python -m benchmarks.random_clip tinyclip-8m-16 /tmp/tinyclip-random
    python app.py --models /tmp/tinyclip-random            # then benchmark the page on that shape

The shapes are `vlm_demo.hf_clip.CLIP_SHAPES` (TinyCLIP-8M/16, ViT-B/16). Latency, GMACs and the page's
speed depend on the shape, not on the weights, so a random model measures them honestly where the real
weights cannot be downloaded. The tokenizer is a small CLIP-style BPE (the tests build the same one), so
the text tower's vocabulary is small; its cost per caption does not depend on the vocabulary's size.
Needs ``transformers`` (a test dependency).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from vlm_demo import hf_clip

SENTENCES = [
    "a photo of a cat sitting on a red sofa",
    "two dogs run across the green grass",
    "a small yellow star at the top left",
    "a man riding a bicycle down the street",
    "the blue car is parked near the old house",
]


def build_tokenizer(path: Path) -> RustTokenizer:
    """A CLIP-style byte-level BPE (the normaliser, split and </w> suffix of transformers' CLIPTokenizer).

    As in OpenAI's vocabulary, the two special tokens are the last ids, so the legacy
    "largest id" rule finds <|endoftext|>. No post-processor is saved: transformers
    adds its own, and so must vlm_demo.
    """
    tok = RustTokenizer(BPE(unk_token=hf_clip.EOS, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=320,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer)
    # The BPE model itself must know <|endoftext|>: it is also the unknown token.
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    vocab[hf_clip.BOS], vocab[hf_clip.EOS] = len(vocab), len(vocab) + 1
    tok = RustTokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([hf_clip.BOS, hf_clip.EOS])
    tok.save(str(path))
    return tok



def write(shape: str, folder: Path, seed: int = 0) -> Path:
    """Save a random `transformers.CLIPModel` of `shape`, a tokenizer.json and CLIP's image processor."""
    import torch
    import transformers

    if shape not in hf_clip.CLIP_SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {', '.join(hf_clip.CLIP_SHAPES)}.")
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder / hf_clip.TOKENIZER_FILE)
    eos = tok.token_to_id(hf_clip.EOS)
    config = json.loads(json.dumps(hf_clip.CLIP_SHAPES[shape].config))
    config.pop("model_type", None)
    text = config.pop("text_config")
    text.update(vocab_size=eos + 1, bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, **config)).eval()
    model.save_pretrained(folder)
    side = config["vision_config"]["image_size"]
    transformers.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}
                                    ).save_pretrained(folder)  # fmt: skip
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.random_clip", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("shape", choices=sorted(hf_clip.CLIP_SHAPES), help="the architecture to build")
    p.add_argument("out", type=Path, help="folder to write (config.json, model.safetensors, tokenizer.json, ...)")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    args = p.parse_args(argv)
    print(write(args.shape, args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
