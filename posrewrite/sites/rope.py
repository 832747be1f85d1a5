"""Description of a RoPE encoding: one cos/sin source and the q/k applications that use it."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from posrewrite.sites.base import EncodingSite


class Layout(str, enum.Enum):
    ROTATE_HALF = "rotate_half"  # Llama/NeoX: rotate_half([x1, x2]) = [-x2, x1]
    INTERLEAVED = "interleaved"  # GPT-J / Meta Llama: pairs (2i, 2i+1)


class AngleSource(str, enum.Enum):
    COMPUTED = "computed"  # cos/sin of positions x inv_freq computed in the graph
    CACHED = "cached"  # precomputed cos/sin tables gathered or sliced by positions
    FUSED_OP = "fused_op"  # a RotaryEmbedding node (or an attention op with rotary inside) holding its caches


@dataclasses.dataclass(frozen=True)
class RopeApplication:
    """One rotation of q or k: output = x*cos + rotate(x)*sin on the first `rotary_dim` channels."""

    input: ir.Value  # x before rotation (the full head_dim tensor)
    output: ir.Value  # the rotated tensor (after concatenating any pass-through part)
    layout: Layout
    rotary_dim: int
    head_dim: int | None
    num_heads: int | None
    nodes: tuple[ir.Node, ...]  # nodes that only serve this application
    cos: ir.Value | None = None  # the values multiplied with x (after broadcasting ops)
    sin: ir.Value | None = None


@dataclasses.dataclass(frozen=True)
class RopeSite(EncodingSite):
    """One RoPE configuration: a cos/sin source and every q/k application sharing it."""

    kind: ClassVar[str] = "rope"

    layout: Layout
    head_dim: int | None
    rotary_dim: int
    angles: AngleSource
    base: float | None  # recovered from inv_freq (None when not geometric)
    inv_freq: np.ndarray | None  # float32 [rotary_dim/2], as found (computed) or fitted (cached)
    inv_freq_value: ir.Value | None  # the initializer/constant holding inv_freq, when there is one
    max_positions: int | None  # rows of a cos/sin cache, None when computed on the fly
    position_dtype: str  # dtype the positions are in when multiplied with inv_freq ("float32", ...)
    angle_dtype: str  # dtype of the position x frequency product and of cos/sin
    attention_factor: float  # factor already multiplying cos and sin (1.0 when none)
    positions: ir.Value | None  # integer (or float) positions feeding the angle computation
    cos: ir.Value  # the cos tensor as produced by the source (before per-layer broadcasting)
    sin: ir.Value
    cos_cache: ir.Value | None = None  # cached/fused_op: the tables
    sin_cache: ir.Value | None = None
    applications: tuple[RopeApplication, ...] = ()
    source_nodes: tuple[ir.Node, ...] = ()  # nodes computing cos/sin from positions
    fused_nodes: tuple[ir.Node, ...] = ()  # fused_op: the RotaryEmbedding nodes
    notes: tuple[str, ...] = ()
    prior_scaling: Any = None  # posrewrite.math.rope.PriorScaling when inv_freq is already scaled
    extra: Any = dataclasses.field(default=None, repr=False, compare=False)  # detector details for rewrites
    op: str | None = None  # fused_op inside an attention op: "com.microsoft.GroupQueryAttention"

    @property
    def sites(self) -> int:
        return len(self.applications) if self.applications else len(self.fused_nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "layout": self.layout.value,
            "head_dim": self.head_dim,
            "rotary_dim": self.rotary_dim,
            "base": None if self.base is None else float(self.base),
            "angles": self.angles.value,
            "max_positions": self.max_positions,
            "position_dtype": self.position_dtype,
            "angle_dtype": self.angle_dtype,
            "attention_factor": float(self.attention_factor),
            "prior_scaling": None if self.prior_scaling is None else self.prior_scaling.to_dict(),
            "sites": self.sites,
            "cos": self.cos.name,
            "sin": self.sin.name,
            "inv_freq": None if self.inv_freq_value is None else self.inv_freq_value.name,
            "notes": list(self.notes),
            **({"op": self.op} if self.op else {}),
        }
