"""Rewrites a GGUF file's architecture name, tensors unchanged (for ik_llama.cpp's `bitnet-25`).

    python bench/gguf_arch.py IN.gguf OUT.gguf bitnet-25

llama.cpp's converter writes BitNet b1.58 2B4T as architecture `bitnet`; ik_llama.cpp runs the
same tensors (sub-norms, squared ReLU) under the name `bitnet-25`. The name is the value of
`general.architecture` and the prefix of the architecture's own keys (`bitnet.block_count`, ...),
so both are rewritten; the tensor infos and data are copied byte for byte (their offsets are
relative to the aligned start of the data section, which is re-aligned after the new header).
"""

from __future__ import annotations

import shutil
import struct
import sys
from pathlib import Path

GGUF_MAGIC = b"GGUF"
# value type -> struct format of a scalar (8: string, 9: array)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class _Reader:
    def __init__(self, f):
        self.f = f

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.f.read(size))

    def string(self) -> bytes:
        (n,) = self.take("Q")
        return self.f.read(n)

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            (item_kind, count) = self.take("IQ")
            return (item_kind, [self.value(item_kind) for _ in range(count)])
        return self.take(SCALARS[kind])[0]


def _pack_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _pack_value(kind: int, value) -> bytes:
    if kind == STRING:
        return _pack_string(value)
    if kind == ARRAY:
        item_kind, items = value
        return struct.pack("<IQ", item_kind, len(items)) + b"".join(_pack_value(item_kind, v) for v in items)
    return struct.pack("<" + SCALARS[kind], value)


def rename_architecture(src: Path, dst: Path, new_arch: str) -> str:
    """Writes dst = src with its architecture renamed; returns the old name."""
    with open(src, "rb") as f:
        r = _Reader(f)
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{src} is not a GGUF file")
        version, n_tensors, n_kv = r.take("IQQ")
        if version < 2:
            raise ValueError(f"{src}: GGUF version {version} is not supported (2 or later)")
        kvs = []
        for _ in range(n_kv):
            key = r.string()
            (kind,) = r.take("I")
            kvs.append((key, kind, r.value(kind)))
        tensor_infos_start = f.tell()
        for _ in range(n_tensors):  # skipped over: copied as bytes
            r.string()
            (n_dims,) = r.take("I")
            r.take("Q" * n_dims)
            r.take("IQ")  # type, offset
        tensor_infos = None
        infos_end = f.tell()
        f.seek(tensor_infos_start)
        tensor_infos = f.read(infos_end - tensor_infos_start)
        values = {k: v for k, _, v in kvs}
        alignment = int(values.get(b"general.alignment", 32))
        old_arch = values[b"general.architecture"].decode()
        data_start = (infos_end + alignment - 1) // alignment * alignment

        old_prefix, new_prefix = old_arch.encode() + b".", new_arch.encode() + b"."
        out_kvs = []
        for key, kind, value in kvs:
            if key == b"general.architecture":
                value = new_arch.encode()
            elif key.startswith(old_prefix):
                key = new_prefix + key[len(old_prefix):]
            out_kvs.append(_pack_string(key) + struct.pack("<I", kind) + _pack_value(kind, value))
        header = GGUF_MAGIC + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(out_kvs) + tensor_infos
        padding = (-len(header)) % alignment
        partial = Path(str(dst) + ".partial")
        with open(partial, "wb") as out:
            out.write(header + b"\0" * padding)
            f.seek(data_start)
            shutil.copyfileobj(f, out, 64 << 20)
        partial.replace(dst)
    return old_arch


def main(argv=None) -> int:
    args = argv or sys.argv[1:]
    if len(args) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    old = rename_architecture(Path(args[0]), Path(args[1]), args[2])
    print(f"{args[1]}: architecture {old} -> {args[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
