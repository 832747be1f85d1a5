"""Triton kernel for the fused rotary embedding: q and k rotated in one launch.

Grid: one program per (token, block of heads); the head blocks of q come first, then those of k, so a
GQA key with fewer heads just has fewer blocks. Every program loads the angles of its token once (from
half-form cos/sin tables, or as ``position * inv_freq`` computed in float32 from the positions and the
inverse frequencies), rotates ``BLOCK_H`` heads and copies the pass-through channels of partial rotary.
All math is float32; loads and stores use the tensors' strides, so transposed views such as HF's
``[batch, heads, seq, head_dim]`` (a view of ``[batch, seq, heads, head_dim]``) are read in place.

``launch`` is what the CUDA kernels of `posrewrite.ops.rope` call. It also runs on CPU tensors under
``TRITON_INTERPRET=1`` (that is how the tests check it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["launch"]


@triton.jit
def _rotate_heads(
    x_ptr, y_ptr, x_sb, x_sh, x_ss, x_sd, y_sb, y_sh, y_ss, y_sd,
    c_ptr, s_ptr, c_sb, c_sh, c_ss, c_sd, s_sb, s_sh, s_ss, s_sd,
    pos_ptr, p_sb, p_ss, freq_ptr, attention_factor,
    b, s, head0, n_heads,
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, FROM_FREQS: tl.constexpr,
):
    heads = head0 + tl.arange(0, BLOCK_H)[:, None]
    pairs = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (pairs < HALF)
    if FROM_FREQS:
        p = tl.load(pos_ptr + b * p_sb + s * p_ss).to(tl.float32)
        f = tl.load(freq_ptr + pairs, mask=pairs < HALF, other=0.0).to(tl.float32)
        angle = p * f
        cos = tl.cos(angle) * attention_factor
        sin = tl.sin(angle) * attention_factor
    else:
        cos = tl.load(c_ptr + b * c_sb + heads * c_sh + s * c_ss + pairs * c_sd, mask=mask, other=0.0)
        sin = tl.load(s_ptr + b * s_sb + heads * s_sh + s * s_ss + pairs * s_sd, mask=mask, other=0.0)
        cos = cos.to(tl.float32)
        sin = sin.to(tl.float32)
    if INTERLEAVED:
        first = 2 * pairs
        second = 2 * pairs + 1
    else:
        first = pairs
        second = pairs + HALF
    x_row = x_ptr + b * x_sb + s * x_ss + heads * x_sh
    y_row = y_ptr + b * y_sb + s * y_ss + heads * y_sh
    a = tl.load(x_row + first * x_sd, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(x_row + second * x_sd, mask=mask, other=0.0).to(tl.float32)
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_row + first * y_sd, (a * cos - c * sin).to(out_ty), mask=mask)
    tl.store(y_row + second * y_sd, (c * cos + a * sin).to(out_ty), mask=mask)
    if BLOCK_PASS > 0:
        rest = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
        rest_mask = (heads < n_heads) & (rest < HEAD_DIM)
        v = tl.load(x_row + rest * x_sd, mask=rest_mask, other=0.0)
        tl.store(y_row + rest * y_sd, v.to(out_ty), mask=rest_mask)


@triton.jit
def _rope_kernel(
    q_ptr, qo_ptr, q_sb, q_sh, q_ss, q_sd, qo_sb, qo_sh, qo_ss, qo_sd,
    k_ptr, ko_ptr, k_sb, k_sh, k_ss, k_sd, ko_sb, ko_sh, ko_ss, ko_sd,
    c_ptr, s_ptr, c_sb, cq_sh, ck_sh, c_ss, c_sd, s_sb, sq_sh, sk_sh, s_ss, s_sd,
    pos_ptr, p_sb, p_ss, freq_ptr, attention_factor,
    seq_len, n_q_heads, n_k_heads, n_q_blocks,
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, INTERLEAVED: tl.constexpr, FROM_FREQS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # 64-bit offsets: prompts can exceed 2**31 elements
    block = tl.program_id(1).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    if block < n_q_blocks:
        _rotate_heads(
            q_ptr, qo_ptr, q_sb, q_sh, q_ss, q_sd, qo_sb, qo_sh, qo_ss, qo_sd,
            c_ptr, s_ptr, c_sb, cq_sh, c_ss, c_sd, s_sb, sq_sh, s_ss, s_sd,
            pos_ptr, p_sb, p_ss, freq_ptr, attention_factor,
            b, s, block * BLOCK_H, n_q_heads,
            HALF, HEAD_DIM, BLOCK_H, BLOCK_HALF, BLOCK_PASS, INTERLEAVED, FROM_FREQS,
        )
    else:
        _rotate_heads(
            k_ptr, ko_ptr, k_sb, k_sh, k_ss, k_sd, ko_sb, ko_sh, ko_ss, ko_sd,
            c_ptr, s_ptr, c_sb, ck_sh, c_ss, c_sd, s_sb, sk_sh, s_ss, s_sd,
            pos_ptr, p_sb, p_ss, freq_ptr, attention_factor,
            b, s, (block - n_q_blocks) * BLOCK_H, n_k_heads,
            HALF, HEAD_DIM, BLOCK_H, BLOCK_HALF, BLOCK_PASS, INTERLEAVED, FROM_FREQS,
        )


def _logical(t: torch.Tensor, seq_axis: int) -> torch.Tensor:
    """View as [batch, heads, seq, ...]."""
    return t if seq_axis == 2 else t.transpose(1, 2)


def _table_view(table: torch.Tensor, shape: tuple[int, int, int, int], seq_axis: int) -> torch.Tensor:
    """Broadcast a half-form cos/sin table to logical [batch, heads, seq, half] (strides 0 where broadcast)."""
    while table.dim() < 4:
        table = table.unsqueeze(0)
    return _logical(table, seq_axis).expand(shape)


def launch(
    q: torch.Tensor,
    k: torch.Tensor | None,
    *,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    attention_factor: float = 1.0,
    interleaved: bool,
    rotary_dim: int,
    seq_axis: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q (and k) with one kernel launch; returns new tensors with the inputs' layouts.

    Give either ``cos``/``sin`` (half form) or ``positions``/``inv_freq``.
    """
    from_freqs = cos is None
    half = rotary_dim // 2
    qv = _logical(q, seq_axis)
    batch, n_q, seq, head_dim = qv.shape
    q_out = torch.empty_like(q, dtype=out_dtype)
    qov = _logical(q_out, seq_axis)
    if k is None:  # rotate q only: an empty k part of the grid
        kv, kov, n_k = qv, qov, 0
        k_out = None
    else:
        kv = _logical(k, seq_axis)
        k_out = torch.empty_like(k, dtype=out_dtype)
        kov = _logical(k_out, seq_axis)
        n_k = kv.shape[1]

    if from_freqs:
        pos = positions.expand(batch, seq)
        freq = inv_freq.to(torch.float32).contiguous()
        c_ptr, s_ptr = freq, freq  # unused
        c_strides = (0, 0, 0, 0, 0)
        s_strides = (0, 0, 0, 0, 0)
        p_strides = pos.stride()
    else:
        cq = _table_view(cos, (batch, n_q, seq, half), seq_axis)
        sq = _table_view(sin, (batch, n_q, seq, half), seq_axis)
        ck = _table_view(cos, (batch, max(n_k, 1), seq, half), seq_axis)
        sk = _table_view(sin, (batch, max(n_k, 1), seq, half), seq_axis)
        c_ptr, s_ptr = cq, sq
        c_strides = (cq.stride(0), cq.stride(1), ck.stride(1), cq.stride(2), cq.stride(3))
        s_strides = (sq.stride(0), sq.stride(1), sk.stride(1), sq.stride(2), sq.stride(3))
        pos, freq = cq, cq  # unused
        p_strides = (0, 0)

    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(max(n_q, n_k, 1)), max(1, 2048 // block_half)))
    n_pass = head_dim - rotary_dim
    block_pass = triton.next_power_of_2(n_pass) if n_pass > 0 else 0
    n_q_blocks = triton.cdiv(n_q, block_h)
    n_k_blocks = triton.cdiv(n_k, block_h)
    grid = (batch * seq, n_q_blocks + n_k_blocks)
    if batch * seq == 0:
        return q_out, k_out
    _rope_kernel[grid](
        qv, qov, *qv.stride(), *qov.stride(),
        kv, kov, *kv.stride(), *kov.stride(),
        c_ptr, s_ptr, *c_strides, *s_strides,
        pos, *p_strides, freq, float(attention_factor),
        seq, n_q, n_k, n_q_blocks,
        HALF=half, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
        INTERLEAVED=bool(interleaved), FROM_FREQS=from_freqs,
    )
    return q_out, k_out
