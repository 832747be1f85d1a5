"""Dtype helpers shared by the RoPE precision analysis and the fp32 rewrite."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from posrewrite.passes.onnx._graph import const_tensor

F32 = ir.DataType.FLOAT
HALF_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
FLOAT_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE)
DTYPE_NAMES = {
    ir.DataType.FLOAT16: "float16",
    ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.FLOAT: "float32",
    ir.DataType.DOUBLE: "float64",
}
HALF_NAMES = ("float16", "bfloat16")


def dtype_of(value: ir.Value | None) -> str:
    if value is None or value.dtype is None:
        return "unknown"
    return DTYPE_NAMES.get(value.dtype, str(value.dtype).lower())


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in FLOAT_TYPES


def const_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = const_tensor(value)
    if tensor is None:
        return None
    return np.asarray(tensor.numpy())


def as_float64(arr: np.ndarray) -> np.ndarray:
    return np.asarray(arr).astype(np.float64)  # ml_dtypes' bfloat16 converts exactly too
