"""Requests the app must refuse, with the words each refusal must contain.

One table for `tests/test_app.py` (each case once) and `benchmarks.soak_app` (mixed into the load).
"""

from __future__ import annotations

CAPTION = "a little green cross in the bottom right corner"  # true of docs/examples/scene_7005.png

BAD = [
    # (id, image key or None for the good scene, caption, method, keep ratio, words the message must contain)
    ("not-an-image", "not_image", CAPTION, "learned", 0.5, "not an image"),
    ("truncated-png", "truncated", CAPTION, "learned", 0.5, "truncated"),
    ("empty-file", "empty", CAPTION, "learned", 0.5, "empty"),
    ("decompression-bomb", "bomb", CAPTION, "learned", 0.5, "too large"),
    ("empty-caption", None, "", "learned", 0.5, "caption"),
    ("whitespace-caption", None, " \n\t ", "learned", 0.5, "caption"),
    ("caption-over-10k", None, "a red circle " * 1000, "learned", 0.5, "caption"),
    ("emoji-only-caption", None, "🙂🙂🙂", "learned", 0.5, "caption"),
    ("unknown-method", None, CAPTION, "magic", 0.5, "method"),
    ("keep-ratio-0", None, CAPTION, "learned", 0, "keep ratio"),
    ("keep-ratio-1.5", None, CAPTION, "learned", 1.5, "keep ratio"),
]
