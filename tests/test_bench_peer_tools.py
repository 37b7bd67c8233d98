"""The two helpers bench/bench_peers.py uses for ik_llama.cpp: extracting a partial git snapshot
file by file, and renaming a GGUF's architecture with its tensors unchanged."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench.extract_git_tree import extract
from bench.gguf_arch import rename_architecture


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def write_gguf(path: Path, arch: bytes, tensors: dict[str, np.ndarray], alignment: int = 32) -> None:
    """A GGUF v3 file per the format spec: string, uint32, float32 and string-array values."""
    kvs = [(b"general.architecture", 8, _string(arch)), (arch + b".block_count", 4, struct.pack("<I", 30)),
           (arch + b".attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-5)),
           (b"tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + _string(b"a") + _string(b"bc"))]
    infos, data = b"", b""
    for name, array in tensors.items():
        offset = len(data)
        infos += _string(name.encode()) + struct.pack("<I", array.ndim) + struct.pack(f"<{array.ndim}Q", *array.shape[::-1])
        infos += struct.pack("<IQ", 0, offset)  # type 0: F32
        data += array.astype(np.float32).tobytes()
        data += b"\0" * ((-len(data)) % alignment)
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    header += b"".join(_string(k) + struct.pack("<I", t) + v for k, t, v in kvs) + infos
    path.write_bytes(header + b"\0" * ((-len(header)) % alignment) + data)


def read_gguf(path: Path):
    """(kv dict, {tensor name: float32 array}) read independently of bench/gguf_arch.py."""
    raw = path.read_bytes()
    pos = 4
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, pos)
    pos += 20

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", raw, pos)
        pos += 8 + n
        return raw[pos - n:pos]

    def value(kind):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            item, count = struct.unpack_from("<IQ", raw, pos)
            pos += 12
            return [value(item) for _ in range(count)]
        fmt = {4: "<I", 6: "<f"}[kind]
        pos += struct.calcsize(fmt)
        return struct.unpack_from(fmt, raw, pos - struct.calcsize(fmt))[0]

    kv = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        kv[key] = value(kind)
    infos = []
    for _ in range(n_tensors):
        name = string().decode()
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", raw, pos + 4)
        kind, offset = struct.unpack_from("<IQ", raw, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, dims[::-1], offset))
    start = (pos + 31) // 32 * 32
    tensors = {name: np.frombuffer(raw, np.float32, int(np.prod(shape)), start + off).reshape(shape)
               for name, shape, off in infos}
    return version, kv, tensors


def test_gguf_architecture_renamed_with_tensors_unchanged(tmp_path):
    tensors = {"token_embd.weight": np.arange(30, dtype=np.float32).reshape(5, 6),
               "blk.0.attn_sub_norm.weight": np.linspace(-1, 1, 7, dtype=np.float32)}
    write_gguf(tmp_path / "in.gguf", b"bitnet", tensors)
    assert rename_architecture(tmp_path / "in.gguf", tmp_path / "out.gguf", "bitnet-25") == "bitnet"
    version, kv, got = read_gguf(tmp_path / "out.gguf")
    assert version == 3
    assert kv == {b"general.architecture": b"bitnet-25", b"bitnet-25.block_count": 30,
                  b"bitnet-25.attention.layer_norm_rms_epsilon": np.float32(1e-5),
                  b"tokenizer.ggml.tokens": [b"a", b"bc"]}
    for name, array in tensors.items():
        np.testing.assert_array_equal(got[name], array)
    assert not (tmp_path / "out.gguf.partial").exists()


def test_gguf_rename_refuses_other_files(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF"):
        rename_architecture(tmp_path / "x.gguf", tmp_path / "y.gguf", "bitnet-25")


def test_extract_skips_missing_blobs_and_keeps_modes(tmp_path):
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "src").mkdir()
    (repo / "src" / "a.cc").write_text("int a;\n")
    (repo / "run.sh").write_text("#!/bin/sh\n")
    (repo / "run.sh").chmod(0o755)
    (repo / "big.bin").write_bytes(b"\1" * 1000)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD:big.bin"], check=True, capture_output=True, text=True).stdout.strip()
    (repo / ".git" / "objects" / sha[:2] / sha[2:]).unlink()  # the snapshot lacks this blob
    written, missing = extract(repo / ".git", tmp_path / "out")
    assert (written, missing) == (2, ["big.bin"])
    assert (tmp_path / "out" / "src" / "a.cc").read_text() == "int a;\n"
    assert (tmp_path / "out" / "run.sh").stat().st_mode & 0o100
    assert not (tmp_path / "out" / "big.bin").exists()
