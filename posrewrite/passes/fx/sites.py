"""What fx detection finds: RoPE sites described by the fx nodes of a `torch.export` graph.

The same vocabulary as `posrewrite.sites.rope` (``Layout``, ``AngleSource``, the JSON keys of
``to_dict()``), holding ``torch.fx.Node`` references instead of ``onnx_ir`` values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
from torch.fx import Node

from posrewrite.sites.base import EncodingSite
from posrewrite.sites.rope import AngleSource, Layout

__all__ = ["FxRopeApplication", "FxAngleSource", "FxRopeSite", "FxAlibiSite", "AngleSource", "Layout"]


@dataclasses.dataclass(frozen=True)
class FxRopeApplication:
    """One rotation ``output = x*cos + rotate(x)*sin`` of the first ``rotary_dim`` channels of ``x``."""

    x: Node  # the tensor before rotation (full head_dim when the rotation is partial)
    output: Node  # the rotated tensor (the concat with the pass-through part when partial)
    rotated: Node  # x[..., :rotary_dim] (== x when not partial)
    layout: Layout
    rotary_dim: int
    head_dim: int
    cos: Node  # the tensors multiplied with x (broadcast to it), full rotary width
    sin: Node
    nodes: tuple[Node, ...] = ()  # the matched rotation nodes (for reports)

    def describe(self) -> str:
        part = f", rotary_dim {self.rotary_dim} of {self.head_dim}" if self.rotary_dim != self.head_dim else ""
        return f"{self.layout.value} rotation of {self.x.name} -> {self.output.name}{part}"


@dataclasses.dataclass(frozen=True)
class FxAngleSource:
    """Where cos/sin come from.

    ``computed``: ``positions x inv_freq`` in the graph; ``inv_freq`` is a placeholder backed by a buffer
    or constant (``inv_freq_node``), ``angles`` the product node, ``cos_node``/``sin_node`` the
    ``aten.cos``/``aten.sin`` calls and ``cos_scale``/``sin_scale`` the ``mul`` by the attention factor
    when there is one. ``cached``: a precomputed table placeholder (``table_node``) gathered by positions.
    """

    kind: AngleSource
    positions: Node | None = None  # integer (or float) positions before the float cast
    position_cast: Node | None = None  # the cast of positions to the angle dtype, when present
    inv_freq_node: Node | None = None
    inv_freq_operand: Node | None = None  # the operand of the angle product that carries inv_freq
    inv_freq: np.ndarray | None = None  # float32 [rotary_dim / 2]
    inv_freq_dtype: str = "float32"  # the dtype inv_freq is stored in (its round-off bounds the base fit)
    angles: Node | None = None  # positions x inv_freq
    cos_node: Node | None = None
    sin_node: Node | None = None
    cos_scale: Node | None = None
    sin_scale: Node | None = None
    attention_factor: float = 1.0
    position_dtype: str = "unknown"
    angle_dtype: str = "unknown"
    table_node: Node | None = None
    max_positions: int | None = None
    reason: str = ""  # why the source is not understood (kind stays CACHED/None)


@dataclasses.dataclass(frozen=True)
class FxRopeSite(EncodingSite):
    """One RoPE configuration of a graph: its angle source and every q/k application using it."""

    kind: ClassVar[str] = "rope"

    layout: Layout
    head_dim: int
    rotary_dim: int
    source: FxAngleSource
    base: float | None
    applications: tuple[FxRopeApplication, ...]
    notes: tuple[str, ...] = ()
    prior_scaling: Any = None  # posrewrite.math.rope.PriorScaling when inv_freq is already scaled

    @property
    def angles(self) -> AngleSource:
        return self.source.kind

    @property
    def inv_freq(self) -> np.ndarray | None:
        return self.source.inv_freq

    @property
    def sites(self) -> int:
        return len(self.applications)

    def to_dict(self) -> dict[str, Any]:
        s = self.source
        return {
            "kind": self.kind,
            "layout": self.layout.value,
            "head_dim": self.head_dim,
            "rotary_dim": self.rotary_dim,
            "base": None if self.base is None else float(self.base),
            "angles": s.kind.value,
            "max_positions": s.max_positions,
            "position_dtype": s.position_dtype,
            "angle_dtype": s.angle_dtype,
            "attention_factor": float(s.attention_factor),
            "prior_scaling": None if self.prior_scaling is None else self.prior_scaling.to_dict(),
            "sites": self.sites,
            "cos": self.applications[0].cos.name if self.applications else None,
            "sin": self.applications[0].sin.name if self.applications else None,
            "inv_freq": None if s.inv_freq_node is None else s.inv_freq_node.name,
            "notes": list(self.notes),
        }


@dataclasses.dataclass(frozen=True)
class FxAlibiSite(EncodingSite):
    """An ALiBi bias: per-head slopes times (relative or absolute) key positions, added to the scores."""

    kind: ClassVar[str] = "alibi"

    slopes: np.ndarray | None  # float32 [heads] when constant
    slopes_node: Node
    bias: Node  # slopes x distances
    distances: Node
    distance_dtype: str
    num_heads: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_heads": self.num_heads,
            "slopes": None if self.slopes is None else [float(v) for v in self.slopes],
            "distance_dtype": self.distance_dtype,
            "bias": self.bias.name,
        }
