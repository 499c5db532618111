"""Write one GGUF file tensor by tensor, beside its final name, then rename it into place.

``GGUFWriter.add_tensor`` keeps every array until the end, which for a 7B
model is 14 GB of float16 in memory. Here each tensor is planned first (name,
shape, type: enough for the header), then loaded, converted and written one
at a time, with a progress line every tenth of the bytes. A reader never sees a
half-written file: the data goes to ``.NAME.partial`` and is renamed when
complete; a full disk removes the partial file and says so in one line.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune.errors import UserError

if TYPE_CHECKING:
    import gguf
    import numpy as np

DTYPES = ("f16", "q8_0")


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, columns)
    kind: str  # "f32", "f16" or "q8_0"
    load: Callable[[], np.ndarray]  # float32, computed only when written


def weight_kind(shape: Sequence[int], dtype: str) -> str:
    """Vectors (norms) stay float32, as llama.cpp's converter keeps them; q8_0 needs rows of 32."""
    if len(shape) < 2:
        return "f32"
    if dtype == "q8_0" and shape[-1] % 32 == 0:
        return "q8_0"
    return "f16"


def _encoded(tensor: PlannedTensor, data: np.ndarray) -> np.ndarray:
    import gguf
    import numpy as np

    if tuple(data.shape) != tensor.shape:
        raise ValueError(f"{tensor.name}: planned {tensor.shape}, got {data.shape}")
    if tensor.kind == "q8_0":
        return gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return np.ascontiguousarray(data, dtype=np.float16 if tensor.kind == "f16" else np.float32)


def _add_info(writer: gguf.GGUFWriter, tensor: PlannedTensor) -> int:
    import gguf
    import numpy as np

    if tensor.kind == "q8_0":
        qtype = gguf.GGMLQuantizationType.Q8_0
        byte_shape = gguf.quants.quant_shape_to_byte_shape(tensor.shape, qtype)
        nbytes = int(np.prod(byte_shape))
        writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        return nbytes
    dtype = np.dtype(np.float16 if tensor.kind == "f16" else np.float32)
    nbytes = int(np.prod(tensor.shape)) * dtype.itemsize
    writer.add_tensor_info(tensor.name, tensor.shape, dtype, nbytes)
    return nbytes


def planned_bytes(tensors: Sequence[PlannedTensor]) -> int:
    """The tensor data a plan writes (the header adds a few MB at most, the vocabulary)."""
    import gguf
    import numpy as np

    total = 0
    for tensor in tensors:
        if tensor.kind == "q8_0":
            shape = gguf.quants.quant_shape_to_byte_shape(
                tensor.shape, gguf.GGMLQuantizationType.Q8_0
            )
            total += int(np.prod(shape))
        else:
            total += int(np.prod(tensor.shape)) * (2 if tensor.kind == "f16" else 4)
    return total


def write_gguf(
    path: Path,
    writer_setup: Callable[[gguf.GGUFWriter], None],
    tensors: Sequence[PlannedTensor],
    *,
    progress: bool = True,
) -> Path:
    """Write ``path`` atomically: metadata from ``writer_setup``, then ``tensors`` in order."""
    import gguf

    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer_setup(writer)
        total = sum(_add_info(writer, tensor) for tensor in tensors)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done, shown, start = 0, 0, time.monotonic()
        for tensor in tensors:
            data = _encoded(tensor, tensor.load())
            writer.write_tensor_data(data)
            done += data.nbytes
            tenth = done * 10 // max(total, 1)
            if progress and tenth > shown and total > 64 * 2**20:  # small files need no progress
                shown = tenth
                print(
                    f"{path.name}: {done / 2**30:.2f} of {total / 2**30:.2f} GiB "
                    f"({time.monotonic() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        writer.close()
        os.replace(partial, path)
    except OSError as exc:
        writer.close()
        partial.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"the disk holding {path.parent} is full writing {path.name}: free some space "
                "or choose another --out"
            ) from exc
        raise
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path
