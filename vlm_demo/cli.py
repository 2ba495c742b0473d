"""What the project's command lines share: help that shows defaults, checked numbers, clean user errors.

Used by ``python -m training.train``, ``training.evaluate``, ``training.synthetic`` and
``vlm_demo.bench``. A user's mistake (a bad path, an empty dataset folder, a bad
keep ratio, an unknown preset or method) ends the program with argparse's usage,
one ``error: ...`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

# The exceptions that mean "the input is wrong", not "the program is": library functions raise
# ValueError with a message that says what to do; the file system adds the others (a path that
# is missing, a file where a folder should be, a folder the user may not write).
USER_ERRORS: tuple[type[Exception], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError
)  # fmt: skip


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option's help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.required:
            return text
        return super()._get_help_string(action)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An `argparse.ArgumentParser` with `HelpFormatter`, described by the first paragraph of `doc`."""
    return argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0], formatter_class=HelpFormatter)


@contextlib.contextmanager
def user_errors(p: argparse.ArgumentParser) -> Iterator[None]:
    """Turn a `USER_ERRORS` exception raised in the block into ``p.error``: one line, exit code 2."""
    try:
        yield
    except USER_ERRORS as e:
        p.error(" ".join(str(e).split()) or type(e).__name__)


def _bounded_int(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


positive_int = _bounded_int(1)  # argparse type: a whole number >= 1
non_negative_int = _bounded_int(0)  # argparse type: a whole number >= 0


def placement(text: str) -> str | tuple[int, ...]:
    """argparse type: where pruning stages sit, ``paper``, ``shared`` or block indices like ``1,3``.

    The blocks are checked against the model later (`vlm_demo.pruning.resolve_stages`).
    """
    from .pruning import PLACEMENTS  # here: the other parsers need no torch

    if text in PLACEMENTS:
        return text
    try:
        blocks = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected paper, shared or block indices like 1,3; got {text!r}") from None
    return blocks


def _bounded_float(zero_ok: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ((0 <= value) if zero_ok else (0 < value)) or not value < float("inf"):
            what = "non-negative" if zero_ok else "positive"
            raise argparse.ArgumentTypeError(f"must be a {what} number, got {text}")
        return value

    return parse


positive_float = _bounded_float(False)  # argparse type: a finite number > 0
non_negative_float = _bounded_float(True)  # argparse type: a finite number >= 0
