"""Which model folder the playground serves: cache, download + export, fallback.

    folder = resolve_model("microsoft/bitnet-b1.58-2B-4T", progress=print)

`resolve_model` returns a `ResolvedModel` (an exported folder plus what the banner says about
it). A hub id is fetched with huggingface_hub's `snapshot_download` (which uses the local hub
cache when the hub cannot be reached) and exported once into our cache (`model_cache_dir()`);
a later start reuses it. A hub repo that holds an exported folder (bitnet_onnx.json at its
root) is fetched the same way and served as it is (playground/hub.py). Where neither works,
it says so in one line and falls back to the
Shakespeare demo model that ships in models/shakespeare-bitnet.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import error_line, first_line
from runtime.folder import CONFIG_NAME, is_exported, read_config, write_config

DEFAULT_MODEL = "microsoft/bitnet-b1.58-2B-4T"
# Variants exported for a hub model. fp32 of 2B4T is ~10 GB on disk and in memory: opt-in.
HUB_VARIANTS = ("ternary", "int2", "int4")
LOCAL_VARIANTS = ("ternary", "int2", "int4", "fp32")  # small local checkpoints: all of them
DEMO_NAME = "the Shakespeare demo model (BitNet b1.58, trained by this project)"
ROOT = Path(__file__).resolve().parent.parent
DEMO_FOLDER = ROOT / "models" / "shakespeare-bitnet"  # the demo checkpoint this repo ships


@dataclass
class ResolvedModel:
    folder: str
    name: str  # what the banner calls it
    requested: str
    fallback: bool = False  # not the model that was asked for
    notice: str = ""  # one plain line about how we got here ("" when all went as asked)
    log: list = field(default_factory=list)
    source_name: str = ""  # the checkpoint folder's name when the folder is a cache copy

    @property
    def model_id(self) -> str:
        """A readable id for the API: the hub id when that is what is served, else the name of
        the folder the user knows (the checkpoint's, not the cache copy's with its hash)."""
        if not self.fallback and self.requested.count("/") == 1 and not os.path.exists(self.requested):
            return self.requested
        return self.source_name or os.path.basename(os.path.normpath(self.folder))


def model_cache_dir() -> Path:
    """BITNET_ONNX_CACHE, else $HF_HOME/bitnet-onnx, else ~/.cache/bitnet-onnx."""
    if os.environ.get("BITNET_ONNX_CACHE"):
        return Path(os.environ["BITNET_ONNX_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "bitnet-onnx"
    return Path.home() / ".cache" / "bitnet-onnx"


def is_checkpoint(folder) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json"))


class HubUnavailable(Exception):
    """The checkpoint can be neither downloaded nor found in the local hub cache."""


def hub_checkpoint(repo_id: str) -> str:
    """The checkpoint folder of a hub id: downloaded, or (hub unreachable, HF_HUB_OFFLINE) the
    copy in the local hub cache; huggingface_hub's snapshot_download does both."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from export.source import HUB_PATTERNS

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_PATTERNS)
    except LocalEntryNotFoundError:
        raise HubUnavailable(f"Cannot reach the Hugging Face hub and {repo_id} is not cached") from None
    except Exception as e:  # noqa: BLE001 - 404, gated repo, disk full...: say why, in one line
        raise HubUnavailable(f"Could not download {repo_id} ({first_line(e)})") from None


def _export(source: str, out: Path, variants, progress) -> str:
    from export import export_checkpoint

    progress(f"exporting {source} to ONNX (variants {','.join(variants)}) into {out} ...")
    started = time.time()
    export_checkpoint(source, str(out), list(variants), overwrite=True, progress=progress)
    progress(f"export of {source} finished in {time.time() - started:.0f} s")
    return str(out)


class _DownloadWatcher:
    """While a hub download runs, report the bytes in the repo's hub-cache folder every few
    seconds (huggingface_hub's own progress bars go to the terminal, not to the page)."""

    def __init__(self, repo_id: str, progress, every_s: float = 5.0):
        import threading

        try:
            from huggingface_hub.constants import HF_HUB_CACHE
        except ImportError:  # pragma: no cover
            HF_HUB_CACHE = os.path.expanduser("~/.cache/huggingface/hub")
        self.folder = Path(HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "blobs"
        self.progress, self.every_s = progress, every_s
        self._stop = threading.Event()
        self._initial = self._size()
        self._thread = threading.Thread(target=self._run, name="download-watcher", daemon=True)
        self._thread.start()

    def _size(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.folder.iterdir())
        except OSError:
            return 0

    def _run(self) -> None:
        last = self._initial  # what the cache already held is not a download
        while not self._stop.wait(self.every_s):
            size = self._size()
            if size != last:
                self.progress(f"downloading: {size / 2**30:.2f} GiB so far")
                last = size

    def stop(self) -> None:
        self._stop.set()


def _local_cache_name(folder: str) -> str:
    path = os.path.abspath(folder)
    digest = hashlib.sha1(path.encode()).hexdigest()[:10]
    return f"local--{os.path.basename(path.rstrip('/')) or 'model'}-{digest}"


def resolve_model(spec: str | None = None, variants=None, progress=print, fetch=hub_checkpoint) -> ResolvedModel:
    """Turn --model (hub id, checkpoint folder, exported folder or "demo") into an exported folder."""
    spec = spec or DEFAULT_MODEL
    cache = model_cache_dir()
    if spec == "demo":
        return demo_model(progress, requested="demo")
    if os.path.isdir(spec):
        if is_exported(spec):
            return ResolvedModel(os.path.abspath(spec), _display_name(spec), spec)
        if is_checkpoint(spec):
            out = cache / _local_cache_name(spec)
            newest = max(os.path.getmtime(p) for p in Path(spec).iterdir())
            if is_exported(out) and os.path.getmtime(out / CONFIG_NAME) >= newest:
                progress(f"using the cached export of {spec} in {out}")
            else:
                _export(os.path.abspath(spec), out, variants or LOCAL_VARIANTS, progress)
            name = os.path.basename(os.path.abspath(spec))
            return ResolvedModel(str(out), name, spec, source_name=name)
        raise SystemExit(f"{spec} is neither an exported model folder ({CONFIG_NAME}) "
                         "nor a checkpoint folder (config.json)")
    if os.path.exists(spec) or spec.count("/") != 1:
        raise SystemExit(f"--model {spec}: no such folder, and not a hub id of the form org/name")

    out = cache / spec.replace("/", "--")
    if is_exported(out):
        progress(f"using the cached export of {spec} in {out}")
        return ResolvedModel(str(out), spec, spec)
    progress(f"fetching {spec} (the local hub cache, else a download on first start)")
    from .hub import HubFolderError, exported_snapshot

    watcher = _DownloadWatcher(spec, progress)
    try:
        published = exported_snapshot(spec, variants=variants)  # None: not an exported repo
        if published:  # a repo holding an exported folder: served as it is, no export
            progress(f"{spec} is an exported folder: using it from the hub cache ({published})")
            return ResolvedModel(published, spec, spec)
        local = fetch(spec)
        _export(local, out, variants or HUB_VARIANTS, progress)
        _record_source(out, spec)
        return ResolvedModel(str(out), spec, spec)
    except HubUnavailable as e:
        reason = str(e)
    except HubFolderError as e:
        reason = f"Could not use {spec} ({e})"
    except Exception as e:  # noqa: BLE001 - ExportError etc.: serve the fallback, say why
        reason = f"Could not export {spec} ({first_line(e)})"
    finally:
        watcher.stop()
    # Say so first (one line), then prepare the fallback.
    progress(_fallback_notice(reason, DEMO_NAME))
    fallback = demo_model(progress, requested=spec)
    fallback.notice = _fallback_notice(reason, fallback.name)
    return fallback


def _fallback_notice(reason: str, name: str) -> str:
    return f"{reason}, so this serves {name} instead."


def _record_source(folder, source: str) -> None:
    """The export read a hub-cache path; name the hub id as the source in the config."""
    config = read_config(folder)
    config["source"] = source
    write_config(folder, config)


def _display_name(folder) -> str:
    try:
        source = read_config(folder).get("source") or ""
    except Exception:  # noqa: BLE001 - the engine says what is wrong with the folder
        source = ""
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/")) \
        and not os.path.exists(source)
    return source if looks_like_hub_id else os.path.basename(os.path.abspath(folder))


def demo_candidates() -> list[Path]:
    """BITNET_DEMO_MODEL (a folder; "none" = no demo model), else the shipped one."""
    env = os.environ.get("BITNET_DEMO_MODEL")
    if env is not None:
        return [] if env.strip().lower() in ("", "none") else [Path(env)]
    return [DEMO_FOLDER]


def demo_model(progress=print, requested: str = "demo") -> ResolvedModel:
    """The shipped demo model (models/shakespeare-bitnet, exported once into the cache).
    Raises RuntimeError (one line: the page shows it) when it is missing or broken."""
    name, problems = DEMO_NAME, []
    for path in demo_candidates():
        try:
            if is_exported(path):
                return ResolvedModel(str(path), name, requested, fallback=requested != "demo",
                                     source_name=path.name)
            if (path / "config.json").is_file():
                out = model_cache_dir() / ("demo-" + _local_cache_name(str(path)))
                newest = max(os.path.getmtime(p) for p in path.iterdir())
                if not (is_exported(out) and os.path.getmtime(out / CONFIG_NAME) >= newest):
                    _export(str(path), out, LOCAL_VARIANTS, progress)
                return ResolvedModel(str(out), name, requested, fallback=requested != "demo",
                                     source_name=path.name)
        except Exception as e:  # noqa: BLE001 - said in one line below
            problems.append(f"{path}: {error_line(e)}")
            progress(f"the demo model in {path} cannot be used ({problems[-1]})")
    where = "; ".join(problems) or "no demo model folder (BITNET_DEMO_MODEL or models/shakespeare-bitnet)"
    raise RuntimeError(f"no model to serve: the demo model is unavailable ({where}); pass --model "
                       "with an exported folder or a checkpoint")
