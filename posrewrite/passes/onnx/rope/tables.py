"""RoPE cos/sin tables found in a graph: reading them as [positions, channels] arrays and recovering the
(inv_freq, attention factor) they were computed with."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from posrewrite.math.precision import machine_epsilon
from posrewrite.passes.onnx._graph import ConstantEvaluator, dtype_name
from posrewrite.sites.rope import Layout


class NotUnderstood(Exception):
    """A RoPE source that detection cannot describe; the message is the refusal's reason."""


def table_eps(value: ir.Value | None) -> float:
    """Machine epsilon of a half-precision table's type; float32's for any other (or unknown) type."""
    name = dtype_name(value)
    return machine_epsilon(name if name in ("float16", "bfloat16") else "float32")


def table_part(t: np.ndarray, columns: tuple[int, int] | None, component: int | None) -> np.ndarray:
    """The part of a stored table holding one function: element `component` of a trailing axis of stacked
    (cos, sin) (torchtune's cache [positions, d/2, 2]), then the column range `columns` (GPT-J's concat)."""
    if component is not None:
        t = t[..., component]
    if columns is not None:
        t = t[..., columns[0]:columns[1]]
    return t


def part_width(shape: tuple[int, ...], columns: tuple[int, int] | None, component: int | None) -> tuple[int, int]:
    """(lo, hi): the column range of a table part, over the whole width when `columns` is None."""
    width = shape[-2] if component is not None else shape[-1]
    return columns if columns is not None else (0, width)


def write_part(new: np.ndarray, block: np.ndarray, columns: tuple[int, int] | None, component: int | None,
               row_axis: int, rows: int) -> None:
    """Writes `block` [rows, hi - lo] into the part of `new` that `table_part` reads."""
    lo, hi = part_width(new.shape, columns, component)
    axes = new.ndim - (2 if component is not None else 1)
    shaped = block.reshape([rows if k == row_axis else 1 for k in range(axes)] + [hi - lo])
    if component is not None:
        new[..., lo:hi, component] = shaped
    else:
        new[..., lo:hi] = shaped


def table_array(fold: ConstantEvaluator, table: ir.Value, columns: tuple[int, int] | None,
                component: int | None = None) -> np.ndarray | None:
    """The float64 rows of a constant table (its part holding one function), broadcast axes of size 1 dropped."""
    t = fold(table)
    if t is None:
        return None
    t = table_part(np.asarray(t, dtype=np.float64), columns, component)
    # drop broadcast axes of size 1: [1, N, w] or [N, 1, w] -> [N, w]
    kept = [d for d in t.shape[:-1] if d != 1] or [1]
    return t.reshape(kept + [t.shape[-1]]) if len(kept) == 1 else t


def fit_tables(cos_t: np.ndarray, sin_t: np.ndarray, layout: Layout | str,
               eps: float = machine_epsilon("float32")) -> tuple[np.ndarray, float]:
    """Recovers (inv_freq, attention factor) from cos/sin tables [N, w] by unwrapping their phase.
    `layout` "half" for tables holding rotary_dim/2 columns. Raises NotUnderstood."""
    if cos_t.ndim != 2 or cos_t.shape[0] < 2:
        raise NotUnderstood(f"cos/sin table of shape {cos_t.shape} is not [positions, channels]")
    width = cos_t.shape[1]
    if layout == "half":
        cols = np.arange(width)
    elif layout == Layout.ROTATE_HALF:
        if width % 2 or not np.allclose(cos_t[:, : width // 2], cos_t[:, width // 2:], atol=1e-3):
            # a table already holding only the half
            cols = np.arange(width)
        else:
            cols = np.arange(width // 2)
    else:
        if width % 2 == 0 and np.allclose(cos_t[:, 0::2], cos_t[:, 1::2], atol=1e-3):
            cols = np.arange(0, width, 2)
        else:
            cols = np.arange(width)
    c, s = cos_t[:, cols], sin_t[:, cols]
    amplitude = np.sqrt(c[0] ** 2 + s[0] ** 2)
    factor = float(np.median(amplitude))
    if factor <= 0:
        raise NotUnderstood("cos/sin table has zero amplitude")
    phase = np.unwrap(np.arctan2(s, c), axis=0)
    n = phase.shape[0]
    pos = np.arange(n, dtype=np.float64)
    # least-squares slope through the origin: phase = pos * inv_freq
    inv_freq = (pos @ phase) / (pos @ pos)
    resid = np.max(np.abs(phase - np.outer(pos, inv_freq)))
    # tables computed in half precision drift by up to ~position x eps in phase
    if resid > 1e-2 * max(1.0, n / 1000) + 4 * n * eps:
        raise NotUnderstood("cos/sin table is not cos/sin of position x frequency (rows not in position order?)")
    return inv_freq.astype(np.float32), factor
