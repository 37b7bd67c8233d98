"""Minimal streaming reader of .safetensors files (numpy only, bf16 included).

The `safetensors` numpy backend cannot return bfloat16, and we want to check every file
against its header (a truncated download must fail before we write anything), so we parse
the format ourselves: 8-byte little-endian header length, JSON header, then raw data.
Tensors are read one at a time with a file seek, never the whole file.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from .errors import ExportError

# dtype name in the header -> (numpy dtype used to read the raw bytes, bytes per element)
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class TensorInfo:
    def __init__(self, name: str, path: str, dtype: str, shape: tuple, begin: int, end: int):
        self.name, self.path, self.dtype, self.shape = name, path, dtype, tuple(shape)
        self.begin, self.end = begin, end

    def __repr__(self):
        return f"TensorInfo({self.name}, {self.dtype}, {self.shape})"


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse and validate one file's header; raise ExportError if it is damaged or truncated."""
    size = os.path.getsize(path)
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ExportError(f"{name} is truncated or not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise ExportError(f"{name} is truncated or not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportError(f"{name} has a damaged safetensors header: {e}") from None
    data_start = 8 + header_len
    data_size = size - data_start
    tensors = {}
    for tname, meta in header.items():
        if tname == "__metadata__":
            continue
        dtype, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
        if dtype not in _DTYPES:
            raise ExportError(f"{name}: tensor {tname} has unsupported dtype {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if end - begin != nbytes:
            raise ExportError(f"{name}: tensor {tname} has {end - begin} bytes, expected {nbytes}")
        if end > data_size:
            raise ExportError(
                f"{name} is truncated: tensor {tname} ends at byte {data_start + end}, "
                f"the file has {size} bytes (re-download it)")
        tensors[tname] = TensorInfo(tname, path, dtype, shape, data_start + begin, data_start + end)
    return tensors


def read_raw(info: TensorInfo) -> np.ndarray:
    """The tensor as stored (bf16 comes back as uint16 bit patterns)."""
    count = int(np.prod(info.shape, dtype=np.int64))
    with open(info.path, "rb") as f:
        f.seek(info.begin)
        arr = np.fromfile(f, dtype=_DTYPES[info.dtype], count=count)
    if arr.size != count:
        raise ExportError(f"{os.path.basename(info.path)} is truncated (tensor {info.name})")
    return arr.reshape(info.shape)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: no second full-size temporary (the 2B4T embedding is 1.3 GB)
    return wide.view(np.float32)


def read_float32(info: TensorInfo) -> np.ndarray:
    """A float tensor converted to float32 (exact for bf16/f16)."""
    if info.dtype not in FLOAT_DTYPES:
        raise ExportError(f"tensor {info.name} should be floating point, it is {info.dtype}")
    raw = read_raw(info)
    if info.dtype == "BF16":
        return bf16_bits_to_float32(raw)
    return raw.astype(np.float32, copy=False)
