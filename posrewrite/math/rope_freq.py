"""The plain RoPE inverse frequencies ``b^(-2i/d)`` in float32, in the order of operations Hugging Face
transformers uses (the vector every scaling method in `posrewrite.math.rope` starts from and every fit in
`posrewrite.math.rope_fit` compares with), and `PriorScaling`, the scaling a vector found in a model already
carries. Both modules build on this one; it imports neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["PriorScaling", "default_inv_freq"]

_F32 = np.float32


def _f32(x: float) -> np.float32:
    """A Python scalar as torch sees it next to a float32 tensor (cast to float32)."""
    return np.float32(x)


def _exponents(dim: int) -> np.ndarray:
    """float32 2i/d for i = 0..dim/2-1, as ``arange(0, dim, 2).float() / dim``."""
    return np.arange(0, dim, 2, dtype=np.int64).astype(_F32) / _f32(dim)


def _check_dim(dim: int) -> int:
    dim = int(dim)
    if dim < 2:
        raise ValueError(f"rotary dim must be >= 2, got {dim}")
    return dim


def _pos_freqs(base: float, dim: int) -> np.ndarray:
    """float32 b^(2i/d) (the denominators of the default inverse frequencies)."""
    return _f32(base) ** _exponents(dim)


def default_inv_freq(base: float, dim: int) -> np.ndarray:
    """float32 b^(-2i/d), i = 0..dim/2-1, in HF's order: ``1 / (b ** (arange(0, d, 2) / d))``."""
    dim = _check_dim(dim)
    if not base > 0:
        raise ValueError(f"base must be > 0, got {base}")
    return _F32(1.0) / _pos_freqs(base, dim)


@dataclasses.dataclass(frozen=True)
class PriorScaling:
    """Scaling an inverse-frequency vector found in a model already carries (an export of a scaled model,
    such as Llama 3.1's llama3 rope or a YaRN config).

    ``kind`` is ``"linear"`` (every frequency divided by ``factor``), ``"by_frequency"`` (llama3 / YaRN /
    NTK-by-parts: the highest frequencies unchanged, the lowest divided by ``factor``, a ramp between) or
    ``"by_length"`` (LongRoPE: one of two vectors chosen by the sequence length at run time) or
    ``"rewritten"`` (a posrewrite rescale, base read from the mark it leaves in the graph);
    ``unscaled`` counts the leading frequencies left as they were.
    """

    kind: str
    factor: float
    unscaled: int

    def describe(self) -> str:
        if self.kind == "rewritten":
            return f"rescaled by posrewrite (x{self.factor:g})"
        if self.kind == "by_length":
            return f"LongRoPE (frequencies switched by sequence length, up to / {self.factor:.4g})"
        if self.kind == "linear":
            return f"every frequency / {self.factor:.6g} (linear)"
        return (f"highest {self.unscaled} frequencies unchanged, lowest / {self.factor:.6g} "
                "(llama3 / YaRN style)")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "factor": float(self.factor)}
        if self.kind in ("linear", "by_frequency"):  # a count of frequencies means something only there
            out["unscaled_frequencies"] = int(self.unscaled)
        return out | {"description": self.describe()}
