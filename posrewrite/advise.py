"""``posrewrite advise``: which RoPE base a context length needs (Men et al. 2024), and whether a model has it.

The criterion (arXiv 2405.14591, "Base of RoPE Bounds Context Length"): with inverse frequencies theta_i, a
model can keep attending more to a similar token than to random ones at distance m only while

    B(m) = sum_i cos(m * theta_i) >= 0,

so supporting context N needs B(m) >= 0 for every m <= N.  For plain RoPE (theta_i = b^(-2i/d)) this puts a
lower bound on the base b.  :func:`advise` computes that bound for N and the rotary dimension, and, given a
model's frequencies (or a planned rescaling of them), tests the criterion on those frequencies directly, so
non-geometric vectors (linear interpolation, YaRN, llama3) are judged too.

The criterion is necessary, not sufficient: a model also has to have been trained (or fine-tuned) at the
length for its attention to use it.  Rescaling without fine-tuning can satisfy the bound and still degrade.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from posrewrite.math import base_bound

__all__ = ["AdviseResult", "advise", "advise_model", "effective_base"]

DEFAULT_DIM = 128  # the paper's table is for head dim 128
_SEARCH_CAP = 1 << 24  # how far advise looks for the longest supported context


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e5:
        return f"{x:.3g}".replace("e+0", "e").replace("e+", "e")
    return f"{x:,.0f}" if x >= 100 else f"{x:.4g}"


def effective_base(inv_freq: np.ndarray, dim: int | None = None) -> tuple[float, bool]:
    """(base, geometric): the base of a geometric vector b^(-2i/d), or for any other vector the base whose
    geometric vector has the same lowest frequency (theta_last = b^(-(d-2)/d)); ``geometric`` tells which."""
    from posrewrite.math.rope_fit import fit_base

    f = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    d = 2 * f.size if dim is None else int(dim)
    b = fit_base(f.astype(np.float32), d)
    if b is not None:
        return float(b), True
    return float(f[-1] ** (-d / (d - 2))), False


def _longest(inv_freq: np.ndarray, cap: int) -> tuple[int, bool]:
    """(longest context with B(m) >= 0 for all m <= it, capped?)"""
    first = base_bound.first_negative(inv_freq, cap)
    return (cap, True) if first is None else (first - 1, False)


@dataclasses.dataclass
class ModelCheck:
    label: str  # "model" or "after <method> x<s>"
    base: float
    geometric: bool
    rotary_dim: int
    meets: bool  # B(m) >= 0 for all m <= context
    first_negative: int | None  # smallest m <= context with B(m) < 0
    longest: int  # longest context with B >= 0 throughout (capped)
    longest_capped: bool
    attention_factor: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class AdviseResult:
    context: int
    dim: int
    dim_source: str
    min_base: float
    paper_table: float | None
    paper_fit: float | None
    checks: list[ModelCheck]
    lines: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "context": self.context,
            "rotary_dim": self.dim,
            "rotary_dim_source": self.dim_source,
            "min_base": self.min_base,
            "paper_table": self.paper_table,
            "paper_fit": self.paper_fit,
            "checks": [c.to_dict() for c in self.checks],
            "lines": list(self.lines),
            "criterion": "B(m) = sum_i cos(m*theta_i) >= 0 for all m <= context (Men et al. 2024, arXiv 2405.14591)",
        }


def _check(label: str, inv_freq: np.ndarray, dim: int, context: int, attention_factor: float = 1.0) -> ModelCheck:
    base, geometric = effective_base(inv_freq, dim)
    first = base_bound.first_negative(inv_freq, context)
    if first is None:
        longest, capped = _longest(inv_freq, max(_SEARCH_CAP, context))
    else:
        longest, capped = first - 1, False
    return ModelCheck(label, base, geometric, dim, first is None, first, longest, capped, attention_factor)


def _check_lines(c: ModelCheck, context: int, min_base: float) -> list[str]:
    if c.geometric:
        what = f"base {_fmt(c.base)}"
        ratio = f", {c.base / min_base:.3g} x the minimum"
    else:
        what = f"not geometric, lowest frequency as at base {_fmt(c.base)}"
        ratio = ""
    if c.meets:
        why = (
            f"B(m) >= 0 for every m up to {_fmt(c.longest)}+"
            if c.longest_capped
            else f"B(m) >= 0 up to m = {c.longest:,}"
        )
        verdict = "MEETS the bound"
    else:
        why = f"B(m) < 0 at m = {c.first_negative:,}: supports at most {c.longest:,}"
        verdict = "does NOT meet the bound"
    factor = f"; attention factor {c.attention_factor:.4g}" if c.attention_factor != 1.0 else ""
    return [f"{c.label} ({what}, rotary dim {c.rotary_dim}{ratio}): {verdict}: {why}{factor}"]


def advise(
    context: int,
    head_dim: int | None = None,
    base: float | None = None,
    *,
    inv_freq: np.ndarray | None = None,
    rotary_dim: int | None = None,
    rope_params: dict | None = None,
    original_context: int | None = None,
) -> AdviseResult:
    """The smallest RoPE base supporting ``context`` and, for a model, whether it (and a planned rewrite) meets it.

    The rotary dimension is ``rotary_dim``, else ``head_dim``, else the model's ``len(inv_freq) * 2``, else 128.
    The model is given by ``inv_freq`` (its rotary frequencies) or ``base`` (plain RoPE).  ``rope_params`` (an HF
    ``rope_parameters`` dict such as ``{"rope_type": "yarn", "factor": 4}``) describes a planned rewrite of the
    model; ``original_context`` is its training length (for methods that need it).
    """
    context = int(context)
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if rotary_dim is not None:
        dim, dim_source = int(rotary_dim), "model's rotary dim"
    elif head_dim is not None:
        dim, dim_source = int(head_dim), "--head-dim"
    elif inv_freq is not None:
        dim, dim_source = 2 * int(np.asarray(inv_freq).size), "model's rotary dim"
    else:
        dim, dim_source = DEFAULT_DIM, "the default: the paper's table is for head dim 128"
    if dim < 4 or dim % 2:
        raise ValueError(f"rotary dim must be even and >= 4, got {dim}")

    b_min = base_bound.min_base(context, dim)
    table = base_bound.PAPER_TABLE.get(context) if dim == 128 else None
    fit = base_bound.paper_fit(context) if dim == 128 else None

    ref = []
    if table is not None:
        ref.append(f"paper's table {_fmt(table)}")
    if fit is not None:
        ref.append(f"paper's fit 0.0424*L^1.628 = {_fmt(fit)}")
    lines = [
        f"context {context:,}, rotary dim {dim} ({dim_source})",
        f"smallest RoPE base: {_fmt(b_min)}  (the smallest b with B(m) = sum_i cos(m * b^(-2i/{dim})) >= 0 "
        f"for every m <= {context:,};",
        "  Men et al. 2024, 'Base of RoPE Bounds Context Length', arXiv 2405.14591"
        + (f"; {', '.join(ref)})" if ref else ")"),
        "why: B(m) measures how much more attention a token similar to the query gets than a random one at",
        "  distance m; where it is negative the model cannot tell them apart. Necessary, not sufficient: the",
        "  model must also be trained (or fine-tuned) at that length. Near the bound valid and invalid bases",
        "  alternate, so a model is judged on its own frequencies (below), not by comparing bases.",
    ]
    checks: list[ModelCheck] = []
    if inv_freq is None and base is not None:
        from posrewrite.math.rope import default_inv_freq

        inv_freq = default_inv_freq(float(base), dim)
    if inv_freq is not None:
        inv = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
        if 2 * inv.size != dim:
            raise ValueError(f"inv_freq has {inv.size} entries but the rotary dim is {dim}")
        checks.append(_check("model", inv, dim, context))
        if rope_params:
            from posrewrite.math import rope as rope_math

            rp = dict(rope_params)
            if original_context is not None:
                rp.setdefault("original_max_position_embeddings", int(original_context))
            try:
                params = rope_math.RopeParameters.from_hf(rp)
                new, att = rope_math.scaled_inv_freq(
                    params, inv_freq=inv.astype(np.float32), base=base, dim=dim, seq_len=context
                )
            except ValueError as exc:
                from posrewrite import errors

                hint = "; pass --original-max-positions" if "original_max_position_embeddings" in str(exc) else ""
                raise errors.UsageError(f"{exc}{hint}") from None
            from posrewrite.plot import rewrite_label

            label = rewrite_label(params, context)
            checks.append(_check(label, np.asarray(new, dtype=np.float64), dim, context, att))
        for c in checks:
            lines.extend(_check_lines(c, context, b_min))
    return AdviseResult(context, dim, dim_source, b_min, table, fit, checks, lines)


def _rope_site(path: str | os.PathLike):
    from posrewrite import api

    found = api.inspect(path)
    sites = [s for s in found.sites if getattr(s, "kind", None) == "rope" and getattr(s, "inv_freq", None) is not None]
    if not sites:
        from posrewrite import errors

        raise errors.NoEncodingError(f"{path}: no RoPE with readable frequencies found")
    return sites[0], len(sites)


def advise_model(
    context: int,
    head_dim: int | None = None,
    path: str | os.PathLike | None = None,
    rope_params: dict | None = None,
) -> AdviseResult:
    """:func:`advise` for the (first) RoPE of the ONNX model at ``path`` (when given)."""
    if path is None:
        if rope_params:
            raise ValueError("a planned rewrite (--rope-scale/--rope-method) needs a MODEL.onnx")
        return advise(context, head_dim)
    site, n = _rope_site(path)
    inv = np.asarray(site.inv_freq, dtype=np.float64)
    rp = dict(rope_params) if rope_params else None
    original = None
    if rp is not None:
        original = rp.get("original_max_position_embeddings") or site.max_positions
    res = advise(
        context,
        None,
        site.base,
        inv_freq=inv,
        rotary_dim=int(site.rotary_dim),
        rope_params=rp,
        original_context=original,
    )
    head = (
        f"model {os.fspath(path)}: RoPE base {_fmt(site.base)}, head dim {site.head_dim}, rotary dim {site.rotary_dim}"
    )
    if n > 1:
        head += f" ({n} RoPE configurations; the first is shown)"
    if head_dim is not None and head_dim != site.rotary_dim:
        head += f" (--head-dim {head_dim} ignored: the model's rotary dim is used)"
    res.lines.insert(0, head)
    return res
