"""2-D RoPE over a patch grid at another resolution: per-axis frequency ratios (numpy only).

A ViT's 2-D RoPE gives each angle channel c the angle a_c·row + b_c·column. Running it on a larger grid than it
was trained on is the 2-D analogue of context extension, done per axis with the factor s = target / original
of that axis:

- ``linear`` (interpolation): positions divided by s, i.e. every frequency of the axis divided by s. This is
  timm's ``ref_feat_shape`` (EVA-02: positions t · ref / feat) at the target grid and rotary-embedding-torch's
  ``interpolate_factor`` (positions / factor).
- ``ntk``: the axis's base raised as NTK-aware scaling does for a 1-D RoPE of the axis's own dimension
  (2 x its number of frequencies); needs geometric frequencies on the axis.
- ``yarn``: YaRN per axis, with the axis's original grid size as its trained length; the attention factor is
  YaRN's for the larger of the two factors.

Mixed channels (reading both axes, RoPE-Mixed) take a ratio only when both axes have the same factor (then it
is one ratio for every channel); anything else is refused (ValueError with the reason).
"""

from __future__ import annotations

import numpy as np

from posrewrite.math import rope as rope_math
from posrewrite.math import rope_fit

GRID_METHODS = ("linear", "ntk", "yarn")
#: the patch grids 2-D angles are probed at: sizes unlikely to equal a channel count, of different shapes
PROBE_GRIDS = ((7, 11), (13, 5))


def fit_grid_angles(arr: np.ndarray, h: int, w: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """(slopes [2, channels], channel shape) of an angle tensor evaluated on an h x w patch grid: every channel
    (the axes that are not the grid's, flattened) fitted as a·row + b·column + c over the grid, whose axes are
    one of size h·w (row-major) or two of sizes h and w. ValueError when there is no such axis or the angles
    are not linear in row and column."""
    shape = arr.shape
    if h * w in shape:
        axis = shape.index(h * w)
        moved = np.moveaxis(arr, axis, 0).reshape(h * w, -1)
        rows, cols = np.divmod(np.arange(h * w), w)
        grid_axes = (axis,)
    elif h in shape and w in shape and shape.index(h) < shape.index(w):
        ah, aw = shape.index(h), shape.index(w)
        moved = np.moveaxis(arr, (ah, aw), (0, 1)).reshape(h * w, -1)
        rows, cols = np.divmod(np.arange(h * w), w)
        grid_axes = (ah, aw)
    else:
        raise ValueError(f"angles of shape {shape} have no axis for a {h}x{w} probe grid")
    design = np.stack([rows, cols, np.ones_like(rows)], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, moved, rcond=None)
    residual = float(np.max(np.abs(design @ coef - moved), initial=0.0))
    if residual > 1e-4 * max(1.0, float(np.max(np.abs(moved), initial=0.0))):
        raise ValueError(f"angles are not linear in the grid's row and column (residual {residual:.3g})")
    channel_shape = tuple(1 if k in grid_axes else d for k, d in enumerate(shape))
    return coef[:2], channel_shape


def slopes_depend_on_grid(slopes: np.ndarray, other: np.ndarray) -> bool:
    """Whether the slopes read at two grids differ (coordinates normalised by the grid size)."""
    scale = max(float(np.max(np.abs(slopes), initial=0.0)), 1e-30)
    return not np.allclose(slopes, other, rtol=1e-4, atol=1e-6 * scale)



def axis_frequencies(slopes: np.ndarray) -> np.ndarray:
    """The distinct non-zero |frequencies| of one axis, fastest first (a 1-D RoPE's inv_freq order)."""
    f = np.abs(np.asarray(slopes, dtype=np.float64).reshape(-1))
    f = f[f > 0]
    if f.size == 0:
        return f
    f = np.sort(f)[::-1]
    keep = [f[0]]
    for v in f[1:]:
        if abs(v - keep[-1]) > 1e-6 * keep[-1]:
            keep.append(v)
    return np.asarray(keep)


def axis_ratios(method: str, frequencies: np.ndarray, factor: float, original: int) -> tuple[np.ndarray, float]:
    """New / old frequency for each of one axis's `frequencies` (fastest first) and the attention factor."""
    f = np.asarray(frequencies, dtype=np.float64)
    if method == "linear" or factor == 1.0:
        return np.full(f.shape, 1.0 / factor), 1.0
    dim = 2 * f.size
    base = rope_fit.fit_base(f.astype(np.float32), dim) if f.size >= 2 else None
    if base is None or abs(f[0] - 1.0) > 1e-4:
        raise ValueError(f"{method} per axis needs frequencies b^(-2i/d) on the axis (starting at 1); "
                         "these are not (use --rope-method linear)")
    if method == "ntk":
        params = rope_math.RopeParameters(rope_type="ntk", factor=float(factor))
    elif method == "yarn":
        params = rope_math.RopeParameters(rope_type="yarn", factor=float(factor),
                                          original_max_position_embeddings=int(original))
    else:
        raise ValueError(f"2-D RoPE takes --rope-method {', '.join(GRID_METHODS)}, not {method!r}")
    new, attention = rope_math.scaled_inv_freq(params, inv_freq=f.astype(np.float32), base=base, dim=dim)
    return np.asarray(new, np.float64) / f, float(attention)


def channel_ratios(row_slope: np.ndarray, col_slope: np.ndarray, method: str, original: tuple[int, int],
                   target: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Per angle channel, the ratio its angle is multiplied by, and the attention factor on cos/sin."""
    if method not in GRID_METHODS:
        raise ValueError(f"2-D RoPE takes --rope-method {', '.join(GRID_METHODS)}, not {method!r}")
    a = np.asarray(row_slope, np.float64).reshape(-1)
    b = np.asarray(col_slope, np.float64).reshape(-1)
    factors = (target[0] / original[0], target[1] / original[1])
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)), 1e-30)
    reads_a, reads_b = np.abs(a) > 1e-6 * scale, np.abs(b) > 1e-6 * scale
    ratio = np.ones(a.shape)
    attention = 1.0
    mixed = reads_a & reads_b
    if mixed.any():
        if method != "linear" or not np.isclose(factors[0], factors[1], rtol=1e-12):
            raise ValueError("mixed 2-D RoPE (channels reading both axes) can only be interpolated by one factor "
                             f"on both axes (--rope-method linear, a target grid of the same shape); asked for "
                             f"{method} x{factors[0]:g} rows, x{factors[1]:g} columns")
        ratio[mixed] = 1.0 / factors[0]
    for k, (slopes, reads) in enumerate(((a, reads_a & ~reads_b), (b, reads_b & ~reads_a))):
        if not reads.any():
            continue
        freqs = axis_frequencies(slopes[reads])
        r, att = axis_ratios(method, freqs, factors[k], original[k])
        attention = max(attention, att)
        for c in np.flatnonzero(reads):
            i = int(np.argmin(np.abs(freqs - abs(slopes[c]))))
            ratio[c] = r[i]
    return ratio, attention


__all__ = ["GRID_METHODS", "PROBE_GRIDS", "axis_frequencies", "axis_ratios", "channel_ratios", "fit_grid_angles",
           "slopes_depend_on_grid"]


def read_position_deltas(deltas: list[np.ndarray], seq: int, scale: float,
                         refuse: type[Exception]) -> tuple[int, np.ndarray]:
    """(token axis, slope per element) of angle probes `deltas` (each: the angles with one row of the position
    input set to 0..seq-1, minus the angles at positions 0), shared by the ONNX and fx probes. Every delta must be
    proportional to the position along the token axis (within 1e-5 of the largest magnitude seen, at least
    `scale`) and each angle element must read at most one row; else `refuse` with the reason."""
    arr = deltas[0]
    token = next((axis for axis in range(arr.ndim - 1, -1, -1) if arr.shape[axis] == seq
                  and all(np.any(np.take(d, [1], axis=axis) != 0) for d in deltas if np.any(d != 0))), None)
    if token is None:
        raise refuse(f"no token axis of size {seq} in the probed angles {arr.shape}")
    freq = sum(np.take(d, [1], axis=token) for d in deltas)
    for d in deltas:
        slope = np.take(d, [1], axis=token)
        steps = np.arange(d.shape[token]).reshape([-1 if k == token else 1 for k in range(d.ndim)])
        scale = max(scale, float(np.max(np.abs(d), initial=0.0)))
        if np.max(np.abs(d - slope * steps), initial=0.0) > 1e-5 * scale:
            raise refuse("the angles are not proportional to the positions")
    reads = np.stack([np.abs(np.take(d, [1], axis=token)) > 0 for d in deltas])
    if np.any(reads.sum(axis=0) > 1):
        raise refuse("an angle reads several rows of the position input")
    return token, freq


def grid_rescale(axes, method: str, original: tuple[int, int], target: tuple[int, int]
                 ) -> tuple[np.ndarray, float, rope_math.RopeParameters]:
    """(per-channel angle ratio, attention factor, RopeParameters recorded) of a 2-D RoPE with grid axes `axes`
    (`sites.rope_axes.GridAxes`) run at the `target` patch grid instead of `original`, shared by the ONNX and fx
    planners; ValueError with the reason when it cannot take it (normalised coordinates: nothing to rescale)."""
    if axes.normalised:
        raise ValueError("this 2-D RoPE reads grid coordinates normalised by the grid size: the model already "
                         "adapts to resolution, there is nothing to rescale")
    ratio, attention = channel_ratios(axes.row_slope, axes.col_slope, method, original, target)
    factor = max(target[0] / original[0], target[1] / original[1])
    return ratio, float(attention), rope_math.RopeParameters(rope_type=method, factor=float(factor))

