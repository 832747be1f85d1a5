"""Fused rotary-embedding custom ops (`torch.ops.posrewrite.*`).

Four ops, all computing the rotation in float32 and returning tensors laid out like their inputs:

    rope(x, cos, sin, interleaved, rotary_dim, seq_axis) -> y
    rope_qk(q, k, cos, sin, interleaved, rotary_dim, seq_axis) -> (q_out, k_out)
    rope_freqs(x, positions, inv_freq, attention_factor, interleaved, seq_axis) -> y
    rope_qk_freqs(q, k, positions, inv_freq, attention_factor, interleaved, seq_axis) -> (q_out, k_out)

Shapes: ``x``/``q``/``k`` are 4-D, ``[batch, heads, seq, head_dim]`` when ``seq_axis == 2`` or
``[batch, seq, heads, head_dim]`` when ``seq_axis == 1``; ``k`` may have fewer heads than ``q`` (GQA).
``cos``/``sin`` hold one value per rotated pair (the "half" form, last axis ``rotary_dim // 2``) and
broadcast against ``x[..., :rotary_dim // 2]`` with size 1 on the heads axis, e.g. ``[batch, 1, seq, r/2]``.
The ``*_freqs`` forms compute the angles ``positions[b, s] * inv_freq[i]`` (float32) themselves, multiply
cos and sin by ``attention_factor``; ``positions`` is ``[batch or 1, seq]`` and ``rotary_dim`` is
``2 * len(inv_freq)``. Channels past ``rotary_dim`` pass through. Layout ``interleaved`` rotates pairs
(2i, 2i+1); otherwise the halves ``[:r/2]`` and ``[r/2:r]`` of the rotary part (rotate-half).

The output dtype is ``torch.promote_types(x.dtype, cos.dtype)`` (tables form) or ``x.dtype`` (freqs form),
which is what the unfused graph computes. CPU (and any device without a kernel) runs the plain-torch
reference below; CUDA runs one Triton launch for q and k (`posrewrite.ops.rope_triton`). Autograd is
registered (the rotation's transpose is the rotation by the opposite angle).
"""

from __future__ import annotations

import torch

__all__ = [
    "rope",
    "rope_qk",
    "rope_freqs",
    "rope_qk_freqs",
    "rotate_reference",
    "angles_cos_sin",
    "check_rope_args",
]


# --------------------------------------------------------------------------------------------------
# Reference (plain torch)
# --------------------------------------------------------------------------------------------------


def check_rope_args(x: torch.Tensor, half: int, rotary_dim: int, seq_axis: int, what: str = "x") -> None:
    """Raise ValueError when ``x`` cannot be rotated with ``half`` pairs."""
    if x.dim() != 4:
        raise ValueError(f"posrewrite rope: {what} must be 4-D, got shape {tuple(x.shape)}")
    if seq_axis not in (1, 2):
        raise ValueError(f"posrewrite rope: seq_axis must be 1 or 2, got {seq_axis}")
    if rotary_dim % 2 or rotary_dim < 2 or rotary_dim > x.shape[-1]:
        raise ValueError(
            f"posrewrite rope: rotary_dim {rotary_dim} must be even, >= 2 and <= head_dim {x.shape[-1]}"
        )
    if 2 * half != rotary_dim:
        raise ValueError(f"posrewrite rope: cos/sin last axis {half} does not match rotary_dim {rotary_dim}")


def _pair_views(xr: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) members of every rotated pair of the rotary part ``xr``."""
    if interleaved:
        return xr[..., 0::2], xr[..., 1::2]
    half = xr.shape[-1] // 2
    return xr[..., :half], xr[..., half:]


def _join_pairs(a: torch.Tensor, b: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack((a, b), dim=-1).flatten(-2)
    return torch.cat((a, b), dim=-1)


def rotate_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, rotary_dim: int
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x`` by angles given as half-form cos/sin (float32
    math, result in the promoted dtype, contiguous)."""
    out_dtype = torch.promote_types(x.dtype, cos.dtype)
    compute = torch.promote_types(out_dtype, torch.float32)  # float32, or float64 for float64 inputs
    xf = x.to(compute)
    c = cos.to(compute)
    s = sin.to(compute)
    a, b = _pair_views(xf[..., :rotary_dim], interleaved)
    rotated = _join_pairs(a * c - b * s, b * c + a * s, interleaved)
    if rotary_dim < x.shape[-1]:
        rotated = torch.cat((rotated, xf[..., rotary_dim:]), dim=-1)
    return rotated.to(out_dtype)


def angles_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float, seq_axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-form float32 cos/sin ``[batch, 1, seq, r/2]`` (or ``[batch, seq, 1, r/2]``) from positions
    ``[batch, seq]`` and ``inv_freq`` ``[r/2]``."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    cos = torch.cos(angles)
    sin = torch.sin(angles)
    if attention_factor != 1.0:
        cos = cos * attention_factor
        sin = sin * attention_factor
    heads_axis = 3 - seq_axis
    return cos.unsqueeze(heads_axis), sin.unsqueeze(heads_axis)


def _like(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` copied into a fresh tensor with x's layout (what every implementation returns)."""
    out = torch.empty_like(x, dtype=value.dtype)
    out.copy_(value)
    return out


def _check_positions(positions: torch.Tensor, x: torch.Tensor, seq_axis: int) -> None:
    if positions.dim() != 2:
        raise ValueError(f"posrewrite rope: positions must be [batch, seq], got {tuple(positions.shape)}")
    if positions.shape[1] != x.shape[seq_axis] or positions.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"posrewrite rope: positions {tuple(positions.shape)} do not fit x {tuple(x.shape)} "
            f"(seq_axis {seq_axis})"
        )


# --------------------------------------------------------------------------------------------------
# Op definitions: default (CPU / any device) implementations
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("posrewrite::rope", mutates_args=())
def rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, rotary_dim: int, seq_axis: int
) -> torch.Tensor:
    check_rope_args(x, cos.shape[-1], rotary_dim, seq_axis)
    return _like(x, rotate_reference(x, cos, sin, interleaved, rotary_dim))


@torch.library.custom_op("posrewrite::rope_qk", mutates_args=())
def rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool,
    rotary_dim: int,
    seq_axis: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_rope_args(q, cos.shape[-1], rotary_dim, seq_axis, "q")
    check_rope_args(k, cos.shape[-1], rotary_dim, seq_axis, "k")
    return (
        _like(q, rotate_reference(q, cos, sin, interleaved, rotary_dim)),
        _like(k, rotate_reference(k, cos, sin, interleaved, rotary_dim)),
    )


@torch.library.custom_op("posrewrite::rope_freqs", mutates_args=())
def rope_freqs(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float,
    interleaved: bool,
    seq_axis: int,
) -> torch.Tensor:
    rotary_dim = 2 * inv_freq.shape[-1]
    check_rope_args(x, inv_freq.shape[-1], rotary_dim, seq_axis)
    _check_positions(positions, x, seq_axis)
    cos, sin = angles_cos_sin(positions, inv_freq, attention_factor, seq_axis)
    return _like(x, rotate_reference(x, cos, sin, interleaved, rotary_dim).to(x.dtype))


@torch.library.custom_op("posrewrite::rope_qk_freqs", mutates_args=())
def rope_qk_freqs(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: float,
    interleaved: bool,
    seq_axis: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    rotary_dim = 2 * inv_freq.shape[-1]
    check_rope_args(q, inv_freq.shape[-1], rotary_dim, seq_axis, "q")
    check_rope_args(k, inv_freq.shape[-1], rotary_dim, seq_axis, "k")
    _check_positions(positions, q, seq_axis)
    _check_positions(positions, k, seq_axis)
    cos, sin = angles_cos_sin(positions, inv_freq, attention_factor, seq_axis)
    return (
        _like(q, rotate_reference(q, cos, sin, interleaved, rotary_dim).to(q.dtype)),
        _like(k, rotate_reference(k, cos, sin, interleaved, rotary_dim).to(k.dtype)),
    )


# --------------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes, dtypes and layouts only
# --------------------------------------------------------------------------------------------------


@rope.register_fake
def _rope_fake(x, cos, sin, interleaved, rotary_dim, seq_axis):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))


@rope_qk.register_fake
def _rope_qk_fake(q, k, cos, sin, interleaved, rotary_dim, seq_axis):
    dtype = torch.promote_types(q.dtype, cos.dtype)
    return torch.empty_like(q, dtype=dtype), torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype))


@rope_freqs.register_fake
def _rope_freqs_fake(x, positions, inv_freq, attention_factor, interleaved, seq_axis):
    return torch.empty_like(x)


@rope_qk_freqs.register_fake
def _rope_qk_freqs_fake(q, k, positions, inv_freq, attention_factor, interleaved, seq_axis):
    return torch.empty_like(q), torch.empty_like(k)


# --------------------------------------------------------------------------------------------------
# Autograd: the transpose of a rotation by theta is the rotation by -theta
# --------------------------------------------------------------------------------------------------


def _grad_x(grad: torch.Tensor, x: torch.Tensor, cos, sin, interleaved: bool, rotary_dim: int) -> torch.Tensor:
    return rotate_reference(grad, cos, -sin, interleaved, rotary_dim).to(x.dtype)


def _grad_tables(grad, x, cos, sin, interleaved: bool, rotary_dim: int):
    """d loss / d cos and d loss / d sin, reduced to the (broadcast) shapes of cos and sin."""
    compute = torch.promote_types(torch.promote_types(grad.dtype, x.dtype), torch.float32)
    g1, g2 = _pair_views(grad.to(compute)[..., :rotary_dim], interleaved)
    a, b = _pair_views(x.to(compute)[..., :rotary_dim], interleaved)
    d_cos = g1 * a + g2 * b
    d_sin = g2 * a - g1 * b
    return d_cos.sum_to_size(cos.shape).to(cos.dtype), d_sin.sum_to_size(sin.shape).to(sin.dtype)


def _setup_tables(ctx, inputs, output):
    *tensors, interleaved, rotary_dim, _seq_axis = inputs
    ctx.save_for_backward(*tensors)
    ctx.interleaved = interleaved
    ctx.rotary_dim = rotary_dim


def _rope_backward(ctx, grad):
    x, cos, sin = ctx.saved_tensors
    il, r = ctx.interleaved, ctx.rotary_dim
    d_cos = d_sin = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        d_cos, d_sin = _grad_tables(grad, x, cos, sin, il, r)
    return _grad_x(grad, x, cos, sin, il, r), d_cos, d_sin, None, None, None


def _rope_qk_backward(ctx, grad_q, grad_k):
    q, k, cos, sin = ctx.saved_tensors
    il, r = ctx.interleaved, ctx.rotary_dim
    d_cos = d_sin = None
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        cq, sq = _grad_tables(grad_q, q, cos, sin, il, r)
        ck, sk = _grad_tables(grad_k, k, cos, sin, il, r)
        d_cos, d_sin = cq + ck, sq + sk
    return _grad_x(grad_q, q, cos, sin, il, r), _grad_x(grad_k, k, cos, sin, il, r), d_cos, d_sin, None, None, None


def _setup_freqs(ctx, inputs, output):
    *tensors, attention_factor, interleaved, seq_axis = inputs
    ctx.save_for_backward(*tensors)
    ctx.attention_factor = attention_factor
    ctx.interleaved = interleaved
    ctx.seq_axis = seq_axis


def _rope_freqs_backward(ctx, grad):
    x, positions, inv_freq = ctx.saved_tensors
    cos, sin = angles_cos_sin(positions, inv_freq, ctx.attention_factor, ctx.seq_axis)
    return _grad_x(grad, x, cos, sin, ctx.interleaved, 2 * inv_freq.shape[-1]), None, None, None, None, None


def _rope_qk_freqs_backward(ctx, grad_q, grad_k):
    q, k, positions, inv_freq = ctx.saved_tensors
    cos, sin = angles_cos_sin(positions, inv_freq, ctx.attention_factor, ctx.seq_axis)
    r = 2 * inv_freq.shape[-1]
    return (
        _grad_x(grad_q, q, cos, sin, ctx.interleaved, r),
        _grad_x(grad_k, k, cos, sin, ctx.interleaved, r),
        None, None, None, None, None,
    )


rope.register_autograd(_rope_backward, setup_context=_setup_tables)
rope_qk.register_autograd(_rope_qk_backward, setup_context=_setup_tables)
rope_freqs.register_autograd(_rope_freqs_backward, setup_context=_setup_freqs)
rope_qk_freqs.register_autograd(_rope_qk_freqs_backward, setup_context=_setup_freqs)


# --------------------------------------------------------------------------------------------------
# CUDA: one Triton launch (falls back to the reference when Triton is missing)
# --------------------------------------------------------------------------------------------------


def _triton_launch():
    try:
        from posrewrite.ops.rope_triton import launch
    except ImportError:  # pragma: no cover - triton not installed
        return None
    return launch


@rope.register_kernel("cuda")
def _rope_cuda(x, cos, sin, interleaved, rotary_dim, seq_axis):
    launch = _triton_launch()
    check_rope_args(x, cos.shape[-1], rotary_dim, seq_axis)
    if launch is None:
        return _like(x, rotate_reference(x, cos, sin, interleaved, rotary_dim))
    out, _ = launch(x, None, cos=cos, sin=sin, interleaved=interleaved, rotary_dim=rotary_dim,
                    seq_axis=seq_axis, out_dtype=torch.promote_types(x.dtype, cos.dtype))
    return out


@rope_qk.register_kernel("cuda")
def _rope_qk_cuda(q, k, cos, sin, interleaved, rotary_dim, seq_axis):
    launch = _triton_launch()
    check_rope_args(q, cos.shape[-1], rotary_dim, seq_axis, "q")
    check_rope_args(k, cos.shape[-1], rotary_dim, seq_axis, "k")
    if launch is None or q.dtype != k.dtype:
        return (_like(q, rotate_reference(q, cos, sin, interleaved, rotary_dim)),
                _like(k, rotate_reference(k, cos, sin, interleaved, rotary_dim)))
    return launch(q, k, cos=cos, sin=sin, interleaved=interleaved, rotary_dim=rotary_dim, seq_axis=seq_axis,
                  out_dtype=torch.promote_types(q.dtype, cos.dtype))


@rope_freqs.register_kernel("cuda")
def _rope_freqs_cuda(x, positions, inv_freq, attention_factor, interleaved, seq_axis):
    launch = _triton_launch()
    rotary_dim = 2 * inv_freq.shape[-1]
    check_rope_args(x, inv_freq.shape[-1], rotary_dim, seq_axis)
    _check_positions(positions, x, seq_axis)
    if launch is None:
        cos, sin = angles_cos_sin(positions, inv_freq, attention_factor, seq_axis)
        return _like(x, rotate_reference(x, cos, sin, interleaved, rotary_dim).to(x.dtype))
    out, _ = launch(x, None, positions=positions, inv_freq=inv_freq, attention_factor=attention_factor,
                    interleaved=interleaved, rotary_dim=rotary_dim, seq_axis=seq_axis, out_dtype=x.dtype)
    return out


@rope_qk_freqs.register_kernel("cuda")
def _rope_qk_freqs_cuda(q, k, positions, inv_freq, attention_factor, interleaved, seq_axis):
    launch = _triton_launch()
    rotary_dim = 2 * inv_freq.shape[-1]
    check_rope_args(q, inv_freq.shape[-1], rotary_dim, seq_axis, "q")
    check_rope_args(k, inv_freq.shape[-1], rotary_dim, seq_axis, "k")
    _check_positions(positions, q, seq_axis)
    if launch is None or q.dtype != k.dtype:
        cos, sin = angles_cos_sin(positions, inv_freq, attention_factor, seq_axis)
        return (_like(q, rotate_reference(q, cos, sin, interleaved, rotary_dim).to(q.dtype)),
                _like(k, rotate_reference(k, cos, sin, interleaved, rotary_dim).to(k.dtype)))
    return launch(q, k, positions=positions, inv_freq=inv_freq, attention_factor=attention_factor,
                  interleaved=interleaved, rotary_dim=rotary_dim, seq_axis=seq_axis, out_dtype=q.dtype)
