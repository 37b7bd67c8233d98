"""Which model folder the playground serves: cache, download + export, fallback.

    folder = resolve_model("microsoft/bitnet-b1.58-2B-4T", progress=print)

`resolve_model` returns a `ResolvedModel` (an exported folder plus what the banner says about
it). A hub id is exported once into the cache (`model_cache_dir()`); a later start reuses it.
A hub repo that holds an exported folder is downloaded into the hub cache and used as it is
(playground/hub.py).
Where the hub cannot be reached and nothing is cached, it says so in one line and falls back
to the demo model (issue 6) or, until that ships, to a tiny random model made here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "microsoft/bitnet-b1.58-2B-4T"
CONFIG_NAME = "bitnet_onnx.json"
# Variants exported for a hub model. fp32 of 2B4T is ~10 GB on disk and in memory: opt-in.
HUB_VARIANTS = ("ternary", "int2", "int4")
STAND_IN_VARIANTS = ("ternary", "int2", "int4", "fp32")
STAND_IN_NAME = "stand-in-tiny-random"
STAND_IN_LABEL = "a tiny random BitNet b1.58 model"
DEMO_NAME = "the Shakespeare demo model (BitNet b1.58, trained by this project)"
ROOT = Path(__file__).resolve().parent.parent
# Where the demo checkpoint of issue 6 may live (the first that exists is used).
DEMO_CANDIDATES = ("models/shakespeare-bitnet", "demo_model", "models/demo")


@dataclass
class ResolvedModel:
    folder: str
    name: str  # what the banner calls it
    requested: str
    fallback: bool = False  # not the model that was asked for
    untrained: bool = False  # random weights: answers are noise
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


def is_exported(folder) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_NAME))


def is_checkpoint(folder) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json"))


def hub_reachable(timeout: float = 4.0) -> bool:
    """Can we talk to the Hugging Face hub? (False at once when HF_HUB_OFFLINE is set.)"""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        req = urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout):
            return True
    except Exception as e:  # noqa: BLE001 - any failure means unreachable
        code = getattr(e, "code", None)
        return code is not None and code < 500  # an HTTP answer (even 4xx) means reachable


def _hub_cache_folder(repo_id: str) -> str | None:
    """The checkpoint's folder in the local hub cache, without any network access."""
    try:
        from huggingface_hub import snapshot_download

        from export.source import HUB_PATTERNS

        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or a broken cache): treat as absent
        return None
    has_weights = any(name.endswith(".safetensors") for name in os.listdir(folder))
    return folder if has_weights and is_checkpoint(folder) else None


def _export(source: str, out: Path, variants, progress) -> str:
    from export import export_checkpoint

    progress(f"exporting {source} to ONNX (variants {','.join(variants)}) into {out} ...")
    started = time.time()
    watcher = None if os.path.isdir(source) else _DownloadWatcher(source, progress)
    try:
        export_checkpoint(source, str(out), list(variants), overwrite=True, progress=progress)
    finally:
        if watcher:
            watcher.stop()
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
        self._thread = threading.Thread(target=self._run, name="download-watcher", daemon=True)
        self._thread.start()

    def _size(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.folder.iterdir())
        except OSError:
            return 0

    def _run(self) -> None:
        last = -1
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


def resolve_model(spec: str | None = None, variants=None, progress=print, check_hub=hub_reachable) -> ResolvedModel:
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
                _export(os.path.abspath(spec), out, variants or STAND_IN_VARIANTS, progress)
            name = os.path.basename(os.path.abspath(spec))
            return ResolvedModel(str(out), name, spec, source_name=name)
        raise SystemExit(f"{spec} is neither an exported model folder ({CONFIG_NAME}) "
                         "nor a checkpoint folder (config.json)")
    if os.path.exists(spec) or spec.count("/") != 1:
        raise SystemExit(f"--model {spec}: no such folder, and not a hub id of the form org/name")

    from .hub import HubFolderError, cached_exported_snapshot, exported_snapshot

    published = cached_exported_snapshot(spec, variants)  # a published export: used as is
    if published:
        progress(f"using {spec}, an exported folder in the hub cache ({published})")
        return ResolvedModel(published, spec, spec)
    out = cache / spec.replace("/", "--")
    if is_exported(out):
        progress(f"using the cached export of {spec} in {out}")
        return ResolvedModel(str(out), spec, spec)
    local = _hub_cache_folder(spec)
    if local is not None:
        progress(f"{spec} is in the hub cache ({local}); exporting it once")
        _export(local, out, variants or HUB_VARIANTS, progress)
        _record_source(out, spec)
        return ResolvedModel(str(out), spec, spec)
    reason = f"Cannot reach the Hugging Face hub and {spec} is not cached"
    if check_hub():
        from export import ExportError

        try:
            watcher = _DownloadWatcher(spec, progress)
            try:
                published = exported_snapshot(spec, variants=variants)  # None: a checkpoint repo
            finally:
                watcher.stop()
            if published:
                progress(f"downloaded {spec}, an exported folder, into the hub cache ({published})")
                return ResolvedModel(published, spec, spec)
            progress(f"downloading {spec} from the Hugging Face hub (first start only)")
            _export(spec, out, variants or HUB_VARIANTS, progress)
            return ResolvedModel(str(out), spec, spec)
        except HubFolderError as e:
            reason = f"Could not use {spec} ({e})"
        except ExportError as e:  # download or export failed: say why, serve the fallback
            reason = f"Could not download and export {spec} ({str(e).splitlines()[0]})"
    # Say so first (one line), then prepare the fallback.
    expected = DEMO_NAME if any(is_exported(p) or is_checkpoint(p) for p in demo_candidates()) \
        else STAND_IN_LABEL
    progress(_fallback_notice(reason, expected))
    fallback = demo_model(progress, requested=spec)
    fallback.notice = _fallback_notice(reason, fallback.name)
    return fallback


def _fallback_notice(reason: str, name: str) -> str:
    return f"{reason}, so this serves {name} instead."


def _record_source(folder, source: str) -> None:
    """The export read a hub-cache path; name the hub id as the source in the config."""
    path = os.path.join(folder, CONFIG_NAME)
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["source"] = source
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _display_name(folder) -> str:
    try:
        with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as f:
            source = json.load(f).get("source") or ""
    except (OSError, ValueError):
        source = ""
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/")) \
        and not os.path.exists(source)
    return source if looks_like_hub_id else os.path.basename(os.path.abspath(folder))


def demo_candidates() -> list[Path]:
    """BITNET_DEMO_MODEL (a folder; "none" = no demo model), else the shipped locations."""
    env = os.environ.get("BITNET_DEMO_MODEL")
    if env is not None:
        return [] if env.strip().lower() in ("", "none") else [Path(env)]
    return [ROOT / rel for rel in DEMO_CANDIDATES]


def demo_model(progress=print, requested: str = "demo") -> ResolvedModel:
    """The shipped demo model (issue 6) when present and exportable, else a tiny random stand-in."""
    name = DEMO_NAME
    for path in demo_candidates():
        try:
            if is_exported(path):
                return ResolvedModel(str(path), name, requested, fallback=requested != "demo",
                                     source_name=path.name)
            if is_checkpoint(path):
                out = model_cache_dir() / ("demo-" + _local_cache_name(str(path)))
                newest = max(os.path.getmtime(p) for p in path.iterdir())
                if not (is_exported(out) and os.path.getmtime(out / CONFIG_NAME) >= newest):
                    _export(str(path), out, STAND_IN_VARIANTS, progress)
                return ResolvedModel(str(out), name, requested, fallback=requested != "demo",
                                     source_name=path.name)
        except Exception as e:  # noqa: BLE001 - a broken demo folder must not stop the app
            progress(f"the demo model in {path} cannot be used ({type(e).__name__}: {e}); "
                     "using a tiny random stand-in")
    out = model_cache_dir() / STAND_IN_NAME
    if not is_exported(out):
        progress("making a tiny random BitNet model as a stand-in (no demo model found)")
        ckpt = model_cache_dir() / (STAND_IN_NAME + "-checkpoint")
        write_stand_in_checkpoint(ckpt)
        _export(str(ckpt), out, STAND_IN_VARIANTS, progress)
    return ResolvedModel(str(out), STAND_IN_LABEL, requested, fallback=True, untrained=True)


# -- the stand-in: a random tiny BitNet checkpoint, numpy + safetensors only (no torch) ---------

STAND_IN_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")


def _byte_tokenizer():
    """Byte-level tokenizer: the 256 bytes, then BOS, EOS, EOT (ids 256, 257, 258)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for i, name in enumerate(SPECIALS):
        vocab[name] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return tok, byte_chars


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(cs, bs))[ord(ch)]


def write_stand_in_checkpoint(path, seed: int = 0, context: int | None = None,
                              end_of_turn_scale: float = 2.0) -> Path:
    """A random BitNet b1.58 checkpoint (float master weights, untied head) with a byte-level
    tokenizer. The head favours printable ASCII so the noise it writes is at least readable;
    end_of_turn_scale sets how often it ends its turn (0: never, so only max tokens or a
    cancel end an answer, whatever the CPU's rounding)."""
    import numpy as np
    from safetensors.numpy import save_file

    from export.model_folder import DEFAULT_CHAT_TEMPLATE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok, _ = _byte_tokenizer()
    vocab = 256 + len(SPECIALS)
    s = dict(STAND_IN_SHAPE)
    if context:
        s["max_position_embeddings"] = int(context)
    h, inter, heads, kv = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]
    d = h // heads
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, h)).astype(np.float32),
         "model.norm.weight": np.ones(h, np.float32)}
    head = np.zeros((vocab, h), np.float32)
    printable = [b for b in range(256) if 32 <= b < 127 and chr(b).isalnum() or b in (32, 44, 46)]
    head[printable] = rng.standard_normal((len(printable), h)) * 3.0
    head[32] *= 1.5  # more spaces: word-like noise
    head[256 + 2] = rng.standard_normal(h) * end_of_turn_scale  # an occasional end of turn
    t["lm_head.weight"] = head
    shapes = {"self_attn.q_proj": (heads * d, h), "self_attn.k_proj": (kv * d, h),
              "self_attn.v_proj": (kv * d, h), "self_attn.o_proj": (h, heads * d),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
    for layer in range(s["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for norm, width in (("input_layernorm", h), ("post_attention_layernorm", h),
                            ("self_attn.attn_sub_norm", h), ("mlp.ffn_sub_norm", inter)):
            t[p + norm + ".weight"] = np.ones(width, np.float32)
        for name, shape in shapes.items():
            t[p + name + ".weight"] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": vocab,
              "hidden_act": "relu2", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": [257, 258],
              **s}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIALS[0], "eos_token": SPECIALS[1], "chat_template": DEFAULT_CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path
