"""Write initializers straight into one external data file, as they are produced.

Holding every weight in the ModelProto (and letting onnx move them out at save time) would
keep the whole model in memory; this writer appends each tensor to `<model>.data` at once and
returns a TensorProto that only points to it, so an export holds one layer at a time.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INLINE_LIMIT = 1024  # bytes; tiny tensors (shapes, eps) stay inside the .onnx file
PAGE = 4096  # large tensors start on a page boundary so ONNX Runtime can mmap them


class ExternalDataWriter:
    def __init__(self, folder: str, data_file_name: str):
        self.data_file_name = data_file_name
        self._file = open(os.path.join(folder, data_file_name), "wb")
        self._offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes <= INLINE_LIMIT:
            return numpy_helper.from_array(array, name)
        # A memoryview writes the array's buffer without the copy tobytes() would make.
        return self._external(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape,
                              memoryview(array.reshape(-1)).cast("B"))

    def from_proto(self, proto: TensorProto) -> TensorProto:
        """Move an in-memory TensorProto (e.g. from make_matmulnbits) to the data file."""
        if len(proto.raw_data) <= INLINE_LIMIT:
            return proto
        if not proto.raw_data:
            return self.tensor(proto.name, numpy_helper.to_array(proto))
        return self._external(proto.name, proto.data_type, tuple(proto.dims), proto.raw_data)

    def _external(self, name, data_type, shape, raw) -> TensorProto:
        if len(raw) >= 64 * 1024:
            pad = (-self._offset) % PAGE
            if pad:
                self._file.write(b"\0" * pad)
                self._offset += pad
        proto = TensorProto()
        proto.name = name
        proto.data_type = data_type
        proto.dims.extend(int(d) for d in shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_file_name), ("offset", str(self._offset)),
                           ("length", str(len(raw)))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self._file.write(raw)
        self._offset += len(raw)
        return proto

    @property
    def bytes_written(self) -> int:
        return self._offset

    def close(self) -> None:
        self._file.close()


def save_model(model: onnx.ModelProto, path: str) -> None:
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
