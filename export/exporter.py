"""Orchestration: checkpoint in, model folder out, one layer at a time for every variant."""

from __future__ import annotations

import os
import time

import numpy as np

from runtime.folder import write_config

from .checkpoint import Checkpoint, linear_prefixes, open_checkpoint
from .errors import ExportError
from .external_data import ExternalDataWriter, save_model
from .graph import DecoderGraph, LayerWeights, Projection
from .model_folder import atomic_output_dir, check_output_dir, copy_tokenizer_files, model_config, tokenizer_metadata
from .source import resolve_source
from .variants import (DEFAULT_LM_HEAD, INT2_BLOCK_SIZE, KV_CACHE_CHOICES, LM_HEAD_CHOICES, VARIANT_NAMES, make_variant,
                       resolve_lm_head)

DEFAULT_VARIANTS = ("ternary", "int2")
FP16_MAX = 65504.0


def _projection(lin) -> Projection:
    return Projection(lin.w, np.full(lin.w.shape[0], lin.multiplier, dtype=np.float32), lin.input_norm)


def _grouped(ckpt: Checkpoint, prefixes: list[str]) -> list[Projection]:
    """Projections reading the same input: one fused projection (stacked along the output
    axis, sharing the input's int8 quantization), or one each when their own input RMSNorms
    (use_rms_norm) differ, since then their quantized inputs differ too."""
    lins = [ckpt.linear(prefix) for prefix in prefixes]
    norms = [lin.input_norm for lin in lins]
    if any(n is not None and not np.array_equal(n, norms[0]) for n in norms):
        return [_projection(lin) for lin in lins]
    return [Projection(np.concatenate([lin.w for lin in lins], axis=0),
                       np.concatenate([_projection(lin).multiplier for lin in lins]), norms[0])]


def read_layer(ckpt: Checkpoint, layer: int) -> LayerWeights:
    names = linear_prefixes(ckpt.spec, layer)
    p = f"model.layers.{layer}."
    return LayerWeights(
        input_norm=ckpt.float_tensor(p + "input_layernorm.weight"),
        post_attention_norm=ckpt.float_tensor(p + "post_attention_layernorm.weight"),
        attn_sub_norm=ckpt.float_tensor(p + "self_attn.attn_sub_norm.weight") if ckpt.spec.sub_norms else None,
        ffn_sub_norm=ckpt.float_tensor(p + "mlp.ffn_sub_norm.weight") if ckpt.spec.sub_norms else None,
        qkv=_grouped(ckpt, [names["q_proj"], names["k_proj"], names["v_proj"]]),
        o=_projection(ckpt.linear(names["o_proj"])),
        gate_up=_grouped(ckpt, [names["gate_proj"], names["up_proj"]]),
        down=_projection(ckpt.linear(names["down_proj"])),
    )


def _embedding_storage(ckpt: Checkpoint, tables: list[np.ndarray]):
    """fp16 when the checkpoint stores 16-bit floats that fit fp16's range (bf16 -> fp16 is
    exact for normal values, ~3e-8 absolute below 6e-5), else fp32: the default keeps the
    checkpoint's precision."""
    names = ["model.embed_tokens.weight"] + ([] if ckpt.spec.tie_word_embeddings else ["lm_head.weight"])
    if all(ckpt.dtype_of(n) in ("BF16", "F16") for n in names) and \
            all(float(np.abs(t).max()) <= FP16_MAX for t in tables):
        return np.float16
    return np.float32


def embedding_dtype(variant, storage, tied: bool) -> str:
    """The dtype of the table a variant's embedding Gathers from: "int8" when a tied int8 head
    shares its quantized table with the embedding, else the variant's float storage."""
    if tied and variant.head_kind == "i8":
        return "int8"
    return np.dtype(variant.storage(storage)).name


def parse_variants(text: str | list | tuple) -> list[str]:
    names = [v.strip() for v in text.split(",")] if isinstance(text, str) else list(text)
    unknown = [v for v in names if v not in VARIANT_NAMES]
    if unknown or not names:
        raise ExportError(f"unknown variant(s) {unknown}; choose from {','.join(VARIANT_NAMES)}")
    return list(dict.fromkeys(names))


def export_checkpoint(source: str, out_dir: str, variants=DEFAULT_VARIANTS, *, lm_head: str = DEFAULT_LM_HEAD,
                      overwrite: bool = False, revision: str | None = None, int2_block_size: int = INT2_BLOCK_SIZE,
                      kv_cache: str = "float32", progress=print) -> str:
    """Export SOURCE (hub id or folder) to the model folder out_dir; return out_dir."""
    names = parse_variants(variants)
    if lm_head not in LM_HEAD_CHOICES:
        raise ExportError(f"--lm-head must be one of {', '.join(LM_HEAD_CHOICES)}, not {lm_head!r}")
    if kv_cache not in KV_CACHE_CHOICES:
        raise ExportError(f"--kv-cache must be one of {', '.join(KV_CACHE_CHOICES)}, not {kv_cache!r}")
    if kv_cache != "float32" and "ternary" not in names:
        raise ExportError(f"--kv-cache {kv_cache} applies to the ternary variant only (the stock-ORT baselines "
                          "keep a float32 cache); add it to --variants")
    started = time.time()
    folder = resolve_source(source, revision)
    check_output_dir(out_dir, folder, overwrite)  # before any work: never write over the source
    ckpt = open_checkpoint(folder)
    spec = ckpt.spec
    token_meta = tokenizer_metadata(folder, spec)
    lm_head = resolve_lm_head(lm_head, spec.vocab_size, spec.hidden_size)
    try:
        variant_objs = [make_variant(n, lm_head, int2_block_size, kv_cache) for n in names]
    except ImportError as e:
        raise ExportError(f"the ternary variant needs the custom_ops package: {e}") from None

    with atomic_output_dir(out_dir, overwrite, folder) as tmp:
        writers = [ExternalDataWriter(tmp, v.file_name + ".data") for v in variant_objs]
        graphs = [DecoderGraph(spec, v, w) for v, w in zip(variant_objs, writers)]
        embedding = ckpt.embedding()
        head = None if spec.tie_word_embeddings else ckpt.lm_head()
        storage = _embedding_storage(ckpt, [embedding] + ([] if head is None else [head]))
        embedding_dtypes = {v.name: embedding_dtype(v, storage, head is None) for v in variant_objs}
        for g in graphs:
            g.embed(embedding, head, storage)
        del embedding, head
        for layer in range(spec.num_layers):
            weights = read_layer(ckpt, layer)
            for g in graphs:
                g.add_layer(layer, weights)
            progress(f"layer {layer + 1}/{spec.num_layers} done ({time.time() - started:.0f} s)")
        final_norm = ckpt.float_tensor("model.norm.weight")
        for g, v, w in zip(graphs, variant_objs, writers):
            model = g.finish(final_norm, producer="bitnet-onnx export")
            save_model(model, os.path.join(tmp, v.file_name))
            w.close()
            progress(f"wrote {v.file_name} (+ {w.bytes_written / 2**20:.0f} MiB of weights)")
        copy_tokenizer_files(folder, tmp)
        extra = {"lm_head": lm_head, "lm_head_kinds": {v.name: v.head_kind for v in variant_objs},
                 # the first variant's (ternary when exported: model.onnx), then each variant's
                 "embedding_dtype": embedding_dtypes[variant_objs[0].name],
                 "embedding_dtypes": embedding_dtypes,
                 "int2_block_size": int2_block_size if "int2" in names else None,
                 "kv_cache_dtypes": {v.name: v.kv_cache for v in variant_objs}}
        config = model_config(spec, source, token_meta, {v.name: v.file_name for v in variant_objs}, extra)
        from .genai_config import write_genai_files  # here: `python -m export.genai_config` stays clean

        write_genai_files(tmp, config, progress)
        from .model_card import write_card_for_export  # (here: python -m export.model_card runs clean)

        write_card_for_export(tmp, config, folder, progress)  # README.md: publishable as is
        write_config(tmp, config)  # written last: a folder with bitnet_onnx.json is complete
    progress(f"exported {source} to {out_dir} in {time.time() - started:.0f} s")
    return out_dir
