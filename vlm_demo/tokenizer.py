"""A word-level tokenizer, saved as JSON beside the weights.

Captions are lower-cased, punctuation is stripped, words are split on white
space. Ids 0-2 are reserved: ``<pad>``, ``<unk>`` and ``<cls>``; every encoded
caption starts with ``<cls>``, whose final state the text encoder pools.
Captions longer than ``context_length`` tokens (``<cls>`` included) are truncated.

`TextTokenizer` is the interface the rest of the library uses; a HuggingFace
CLIP's BPE tokenizer (`vlm_demo.hf_clip.ClipTokenizer`) implements it too.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple, Protocol

import torch

PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"
SPECIALS = (PAD, UNK, CLS)
VOCAB_FILE = "vocab.json"

_WORD = re.compile(r"[a-z0-9]+")


def normalize(text: str) -> list[str]:
    """Lower-case, strip punctuation and split into words."""
    return _WORD.findall(text.lower())


class CaptionFit(NamedTuple):
    """What encoding one caption will do to it."""

    readable: bool  # it has a token besides the special ones
    truncated: bool  # it is longer than the context and loses its end


class TextTokenizer(Protocol):
    """What the library needs from a tokenizer."""

    context_length: int  # tokens per encoded caption, special tokens included

    def encode_batch(self, texts: Iterable[str]) -> torch.Tensor:
        """(B, context_length) int64 ids, truncated and padded."""
        ...

    def fit(self, text: str) -> CaptionFit:
        """Whether `text` has any token, and whether it will be truncated."""
        ...


class Tokenizer:
    """Maps captions to fixed-length id tensors.

    Args:
        words: the vocabulary, without the special tokens.
        context_length: tokens per encoded caption, ``<cls>`` included.
    """

    def __init__(self, words: Iterable[str], context_length: int = 32):
        if context_length < 2:
            raise ValueError("context_length must be at least 2 (<cls> plus one word).")
        self.itos: list[str] = list(SPECIALS) + [w for w in dict.fromkeys(words) if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.context_length = context_length

    @classmethod
    def build(cls, captions: Iterable[str], context_length: int = 32, min_count: int = 1) -> "Tokenizer":
        """Build the vocabulary from captions: words seen at least `min_count` times, most frequent first."""
        counts = Counter(w for c in captions for w in normalize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(words, context_length)

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def pad_id(self) -> int:
        return self.stoi[PAD]

    def encode(self, text: str) -> list[int]:
        """Ids of one caption, ``<cls>`` first, truncated and padded to `context_length`."""
        ids = [self.stoi[CLS]] + [self.stoi.get(w, self.stoi[UNK]) for w in normalize(text)]
        ids = ids[: self.context_length]
        return ids + [self.pad_id] * (self.context_length - len(ids))

    def encode_batch(self, texts: Iterable[str]) -> torch.Tensor:
        """(B, context_length) int64 ids."""
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long).reshape(-1, self.context_length)

    def fit(self, text: str) -> CaptionFit:
        """Whether `text` has a word (letters or digits), and whether it is longer than the context."""
        words = normalize(text)
        return CaptionFit(readable=bool(words), truncated=len(words) + 1 > self.context_length)

    def decode(self, ids: Iterable[int]) -> str:
        """Words of the ids, without padding and ``<cls>``."""
        return " ".join(self.itos[i] for i in ids if self.itos[i] not in (PAD, CLS))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``vocab.json`` into `folder` and return its path."""
        path = Path(folder) / VOCAB_FILE
        path.write_text(json.dumps({"context_length": self.context_length, "itos": self.itos}, indent=0))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Read ``vocab.json`` from `folder`."""
        path = Path(folder) / VOCAB_FILE
        if not path.is_file():
            raise ValueError(f"No {VOCAB_FILE} in {folder}: is this a checkpoint folder written by vlm_demo?")
        try:
            data = json.loads(path.read_text())
            itos, context_length = data["itos"], data["context_length"]
            words_ok = isinstance(itos, list) and all(isinstance(w, str) for w in itos)
            if not words_ok or type(context_length) is not int:
                raise TypeError("'itos' must be a list of words and 'context_length' an integer")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path} is not a vocabulary written by vlm_demo ({error!r}); save the checkpoint again."
            ) from error
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"{path} does not start with the special tokens {SPECIALS}.")
        return cls(itos[len(SPECIALS):], context_length)
