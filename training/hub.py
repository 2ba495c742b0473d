"""Push a checkpoint folder to the HuggingFace Hub, or pull one.

    python -m training.hub push checkpoints your-name/vlm-token-pruning
    python -m training.hub pull your-name/vlm-token-pruning --out checkpoints-from-hub

Offline, both fail within seconds with a clear message instead of hanging in
huggingface_hub's retries. Authentication uses the usual ``HF_TOKEN`` /
``huggingface-cli login``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from vlm_demo.hub import ensure_online, pull

# Resume state and temporary folders stay local.
IGNORE = [".resume/*", ".*", "**/.*"]


def push(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload `folder` (baseline/, pruned/, dynamicvit/ where trained, metrics and report) to a model repo.

    Args:
        folder: a checkpoint folder written by `training.train`.
        repo_id: ``owner/name``; created if missing.
        private: create the repo private.
        token: a Hub token; None uses the cached login.

    Returns:
        The URL of the commit.

    Raises:
        ValueError: when `folder` is not a checkpoint folder.
        ConnectionError: when the Hub cannot be reached.
    """
    folder = Path(folder)
    if not (folder / "baseline" / "model.safetensors").is_file():
        raise ValueError(f"{folder} has no baseline/model.safetensors: train first with `python -m training.train`.")
    ensure_online()
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, ignore_patterns=IGNORE,
                             commit_message="Upload vlm_demo checkpoints")  # fmt: skip
    return str(info)


def pull_to(repo_id: str, out: str | Path, revision: str | None = None) -> Path:
    """Fetch a repo (see `vlm_demo.hub.pull`) and copy it to `out`."""
    snapshot = pull(repo_id, revision=revision)
    out = Path(out)
    shutil.copytree(snapshot, out, dirs_exist_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.hub", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("push", help="upload a checkpoint folder")
    ps.add_argument("folder")
    ps.add_argument("repo_id")
    ps.add_argument("--private", action="store_true")
    pl = sub.add_parser("pull", help="download a checkpoint repo")
    pl.add_argument("repo_id")
    pl.add_argument("--out", default="checkpoints-hub")
    pl.add_argument("--revision")
    args = p.parse_args(argv)
    try:
        if args.cmd == "push":
            print(push(args.folder, args.repo_id, private=args.private))
        else:
            print(pull_to(args.repo_id, args.out, args.revision))
    except (ConnectionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
