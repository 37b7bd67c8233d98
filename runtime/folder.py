"""The model folder contract: the one module that knows how an exported folder looks.

    DIR/bitnet_onnx.json            the config, format_version 2 (written last: a folder with
                                    it is complete)
    DIR/model.onnx (+ .data)        ternary variant (needs the custom-op library)
    DIR/model.int2.onnx (+ .data)   stock-ORT baselines
    DIR/model.int4.onnx (+ .data)
    DIR/model.fp32.onnx (+ .data)
    DIR/tokenizer.json ...          the checkpoint's tokenizer files
    DIR/genai_config.json           for onnxruntime-genai (export/genai_config.py), with a copy
    DIR/libbitnet_ops.so            of the custom-op library when the ternary variant is there
    DIR/README.md                   the model card (export/model_card.py)

and the ONNX graph's input/output names (inputs `input_ids`, `attention_mask`,
`past_key_values.{i}.key|value`, `num_logits_to_keep`; outputs `logits`, `present.{i}.key|value`). The exporter writes through it, the runtime, the
playground, the server, the benchmarks and the tests read through it (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import os

from .errors import EngineError, VariantNotFoundError

CONFIG_NAME = "bitnet_onnx.json"
FORMAT = "bitnet-onnx"
# 1: graphs with an optional `logits_to_keep` (an initializer that is also an input);
# 2: a `num_logits_to_keep` input (optional, default 0 = every position, from an initializer of
# the same name; some format-2 folders require it). The runtime reads both (docs/ARCHITECTURE.md).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

VARIANTS = ("ternary", "int2", "int4", "fp32")
_VARIANT_FILES = {"ternary": "model.onnx", "int2": "model.int2.onnx",
                  "int4": "model.int4.onnx", "fp32": "model.fp32.onnx"}
CUSTOM_OP_DOMAIN = "bitnet"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
REQUIRED_KEYS = ("num_layers", "num_key_value_heads", "head_dim", "vocab_size",
                 "context_length", "variants")

# Graph inputs and outputs (Optimum / onnxruntime-genai decoder convention).
INPUT_IDS, ATTENTION_MASK, LOGITS = "input_ids", "attention_mask", "logits"
# int64, scalar or [1] (what transformers.js and onnxruntime-genai feed): 0 = logits for every
# position, n > 0 = for the last n positions only.
NUM_LOGITS_TO_KEEP = "num_logits_to_keep"


def graph_input_names(session) -> set[str]:
    """Every input an onnxruntime session can be fed: the required ones (get_inputs) and the
    ones with a default in the graph (an initializer of the same name, e.g. num_logits_to_keep)."""
    return {i.name for i in session.get_inputs()} | {i.name for i in session.get_overridable_initializers()}


def bind_constant_input(binding, name: str, value):
    """Bind `value` (a numpy array, kept alive by the caller) as input `name` of an IO binding.
    Through an OrtValue: bind_cpu_input cannot bind an input that has a default in the graph."""
    import onnxruntime as ort

    binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))


def past_name(layer: int, kind: str) -> str:
    """Graph input of layer's cached keys/values, kind "key" or "value"."""
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def variant_file(variant: str) -> str:
    """The file name a variant is written to, e.g. "model.int2.onnx"."""
    try:
        return _VARIANT_FILES[variant]
    except KeyError:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}") from None


def needs_custom_ops(variant: str) -> bool:
    """Does the variant's graph use the `bitnet` custom-op library? (Only ternary does.)"""
    variant_file(variant)
    return variant == "ternary"


def is_exported(folder) -> bool:
    """Does `folder` hold a finished export (its config file)?"""
    return os.path.isfile(os.path.join(os.fspath(folder), CONFIG_NAME))


def export_hint(folder) -> str:
    """How to make an exported folder for `folder` without writing over it: a checkpoint
    folder is exported to a sibling folder (export refuses to write into its source)."""
    folder = os.fspath(folder).rstrip("/\\") or os.fspath(folder)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return f"python -m export {folder} --out {folder}-onnx"
    return "python -m export SOURCE --out DIR"


def read_config(folder) -> dict:
    """The folder's config, checked; raises EngineError with one line that says what to do."""
    folder = os.fspath(folder)
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isdir(folder):
        raise EngineError(f"model folder {folder} does not exist")
    if not os.path.isfile(path):
        raise EngineError(f"{folder} is not an exported model folder (no {CONFIG_NAME}); "
                          f"make one with: {export_hint(folder)}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise EngineError(f"{path} cannot be read: {e}") from None
    reexport = "re-export it with: python -m export SOURCE --out DIR"
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise EngineError(f"{path}: format is {found!r}, not {FORMAT!r}; {reexport}")
    version = config.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise EngineError(f"{path}: format_version {version} is newer than this bitnet-onnx reads "
                          f"({FORMAT_VERSION}); update bitnet-onnx or {reexport}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if version not in READABLE_VERSIONS or missing or not isinstance(config["variants"], dict):
        what = f"lacks {', '.join(missing)}" if missing else f"has format_version {version!r}"
        raise EngineError(f"{path} {what}: it was written by an older exporter; {reexport}")
    return config


def write_config(folder, config: dict) -> None:
    """Write `config` as the folder's bitnet_onnx.json, stamped with this format and version.
    Write it last: its presence marks the folder complete."""
    stamped = {"format": FORMAT, "format_version": FORMAT_VERSION,
               **{k: v for k, v in config.items() if k not in ("format", "format_version")}}
    with open(os.path.join(os.fspath(folder), CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(stamped, f, indent=2, ensure_ascii=False)
        f.write("\n")


def variant_path(folder, variant: str, config: dict | None = None) -> str:
    """Path of the variant's .onnx file; VariantNotFoundError when the folder lacks it."""
    folder = os.fspath(folder)
    config = read_config(folder) if config is None else config
    files = config["variants"]
    if variant not in files:
        raise VariantNotFoundError(
            f"model folder {folder} has no {variant!r} variant; it has: {', '.join(files) or 'none'}")
    path = os.path.join(folder, files[variant])
    if not os.path.isfile(path):
        raise EngineError(f"{path} is missing (the folder lists it for variant {variant!r}); "
                          "re-export it with: python -m export SOURCE --out DIR")
    return path
