"""Which values of the integer graph inputs a RoPE site's positions read make those positions 0..S-1.

A model's positions may be a ``position_ids`` input (fed 0..S-1), made from an attention mask's cumulative sum
(fed ones: a mask of ones gives 0..S-1), or a start added to the index (fed 0). Names do not say which: an exporter
may call the mask ``extra_0``. The angle tensor (or, for cached tables, the selected row index) is evaluated on
candidate feeds at two lengths; the feed under which it is pos·f with positions 0..S-1 (an offset inside the model
allowed: the same first angle at both lengths, a step per token that is one of the site's frequencies) is the one
a call over positions 0..S-1 gives, and the one the validation's oracle feeds (`RopeSite.position_feeds`).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

from posrewrite.passes.onnx._graph import ConstantEvaluator, call_input, model_opset
from posrewrite.passes.onnx.rope.probe import cone_inputs

#: the feeds tried, each a value every call over positions 0..S-1 can give: positions, a mask of ones, a start of 0
FEEDS = ("arange", "ones", "zeros")
_LENGTHS = (7, 13)
_EVAL_LIMIT = 4000
_MAX_ELEMENTS = 1 << 20


def feed_array(value: ir.Value, kind: str, batch: int, length: int) -> np.ndarray | None:
    """`value` for a call over `length` positions (symbolic dims as `call_input` sets them) filled as `kind`;
    None when `kind` does not fit its shape (0..S-1 on an input with no axis of that length)."""
    base = call_input(value, batch, length)
    if kind == "ones":
        return np.ones_like(base)
    if kind == "zeros":
        return np.zeros_like(base)
    if base.ndim == 0 or base.shape[-1] != length:
        return None
    return np.broadcast_to(np.arange(length).astype(base.dtype), base.shape).copy()


def _default_kind(value: ir.Value) -> str:
    """What `call_input` feeds without token ids, by name."""
    name = (value.name or "").lower()
    return "arange" if "position" in name else ("ones" if "mask" in name else "zeros")


def _counts(model: ir.Model, angles: ir.Value, inputs: list[ir.Value], kinds: dict[int, str],
            freqs: np.ndarray | None) -> bool:
    """Whether `angles` at both probe lengths is f·(t + b) along one token axis, with each non-zero step one of
    `freqs` and the same first angle at both lengths."""
    firsts = []
    for length in _LENGTHS:
        feeds = {}
        for v in inputs:
            arr = feed_array(v, kinds.get(id(v), _default_kind(v)), 1, length)
            if arr is None or arr.size > _MAX_ELEMENTS:
                return False
            feeds[id(v)] = arr
        fold = ConstantEvaluator(model_opset(model), feed=lambda v, f=feeds: f.get(id(v)), inputs=model.graph.inputs,
                                 max_nodes=_EVAL_LIMIT)
        try:
            arr = fold(angles)
        except Exception:  # noqa: BLE001 - a feed the cone cannot run on is not the one
            return False
        if arr is None:
            return False
        arr = np.asarray(arr, np.float64)
        axes = [k for k in range(arr.ndim) if arr.shape[k] == length]
        if not axes:
            return False
        token = axes[-1]
        t = np.arange(length).reshape([-1 if k == token else 1 for k in range(arr.ndim)])
        first = np.take(arr, [0], axis=token)
        step = np.take(arr, [1], axis=token) - first
        scale = max(1.0, float(np.max(np.abs(arr), initial=0.0)))
        if np.max(np.abs(arr - first - step * t), initial=0.0) > 1e-5 * scale:
            return False
        moving = np.abs(step[step != 0])
        if moving.size == 0:
            return False
        f = np.abs(np.asarray(freqs, np.float64).reshape(-1)) if freqs is not None else moving
        if not np.all(np.min(np.abs(moving[:, None] - f[None, :]), axis=1) <= 1e-4 * np.maximum(moving, 1e-30)):
            return False
        firsts.append(first.reshape(-1))
    return firsts[0].shape == firsts[1].shape and bool(
        np.max(np.abs(firsts[0] - firsts[1]), initial=0.0) <= 1e-5 * max(1.0, float(np.max(np.abs(firsts[0]),
                                                                                          initial=0.0))))


def position_feeds(model: ir.Model, angles: ir.Value, freqs: np.ndarray | None) -> tuple[tuple[str, str], ...]:
    """(input name, feed kind) for each integer graph input `angles` reads as data, such that the angles are those
    of positions 0..S-1; the name's default (`call_input`) first. `freqs` None: any step per token (the rotation
    probe, before frequencies are known). () when there is none, more than two, or no feed gives such angles."""
    if freqs is not None and np.size(freqs) == 0:
        return ()
    found = cone_inputs(model, [angles])
    ints = [v for v in found.data if v.dtype is not None and not v.dtype.is_floating_point()]
    if not ints or len(ints) > 2 or any(v.shape is None for v in (*found.data, *found.shape_only)):
        return ()
    inputs = [*found.data, *found.shape_only]
    options = [[_default_kind(v)] + [k for k in FEEDS if k != _default_kind(v)] for v in ints]
    for combo in itertools.product(*options):
        kinds = {id(v): k for v, k in zip(ints, combo, strict=True)}
        if _counts(model, angles, inputs, kinds, freqs):
            return tuple((v.name, k) for v, k in zip(ints, combo, strict=True))
    return ()


__all__ = ["FEEDS", "feed_array", "position_feeds"]
