"""A hub repo that holds an exported folder (bitnet_onnx.json at its root), used as it is.

    folder = exported_snapshot("org/bitnet-b1.58-2B-4T-onnx")   # None: not an exported repo

The repo is downloaded with huggingface_hub into its own cache (HF_HOME / HF_HUB_CACHE, so a
Space's `preload_from_hub` fills it at build time) and the snapshot folder is served without an
export. A repo without bitnet_onnx.json at its root is a checkpoint: the caller exports it.
"""

from __future__ import annotations

import os

from runtime.errors import EngineError, error_line
from runtime.folder import CONFIG_NAME, is_exported, read_config


class HubFolderError(Exception):
    """The repo says it is an exported folder but its snapshot is not usable (one line)."""


def exported_snapshot(repo_id: str, *, variants=None, local_only: bool = False, revision: str | None = None,
                      cache_dir: str | None = None) -> str | None:
    """The local snapshot folder of `repo_id` when the repo is an exported folder, else None.

    variants: which variants' model files to fetch (default: every variant its config lists).
    local_only: only look in the hub cache (no network), as when offline (HF_HUB_OFFLINE=1).
    Raises HubFolderError when the repo has bitnet_onnx.json but a listed file is missing.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    from export.publish import folder_files, graph_files  # (the exporter's imports are not needed before this)

    offline = local_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        config_path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision, cache_dir=cache_dir,
                                      local_files_only=offline)
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: caught first)
        return None  # offline or unreachable, and not in the cache as an exported folder
    except EntryNotFoundError:
        return None  # the repo exists and has no bitnet_onnx.json: a checkpoint
    except RepositoryNotFoundError:
        return None  # let the checkpoint path say what is wrong with the id
    except Exception as e:  # noqa: BLE001 - HTTP errors, network drops: one line for the banner
        raise HubFolderError(f"cannot fetch {CONFIG_NAME} of {repo_id}: {error_line(e)}") from None
    try:  # the folder contract's own checks (format, version, required keys), one line each
        config = read_config(os.path.dirname(config_path))
    except EngineError as e:
        raise HubFolderError(f"{repo_id}: {e}") from None
    listed = config["variants"]
    wanted = list(listed) if variants is None else [v for v in variants if v in listed]
    if not wanted:
        raise HubFolderError(f"{repo_id}: {CONFIG_NAME} lists the variants {sorted(listed)}, "
                             f"none of the requested {list(variants or [])}")
    patterns = folder_files(config, wanted)  # the operator library included, when published
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                   local_files_only=offline)
    except Exception as e:  # noqa: BLE001
        raise HubFolderError(f"cannot download {repo_id}: {error_line(e)}") from None
    # every variant's graph keeps its weights beside it in FILE.data (runtime/folder.py)
    needed = graph_files(config, wanted) + ["tokenizer.json"]
    missing = [f for f in needed if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise HubFolderError(f"{repo_id} is an exported folder but its snapshot lacks {', '.join(missing)}"
                             + (" (offline: only the hub cache was read)" if offline else ""))
    return folder


def cached_folder(spec: str) -> str | None:
    """The exported folder `spec` names, found without network: the folder itself, or the
    snapshot of a hub repo holding an exported folder in the hub cache (None otherwise)."""
    if os.path.isdir(spec):
        return spec if is_exported(spec) else None
    if spec.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(spec, CONFIG_NAME)
    except Exception:  # noqa: BLE001 - an id the cache cannot hold: not a cached folder
        return None
    return os.path.dirname(path) if isinstance(path, str) else None


TRUST_ENV = "BITNET_TRUST_FOLDER_LIBRARY"


def library_trust(spec: str) -> str | None:
    """Why the operator library of the folder `spec` names may be loaded into this process
    (None: it may not). Loading it runs its native code: a folder on this disk, or a hub repo
    of the Space's own owner (SPACE_AUTHOR_NAME, set by Spaces) is trusted; another hub repo
    only with BITNET_TRUST_FOLDER_LIBRARY=1, as code from a repo needs consent elsewhere too."""
    if os.path.isdir(spec):
        return "a folder on this disk"
    if os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return f"{TRUST_ENV}=1"
    owner = os.environ.get("SPACE_AUTHOR_NAME", "").strip()
    if owner and spec.split("/")[0].lower() == owner.lower():
        return f"the Space's own repo ({owner})"
    return None


def choose_operator_library(spec: str):
    """Before the model is prepared: use the operator library of the exported folder `spec`
    names (a published repo in the hub cache, e.g. preloaded by a Space) when it is trusted
    (library_trust) and runs here, so the start compiles nothing; returns
    custom_ops.prebuilt.LibraryChoice (.message says which, and why)."""
    from custom_ops.prebuilt import LibraryChoice, adopt_folder_library

    folder = cached_folder(spec)
    if folder is not None and library_trust(spec) is None:
        choice = adopt_folder_library(None)  # the library built here (or the one already built)
        if choice.source == "build":
            return LibraryChoice("build", "", f"operator library: compiling it here, not loading the "
                                              f"copy in {spec} (native code from a hub repo that is not "
                                              f"this Space's; set {TRUST_ENV}=1 to use it)")
        return choice
    choice = adopt_folder_library(folder)
    if folder is None and choice.source == "build":
        return LibraryChoice("build", "", f"operator library: compiling it here ({spec} is not an "
                                          "exported folder on disk or in the hub cache)")
    return choice
