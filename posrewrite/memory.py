"""How much memory an onnxruntime session would take, and how much there is: checked before every session
validation opens, so that posrewrite refuses (or falls back to a smaller check) instead of being killed.

- :func:`available_bytes`: ``POSREWRITE_MEMORY_LIMIT`` when set (bytes, or with a K/M/G suffix: a simulated
  limit), else the smaller of /proc/meminfo's MemAvailable and the cgroup's limit minus its usage.
- :func:`session_estimate`: the weights of a model as onnxruntime's CPU provider holds them plus its
  activations at the probe length. Measured on onnxruntime 1.32 (CPU): an fp16 weight read by MatMul/Gemm is
  turned into an fp32 copy by the Cast onnxruntime inserts and folds (the CPU MatMul has no fp16 kernel), so it
  costs its own bytes plus twice them; posrewrite's sessions disable pre-packing (which would copy fp32 MatMul
  weights once more). Activations: four times the largest float value the graph declares at the probe's
  sequence and total lengths (or the attention scores of every head, when larger), plus a few [sequence, width]
  buffers per distinct matrix width.
Reads no weight bytes: shapes and dtypes only.
"""

from __future__ import annotations

__all__ = ["MEMORY_LIMIT_ENV", "available_bytes", "session_estimate", "describe_bytes"]

import math
import os
import re

import onnx_ir as ir

#: Environment variable giving the memory posrewrite may use (bytes, or 512M / 4G): overrides what the
#: system reports (a test, a container whose limits the kernel does not show, or a user who wants headroom).
MEMORY_LIMIT_ENV = "POSREWRITE_MEMORY_LIMIT"
#: What the process needs beside a session: the interpreter, numpy, onnx_ir's graph, onnxruntime's code.
_BASE_BYTES = 400 << 20
_MATMUL_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "MatMulInteger"})
_HALF = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _parse(text: str) -> int | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)[iI]?[bB]?\s*", text)
    if not m:
        return None
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """The cgroup's limit minus its current usage (v2, else v1); None when unlimited or unknown."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit_text = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 1 << 60:
            return None
        return max(0, int(limit_text) - usage)
    return None


def available_bytes() -> tuple[int | None, str]:
    """(bytes a new session may take, where the figure comes from); None when nothing says."""
    env = os.environ.get(MEMORY_LIMIT_ENV)
    if env:
        value = _parse(env)
        if value is not None:
            return value, f"{MEMORY_LIMIT_ENV}={env}"
    found = [(v, what) for v, what in ((_meminfo_available(), "MemAvailable"), (_cgroup_room(), "the cgroup limit"))
             if v is not None]
    if not found:
        return None, "unknown"
    return min(found)


def describe_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def _dims(value: ir.Value, seq: int, total: int) -> list[int] | None:
    """Static dims of `value`; symbolic ones by name: a batch (a name with 'batch', or the first axis when
    unnamed otherwise) is 1, the first other name is the sequence length, the second the total length, further
    ones 1; None when a dimension is unknown (the value is not counted)."""
    if value.shape is None:
        return None
    dims = []
    named: dict[str, int] = {}
    long_axes = [seq, total]
    for k, d in enumerate(value.shape.dims):
        if isinstance(d, int):
            dims.append(max(d, 0))
            continue
        name = getattr(d, "value", None)
        if name is None:
            return None
        if "batch" in str(name).lower() or (k == 0 and len(value.shape.dims) > 2):
            dims.append(1)
            continue
        if name not in named:
            named[name] = long_axes.pop(0) if long_axes else 1
        dims.append(named[name])
    return dims


def session_estimate(model: ir.Model, seq: int, total: int | None = None, heads: int | None = None) -> dict:
    """Bytes an onnxruntime CPU session of `model` needs for a call over `seq` new tokens and `total` positions
    in all (past + new): {"weights", "activations", "total"}. No weight is read."""
    total = max(total or seq, seq)
    half_matmul: set[int] = set()
    for node in model.graph:
        if node.op_type in _MATMUL_OPS:
            for v in node.inputs:
                if v is not None and v.const_value is not None and v.dtype in _HALF:
                    half_matmul.add(id(v))
    weights = 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is None:
            continue
        if isinstance(t, ir.ExternalTensor) and v.uses() and all(
                n.op_type == "Gather" and k == 0 for n, k in v.uses()):
            continue  # a table onnxruntime maps from its file: only the rows gathered are read
        try:
            n = int(t.nbytes)
        except Exception:  # noqa: BLE001 - a tensor that cannot say its size counts as small
            continue
        weights += n * 3 if id(v) in half_matmul else n
    # activations: the distinct float shapes the graph declares (repeated layers reuse onnxruntime's arena), a
    # few live [seq, width] buffers per distinct matrix width, and the attention scores
    shapes: dict[tuple, int] = {}
    for node in model.graph:
        for v in node.outputs:
            if v.dtype is None or not v.dtype.is_floating_point():
                continue
            dims = _dims(v, seq, total)
            if dims is not None:
                shapes[tuple(dims)] = math.prod(dims) * max(4, v.dtype.itemsize)
    widths: dict[int, int] = {}
    for v in model.graph.initializers.values():
        if v.const_value is not None and v.shape is not None and len(v.shape.dims) == 2:
            for d in v.shape.dims:
                if isinstance(d, int):
                    widths[d] = widths.get(d, 0) + 1
    hidden = max(widths, key=lambda w: (widths[w], w)) if widths else 1
    heads = heads or max(1, hidden // 128)
    scores = 3 * heads * seq * total * 4  # scores, softmax, the masked copy (fp32)
    # onnxruntime frees a value after its last use: a few of the largest are alive at once
    largest = 4 * max(shapes.values(), default=0)
    activations = max(largest, scores) + 4 * seq * sum(widths) * 4
    return {"weights": weights, "activations": activations, "total": weights + activations + _BASE_BYTES}
