"""Turn SOURCE (a local folder or a Hugging Face hub id) into a local checkpoint folder."""

from __future__ import annotations

import os

from runtime.errors import first_line

from .errors import ExportError

# Only what the export needs: no *.bin / *.pt / original training files.
HUB_PATTERNS = [
    "config.json", "generation_config.json",
    "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
]


def resolve_source(source: str, revision: str | None = None) -> str:
    """Return a local folder holding the checkpoint files."""
    if os.path.isdir(source):
        return os.path.abspath(source)
    if os.path.exists(source):
        raise ExportError(f"{source} is a file; SOURCE must be a checkpoint folder or a hub id")
    if source.count("/") != 1 or source.startswith(("/", ".")):
        raise ExportError(f"{source}: no such folder, and not a hub id of the form org/name")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a runtime dependency
        raise ExportError("huggingface_hub is not installed; pass a local checkpoint folder") from None
    try:
        # snapshot_download honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and shows progress.
        return snapshot_download(source, revision=revision, allow_patterns=HUB_PATTERNS)
    except LocalEntryNotFoundError:
        raise ExportError(
            f"{source}: no such local folder, and not in the hub cache while the hub cannot be "
            "reached (offline or HF_HUB_OFFLINE=1); download it once with network access") from None
    except HfHubHTTPError as e:
        raise ExportError(f"could not download {source} from the hub: {first_line(e)}") from None
    except OSError as e:
        raise ExportError(f"could not download {source}: {e}") from None
