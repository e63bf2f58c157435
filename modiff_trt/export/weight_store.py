"""Where the constants of a graph go as the Q/DQ pass makes them: into the graph, or streamed
straight into its external-data file `<graph>.data`.

A large model's integer weights (0.86 GB for SD v1) and the warm-up graph's float weights (1.7 GB
in fp16) would otherwise sit in the protobuf in memory, then be copied again when it is
serialised. Streamed, each layer's tensors are written as the pass reaches the layer and only
their location stays in the graph, so an export holds one layer's weights at a time. Offsets are
aligned so runtimes can map the file instead of reading it.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

ALIGNMENT = 4096  # page size: ONNX Runtime maps aligned external tensors instead of copying them
INLINE_BYTES = 64 * 1024  # smaller tensors (per-channel scales, zero points, biases) stay in the graph


class WeightStore:
    """Makes initializers: inline (`path` None) or streamed into the file at `path`."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self._file: BinaryIO | None = None if path is None else open(path, "wb")  # noqa: SIM115 - closed in close()
        self.written = 0

    def tensor(self, name: str, value: np.ndarray) -> TensorProto:
        """The initializer `name` holding `value`; its bytes go to the file when it streams."""
        value = np.ascontiguousarray(value)
        if self._file is None or value.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(value, name)
        end = self._file.tell()
        offset = end + (-end % ALIGNMENT)
        self._file.seek(offset)
        self._file.write(value.tobytes())
        self.written += value.nbytes
        tensor = TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(value.dtype))
        tensor.dims.extend(value.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, entry in (("location", self.path.name), ("offset", str(offset)), ("length", str(value.nbytes))):
            tensor.external_data.add(key=key, value=entry)
        return tensor

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> WeightStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
