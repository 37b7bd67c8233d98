"""The model card (README.md) of an exported folder, so the folder can be published as it is.

    write_model_card(folder, config, source_folder=checkpoint_dir)   # python -m export does this
    python -m export.model_card DIR [--parity parity.json]         # (re)write it, e.g. with parity

The card starts with the hub's metadata front matter (library_name, base_model = the source
checkpoint when it is a hub id, tags, license and language when the source's card says them),
then says what the folder holds (variants and their files), the export command, parity
figures against transformers when given (the JSON `python -m demo.check_export` prints), and
how to run it (`--model org/name` takes such a repo and uses it without exporting).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from runtime.folder import CONFIG_NAME, needs_custom_ops, read_config

CARD_NAME = "README.md"
TAGS = ["bitnet", "bitnet-b1.58", "ternary", "onnx", "onnxruntime", "bitnet-onnx"]
VARIANT_TEXT = {
    "ternary": "ternary weights packed 2 bits each, our `BitLinear` custom op (domain `bitnet`); "
               "needs the bitnet-onnx custom-op library",
    "int2": "stock ONNX Runtime: `MatMulNBits` 2-bit",
    "int4": "stock ONNX Runtime: `MatMulNBits` 4-bit",
    "fp32": "stock ONNX Runtime: float32 `MatMul` (large: for reference)",
}


def is_hub_id(source: str) -> bool:
    return (isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and not os.path.exists(source))


def source_card_data(source_folder: str | None) -> dict:
    """license / language / base_model from the source checkpoint's own card, if it has one."""
    if not source_folder or not os.path.isfile(os.path.join(source_folder, CARD_NAME)):
        return {}
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(os.path.join(source_folder, CARD_NAME)).data.to_dict()
    except Exception:  # noqa: BLE001 - a card we cannot parse only costs the metadata
        return {}
    return {k: data[k] for k in ("license", "language") if data.get(k)}


def export_command(config: dict, out: str = "DIR") -> str:
    parts = ["python -m export", str(config.get("source", "SOURCE")), "--out", out,
             "--variants", ",".join(config.get("variants", {}))]
    if config.get("lm_head") not in (None, "native"):
        parts += ["--lm-head", str(config["lm_head"])]
    block = config.get("int2_block_size")
    if block and "int2" in config.get("variants", {}) and block != 128:
        parts += ["--int2-block-size", str(block)]
    return " ".join(parts)


def _file_size(folder: str, name: str) -> int:
    total = 0
    for candidate in (name, name + ".data"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            total += os.path.getsize(path)
    return total


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def render_card(folder: str, config: dict, *, source_folder: str | None = None,
                parity: dict | None = None) -> str:
    from huggingface_hub import ModelCardData

    source = str(config.get("source", ""))
    meta = source_card_data(source_folder)
    data = ModelCardData(library_name="onnxruntime", pipeline_tag="text-generation", tags=list(TAGS),
                         base_model=source if is_hub_id(source) else None, **meta)
    # the folder may still be the exporter's temporary one: name the card after the source
    name = (os.path.basename(source.rstrip("/")) + "-onnx") if source else os.path.basename(os.path.abspath(folder))
    variants = config.get("variants", {})
    lines = ["---", data.to_yaml(), "---", "",
             f"# {name}: {source or 'a BitNet b1.58 model'} exported to ONNX",
             "",
             f"{config.get('architecture', 'BitNet b1.58')} "
             f"({config.get('num_layers')} layers, hidden {config.get('hidden_size')}, "
             f"vocabulary {config.get('vocab_size')}, context {config.get('context_length')} tokens) "
             f"exported by bitnet-onnx's `python -m export` from "
             f"{'`' + source + '`' if source else 'its checkpoint'}"
             + (f" (the hub model [{source}](https://huggingface.co/{source}))" if is_hub_id(source) else "")
             + ". The folder is complete as it is: every variant, the tokenizer and "
             f"`{CONFIG_NAME}` (the folder's config).",
             "",
             "## Variants", "",
             "| variant | file | size | what runs |", "|---|---|---:|---|"]
    for variant, file_name in variants.items():
        lines.append(f"| `{variant}` | `{file_name}` (+ `.data`) | {_mib(_file_size(folder, file_name))} | "
                     f"{VARIANT_TEXT.get(variant, '')} |")
    lines += ["", f"lm_head: {config.get('lm_head', 'native')}; embedding: "
                  f"{config.get('embedding_dtype', 'float32')}. Graph inputs `input_ids`, `attention_mask`, "
                  "`past_key_values.{i}.key|value`; outputs `logits`, `present.{i}.key|value` "
                  "(the Optimum / onnxruntime-genai decoder convention).", ""]
    lines += ["## How it was made", "", "```bash", export_command(config), "```", ""]
    if parity and parity.get("variants"):
        lines += ["## Parity with transformers", "",
                  f"Against transformers' `BitNetForCausalLM` on the source checkpoint, one chat prompt "
                  f"({parity.get('prompt_tokens', '?')} tokens) then {parity.get('decode_steps', '?')} "
                  "decode steps teacher-forced on transformers' greedy tokens"
                  + (f" (largest logit magnitude {parity['logit_scale']:.3g})" if "logit_scale" in parity else "")
                  + ":", "",
                  "| variant | max abs logit difference | greedy tokens equal |", "|---|---:|---:|"]
        for variant, row in parity["variants"].items():
            diff = row.get("max_abs_logit_diff")
            lines.append(f"| `{variant}` | {diff:.2e} | {row.get('greedy_agree', '?')} |"
                         if isinstance(diff, (int, float)) else f"| `{variant}` | ? | {row.get('greedy_agree', '?')} |")
        lines.append("")
    ternary = any(needs_custom_ops(v) for v in variants if v in VARIANT_TEXT)
    lines += ["## Run it", "",
              "With bitnet-onnx checked out (`pip install -r requirements.txt`; "
              "Linux x86-64 with `g++`"
              + (", which builds the custom-op library the ternary variant needs on first use" if ternary else "")
              + "), name this repo where a model folder goes; it is downloaded into the Hugging Face "
              "cache and used as is, with no export:", "",
              "```bash",
              "python app.py --model ORG/NAME                 # the playground (and the API under /v1)",
              "python -m runtime \"$(hf download --quiet ORG/NAME)\" --prompt \"Hello\"   # --quiet: prints only the local folder",
              "python -m server \"$(hf download --quiet ORG/NAME)\" --port 8000         # the OpenAI-compatible API",
              "```", "",
              "`ORG/NAME` is the repo this folder was uploaded to (`python -m export.publish DIR ORG/NAME`, or "
              "`hf upload ORG/NAME DIR .`, DIR being this folder).",
              ""]
    return "\n".join(lines)


def write_model_card(folder: str, config: dict | None = None, *, source_folder: str | None = None,
                     parity: dict | None = None) -> str:
    """Write README.md into `folder`; returns its path."""
    config = read_config(folder) if config is None else config
    path = os.path.join(folder, CARD_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_card(folder, config, source_folder=source_folder, parity=parity))
    return path


def write_card_for_export(folder: str, config: dict, source_folder: str, progress) -> None:
    """The exporter's call: a card that cannot be written costs the card only, not the export."""
    try:
        write_model_card(folder, config, source_folder=source_folder)
    except Exception as e:  # noqa: BLE001
        progress(f"note: no model card written ({type(e).__name__}: {e})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.model_card",
                                description="(Re)write the model card README.md of an exported folder.")
    p.add_argument("folder")
    p.add_argument("--parity", help="JSON printed by python -m demo.check_export (last line)")
    p.add_argument("--source", help="the source checkpoint folder (its card's license/language)")
    args = p.parse_args(argv)
    parity = None
    try:
        config = read_config(args.folder)
        if args.parity:
            with open(args.parity, encoding="utf-8") as f:
                lines = [line for line in f.read().splitlines() if line.strip().startswith("{")]
            if not lines:
                raise ValueError(f"{args.parity} holds no JSON line")
            parity = json.loads(lines[-1])
    except Exception as e:  # noqa: BLE001 - one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(write_model_card(args.folder, config, source_folder=args.source, parity=parity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
