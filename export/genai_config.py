"""genai_config.json: what onnxruntime-genai needs to run an exported folder.

    python -m export.genai_config DIR [--variant ternary|int2|int4|fp32]   # (re)write for a folder

onnxruntime-genai (`og.Model(DIR)`) reads DIR/genai_config.json: the decoder graph's file and
input/output names, the model's shape, token ids and search defaults. `python -m export` writes
one for the ternary variant (else for the first variant the folder has) and copies the
custom-op library into the folder (`python -m custom_ops install DIR`), because genai loads a
`custom_ops_library` only from inside the model folder (a relative path with no "..", checked
after resolving links). Pick another variant by setting `model.decoder.filename` to its file
(`model.int2.onnx`, ...): by hand, with this command, or at load time with
`og.Config(DIR).overlay('{"model": {"decoder": {"filename": "model.int2.onnx"}}}')`. The
stock-ORT variants ignore the library; the ternary one cannot run without it. The command
does everything the export does for genai, so it also readies a folder exported before.

genai renders the chat template of tokenizer_config.json with its own engine (minja), which
lacks jinja2's `capitalize` filter that 2B4T's template uses: the export rewrites the folder's
copy to the method form `.capitalize()` (same text in jinja2; bitnet_onnx.json keeps the
original). genai's tokenizer adds no BOS unless asked
(`tokenizer.update_options(add_special_tokens="true")`); the chat template writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from custom_ops.build import LIBRARY_NAME
from runtime import folder as model_folder
from runtime.errors import EngineError, first_line

GENAI_CONFIG_NAME = "genai_config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

# genai renders chat templates with minja, which lacks jinja2's `capitalize` filter (2B4T's
# template uses it) but has the string method; for a string both give the same text.
_CAPITALIZE_FILTER = re.compile(r"(\w+(?:\[[^\]]*\])*)\s*\|\s*capitalize\b(?!\s*\()")


def _search_defaults(config: dict, generation: dict) -> dict:
    """genai's search options. Greedy unless the checkpoint's generation_config.json samples;
    max_length is the whole context (prompt + new tokens), as in genai's own builder."""
    search = {
        "do_sample": bool(generation.get("do_sample", False)),
        "max_length": config["context_length"],
        "min_length": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        # Our graph concatenates past and new keys/values (no fixed-size cache buffer).
        "past_present_share_buffer": False,
        "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
        "temperature": float(generation.get("temperature", 1.0)),
        "top_k": int(generation.get("top_k", 50)),
        "top_p": float(generation.get("top_p", 1.0)),
    }
    return search


def genai_config(config: dict, variant: str | None = None, generation: dict | None = None) -> dict:
    """genai_config.json for a folder whose bitnet_onnx.json is `config`, running `variant`
    (default: ternary if the folder has it, else the first variant it lists)."""
    variants = config["variants"]
    if variant is None:
        variant = next((v for v in model_folder.VARIANTS if v in variants), None) or next(iter(variants))
    if variant not in variants:
        raise ValueError(f"the folder has no {variant!r} variant; it has: {', '.join(variants)}")
    stop_ids = list(config.get("stop_token_ids") or [])
    session_options = {"log_id": "onnxruntime-genai", "provider_options": []}
    if "ternary" in variants:
        # Listed for every variant so switching `filename` is the only edit; loading the
        # library does nothing for graphs without `bitnet` nodes.
        session_options["custom_ops_library"] = LIBRARY_NAME
    decoder = {
        "filename": variants[variant],
        "session_options": session_options,
        "head_size": config["head_dim"],
        "hidden_size": config["hidden_size"],
        "num_attention_heads": config["num_attention_heads"],
        "num_hidden_layers": config["num_layers"],
        "num_key_value_heads": config["num_key_value_heads"],
        # No position_ids: the graph derives positions from attention_mask.
        "inputs": {
            "input_ids": model_folder.INPUT_IDS,
            "attention_mask": model_folder.ATTENTION_MASK,
            "past_key_names": model_folder.past_name("%d", "key"),
            "past_value_names": model_folder.past_name("%d", "value"),
        },
        "outputs": {
            "logits": model_folder.LOGITS,
            "present_key_names": model_folder.present_name("%d", "key"),
            "present_value_names": model_folder.present_name("%d", "value"),
        },
    }
    model = {
        # genai's generic decoder-only type: it feeds exactly the inputs named above.
        "type": "decoder",
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": stop_ids,
        "pad_token_id": stop_ids[0] if stop_ids else 0,
        "context_length": config["context_length"],
        "vocab_size": config["vocab_size"],
        "decoder": decoder,
    }
    if model["bos_token_id"] is None:
        del model["bos_token_id"]
    return {"model": model, "search": _search_defaults(config, generation or {})}


def _read_generation_config(folder: str) -> dict:
    path = os.path.join(folder, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write(folder: str, config: dict | None = None, variant: str | None = None) -> str:
    """Write DIR/genai_config.json (from `config`, else the folder's bitnet_onnx.json); return
    its path. Does not place the custom-op library (see `python -m custom_ops install`)."""
    folder = os.fspath(folder)
    if config is None:
        config = model_folder.read_config(folder)
    data = genai_config(config, variant, _read_generation_config(folder))
    path = os.path.join(folder, GENAI_CONFIG_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def genai_chat_template(template: str) -> str:
    """The template with jinja2-only spellings replaced by ones genai also renders
    (`x | capitalize` -> `x.capitalize()`); jinja2 renders both alike."""
    return _CAPITALIZE_FILTER.sub(r"\1.capitalize()", template)


def make_chat_template_renderable(folder: str) -> bool:
    """Rewrite the folder's tokenizer_config.json chat template for genai when it needs it;
    True when it changed."""
    path = os.path.join(folder, TOKENIZER_CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    template = data.get("chat_template") if isinstance(data, dict) else None
    if not isinstance(template, str) or genai_chat_template(template) == template:
        return False
    data["chat_template"] = genai_chat_template(template)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return True


def write_genai_files(folder: str, config: dict, progress=print, variant: str | None = None) -> None:
    """What `python -m export` adds for onnxruntime-genai: genai_config.json, and for a folder
    with the ternary variant a copy of the custom-op library, and a chat template genai can
    render. A library that cannot be built here does not fail the export (our runtime would
    build it later); it is reported."""
    write(folder, config, variant)
    make_chat_template_renderable(folder)
    if "ternary" in config["variants"]:
        from custom_ops import BuildError
        from custom_ops.install import install

        try:
            install(folder)
        except BuildError as e:
            reason = first_line(e)
            progress(f"onnxruntime-genai: the custom-op library is not in the folder ({reason}); "
                     f"add it later with: python -m custom_ops install DIR")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.genai_config", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="an exported model folder")
    ap.add_argument("--variant", default=None, choices=model_folder.VARIANTS,
                    help="the variant genai runs (default: ternary, else the first exported)")
    args = ap.parse_args(argv)
    try:
        # Everything the export adds, so this also readies a folder exported before it did.
        write_genai_files(args.folder, model_folder.read_config(args.folder),
                          progress=lambda line: print(line, file=sys.stderr), variant=args.variant)
    except (ValueError, OSError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(os.path.join(args.folder, GENAI_CONFIG_NAME))
    return 0


if __name__ == "__main__":
    sys.exit(main())
