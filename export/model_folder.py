"""The output folder: atomic creation, tokenizer files, and the config's contents (the file
format itself is runtime/folder.py's)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil

from runtime.folder import CONFIG_NAME, CUSTOM_OP_DOMAIN, TOKENIZER_FILES, is_exported

from .checkpoint import ModelSpec
from .errors import ExportError

EOT_TOKEN = "<|eot_id|>"

# BitNet b1.58 2B4T's chat template (docs/ARCHITECTURE.md, section 2), used when the checkpoint has none.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '<|eot_id|>' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '<|eot_id|>' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{os.path.basename(path)} is not valid JSON: {e}") from None


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialized as a dict
        return value.get("content")
    return value


def tokenizer_metadata(folder: str, spec: ModelSpec) -> dict:
    """BOS/stop ids, chat template and add_bos_token, read from the checkpoint's files."""
    tok_path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise ExportError(f"{folder} has no tokenizer.json (the runtime needs it)")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(tok_path)
    except Exception as e:  # tokenizers raises plain Exceptions
        raise ExportError(f"tokenizer.json cannot be loaded: {e}") from None
    tok_config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    gen_config = _read_json(os.path.join(folder, "generation_config.json"))

    bos_token = _token_text(tok_config.get("bos_token"))
    bos_id = spec.bos_token_id
    if bos_id is None and bos_token is not None:
        bos_id = tokenizer.token_to_id(bos_token)
    if bos_token is None and bos_id is not None:
        bos_token = tokenizer.id_to_token(bos_id)
    # Does the tokenizer put BOS in front by itself (a post-processor template)?
    ids = tokenizer.encode("a", add_special_tokens=True).ids
    add_bos = bool(bos_id is not None and ids and ids[0] == bos_id)

    stop_ids = []
    for source in (spec.raw_config.get("eos_token_id"), gen_config.get("eos_token_id")):
        for value in source if isinstance(source, list) else [source]:
            if value is not None and int(value) not in stop_ids:
                stop_ids.append(int(value))
    eot = tokenizer.token_to_id(EOT_TOKEN)
    if eot is not None and eot not in stop_ids:
        stop_ids.append(eot)

    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    return {
        "bos_token_id": bos_id,
        "bos_token": bos_token,
        "eos_token": _token_text(tok_config.get("eos_token")),
        "add_bos_token": add_bos,
        "stop_token_ids": stop_ids,
        "chat_template": template or DEFAULT_CHAT_TEMPLATE,
    }


def model_config(spec: ModelSpec, source: str, token_meta: dict, variants: dict, extra: dict) -> dict:
    return {  # runtime.folder.write_config adds "format" and "format_version"
        "source": source,
        "architecture": spec.architecture,
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "context_length": spec.max_position_embeddings,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        **token_meta,
        "custom_op_domain": CUSTOM_OP_DOMAIN,
        "variants": variants,
        **extra,
    }


def copy_tokenizer_files(src: str, dst: str) -> None:
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path):
            shutil.copyfile(path, os.path.join(dst, name))


def _within(path: str, folder: str) -> bool:
    """Is `path` (a resolved path) `folder` itself or inside it?"""
    return os.path.commonpath([path, folder]) == folder


def check_output_dir(out_dir: str, source_dir: str, overwrite: bool) -> None:
    """Refuse, before anything is written, an output folder that could destroy the source or
    something that is not a model folder (issue: `--out SOURCE --overwrite` once deleted the
    checkpoint). Paths are compared resolved (symlinks, `..`), and the output may not contain
    any file the source's files link to (a hub snapshot's files link into its blob store)."""
    out, src = os.path.realpath(out_dir), os.path.realpath(source_dir)
    if _within(out, src) or _within(src, out):
        where = "is" if out == src else "lies inside" if _within(out, src) else "contains"
        raise ExportError(f"--out {out_dir} {where} the source checkpoint folder {src}; choose "
                          f"another folder, e.g. --out {source_dir.rstrip('/')}-onnx")
    for name in os.listdir(source_dir):
        real = os.path.realpath(os.path.join(source_dir, name))
        if _within(real, out):
            raise ExportError(f"--out {out_dir} contains the source file {real} "
                              f"({os.path.join(source_dir, name)} links to it); choose another folder")
    if not os.path.lexists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        return
    if not overwrite:
        raise ExportError(f"{out_dir} already exists and is not empty (pass --overwrite to replace "
                          "an exported model folder)")
    if not os.path.isdir(out_dir) or not is_exported(out_dir):
        raise ExportError(f"{out_dir} is not an exported model folder (no {CONFIG_NAME}); --overwrite "
                          "replaces only those: choose another --out")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool, source_dir: str):
    """Yield a temporary folder beside out_dir; rename it to out_dir only on success.

    A failed or killed export leaves at most a hidden `.NAME.partial-PID` folder (removed on
    failure, and by the next export), never something that looks like a finished model.
    """
    check_output_dir(out_dir, source_dir, overwrite)
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(parent, f".{name}.partial-*")):
        pid = stale.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _process_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = os.path.join(parent, f".{name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
