"""Publish an exported folder to a Hugging Face model repo, model card included, so a Space (or
anyone) can serve it with `--model ORG/NAME` and no export.

    python -m export.publish DIR ORG/NAME [--private]          # an existing exported folder
    python -m export SOURCE --out DIR --push-to-hub ORG/NAME   # export, then publish

The token comes from where huggingface_hub looks (HF_TOKEN, else the file `hf auth login`
writes); it needs write access to ORG. The repo is created if missing; the upload is one commit
holding exactly the folder's files (`folder_files`), and removes variant files a previous
upload left that this folder no longer has. Every failure is one line (PublishError).
"""

from __future__ import annotations

import argparse
import os
import sys

from custom_ops.build import LIBRARY_NAME
from runtime.errors import EngineError, error_line, first_line
from runtime.folder import CONFIG_NAME, TOKENIZER_FILES, VARIANTS, read_config, variant_file

from .model_card import CARD_NAME

# What a published folder holds besides its variants' graphs and weights.
FOLDER_EXTRAS = (CONFIG_NAME, *TOKENIZER_FILES, "genai_config.json", CARD_NAME, LIBRARY_NAME)
# The variant files any upload of ours may have written: the ones a re-upload removes when its
# folder lacks them. Exact names, so the repo's other files (e.g. onnx/*.onnx) are never touched.
VARIANT_FILES = tuple(p for v in VARIANTS for p in (variant_file(v), variant_file(v) + ".data"))


class PublishError(Exception):
    """Publishing cannot start or failed; the message is one line saying why and what to do."""


def folder_files(config: dict, variants=None) -> list[str]:
    """The files of a published folder, as the upload writes and a Space's start reads them:
    the extras, then each variant's graph and its weights (FILE.data), for `variants` (default:
    all the config lists). Files a folder lacks (e.g. no chat_template.jinja) are simply absent."""
    return list(FOLDER_EXTRAS) + graph_files(config, variants)


def graph_files(config: dict, variants=None) -> list[str]:
    """Each variant's graph and its weights beside it (FILE.data), for `variants` (default: all
    the config lists; unlisted ones are left out)."""
    listed = config["variants"]
    wanted = list(listed) if variants is None else [v for v in variants if v in listed]
    return [p for v in wanted for p in (listed[v], listed[v] + ".data")]


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise PublishError(f"{repo_id!r} is not a repo id: give ORG/NAME (your user name or an "
                           "organization, then the model's name), e.g. alice/bitnet-b1.58-2B-4T-onnx")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PublishError(f"{repo_id!r} is not a valid repo id: {first_line(e)}") from None


def resolve_token(token: str | None = None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token "
                           "with write access (https://huggingface.co/settings/tokens)")
    return token


def check_folder(folder) -> list[str]:
    """The files to upload; raises PublishError when `folder` is not a complete exported folder."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise PublishError(f"{folder} is not a folder")
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise PublishError(f"{folder} is not an exported model folder (no {CONFIG_NAME}); make one with "
                           f"python -m export SOURCE --out {folder}")
    try:
        config = read_config(folder)
    except EngineError as e:
        raise PublishError(f"{folder}: {e}") from None
    files = [f for f in folder_files(config) if os.path.isfile(os.path.join(folder, f))]
    required = graph_files(config) + ["tokenizer.json", CARD_NAME]
    missing = [f for f in required if f not in files]
    if missing:
        hint = (f"; write the model card with python -m export.model_card {folder}" if missing == [CARD_NAME]
                else "; re-export the folder")
        raise PublishError(f"{folder} lacks {', '.join(missing)}{hint}")
    return files


def make_api(token: str):
    """The hub client (tests replace it with a fake that records the calls)."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def publish_folder(folder, repo_id: str, *, private: bool = False, token: str | None = None,
                   commit_message: str | None = None, progress=print) -> str:
    """Upload the exported `folder` to the model repo `repo_id` (created when missing); return
    the repo's URL. Raises PublishError (one line) on any failure."""
    check_repo_id(repo_id)
    files = check_folder(folder)
    token = resolve_token(token)
    api = make_api(token)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True, token=token)
        progress(f"uploading {len(files)} files ({size / 2**30:.2f} GiB) from {folder} to {url}")
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=os.fspath(folder), token=token,
                          allow_patterns=files, delete_patterns=list(VARIANT_FILES),
                          commit_message=commit_message or f"Upload the bitnet-onnx export ({', '.join(read_config(folder)['variants'])})")
    except Exception as e:  # noqa: BLE001 - HTTP 401/403/409, network: one line, no traceback
        raise PublishError(f"publishing {folder} to {repo_id} failed: {error_line(e)}") from None
    progress(f"published {repo_id}: {url}")
    return str(url)


def space_instructions(folder, repo_id: str) -> str:
    """What to put in a Space to serve the published folder: its front matter, preloading the
    folder at build time, and the variable naming the model."""
    from .space_config import dump_front_matter, published_front_matter, read_front_matter

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    meta = published_front_matter(repo_id, check_folder(folder), read_front_matter(os.path.join(root, "README.md")))
    return ("To serve it from a Space: use this front matter at the top of the Space's README.md\n"
            f"{dump_front_matter(meta)}"
            f"and set the Space variable BITNET_MODEL={repo_id} (docs/SPACES.md).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create the repo private (default: public)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="an exported model folder (python -m export ... --out DIR)")
    parser.add_argument("repo_id", help="the model repo to create or update, ORG/NAME")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        publish_folder(args.folder, args.repo_id, private=args.private,
                       progress=lambda m: print(m, file=sys.stderr, flush=True))
        print(space_instructions(args.folder, args.repo_id))
    except PublishError as e:
        print(f"publish failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
