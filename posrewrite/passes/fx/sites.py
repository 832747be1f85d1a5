"""What fx detection finds: RoPE sites described by the fx nodes of a `torch.export` graph.

The description is the ONNX side's own: `posrewrite.sites.rope.RopeEncoding` (layout, dimensions, base,
typed prior scaling, the angle-source union); beside it the ``torch.fx.Node`` handles the rewrites act on
(`FxComputedHandles` for computed angles, `FxTableHandles` for a precomputed table).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
from torch.fx import Node

from posrewrite.sites.base import EncodingSite
from posrewrite.sites.rope import AngleSource, Layout, PositionDecay, RopeEncoding, RopeEncodingFields

__all__ = ["FxRopeApplication", "FxComputedHandles", "FxTrigHandles", "FxAngleHandles", "FxTableHandles",
           "FxRopeSite", "FxAlibiSite", "AngleSource", "Layout"]


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
    heads_in_last_axis: int = 1  # H when x is [.., H·head_dim] (every head rotated alike), else 1
    decay: PositionDecay | None = None  # xPos: this rotation's position-dependent magnitude (probed)

    def describe(self) -> str:
        part = f", rotary_dim {self.rotary_dim} of {self.head_dim}" if self.rotary_dim != self.head_dim else ""
        return f"{self.layout.value} rotation of {self.x.name} -> {self.output.name}{part}"


@dataclasses.dataclass(frozen=True)
class FxComputedHandles:
    """Where `ComputedAngles` live in an fx graph: ``positions x inv_freq`` (``angles``), ``inv_freq`` a
    placeholder backed by a buffer or constant (``inv_freq_node``), the ``aten.cos``/``aten.sin`` calls and the
    ``mul`` by the attention factor when there is one (``cos_scale``/``sin_scale``)."""

    positions: Node  # integer (or float) positions before the float cast
    inv_freq_node: Node
    inv_freq_operand: Node  # the operand of the angle product that carries inv_freq
    angles: Node  # positions x inv_freq
    cos_node: Node
    sin_node: Node
    position_cast: Node | None = None  # the cast of positions to the angle dtype, when present
    cos_scale: Node | None = None
    sin_scale: Node | None = None


@dataclasses.dataclass(frozen=True)
class FxTrigHandles:
    """Computed angles whose product could not be split into positions x a constant inv_freq (inv_freq made at
    run time, e.g. by a dynamic rescale): only the ``aten.cos``/``aten.sin`` calls are known."""

    cos_node: Node
    sin_node: Node


@dataclasses.dataclass(frozen=True)
class FxAngleHandles:
    """Angles identified by probing (`GridAngles`, `ProbedAngles`): the angle tensor the ``aten.cos``/``aten.sin``
    calls read. A rescale multiplies it by a per-element ratio of shape ``channel_shape`` (1 on its position
    axes); ``channel_freq`` holds each element's frequency for 1-D probed angles."""

    angles: Node
    cos_node: Node
    sin_node: Node
    channel_shape: tuple[int, ...]
    channel_freq: np.ndarray | None = None
    cos_scale: Node | None = None  # a scalar mul after cos / sin (an attention factor), when there is one
    sin_scale: Node | None = None


@dataclasses.dataclass(frozen=True)
class FxTableHandles:
    """Where a `CachedTable` lives in an fx graph: the table placeholder the rows are read from."""

    table_node: Node


FxHandles = FxComputedHandles | FxTrigHandles | FxAngleHandles | FxTableHandles


@dataclasses.dataclass(frozen=True)
class FxRopeSite(RopeEncodingFields, EncodingSite):
    """One RoPE configuration of a graph: its `RopeEncoding` and every q/k application using it."""

    kind: ClassVar[str] = "rope"

    encoding: RopeEncoding
    applications: tuple[FxRopeApplication, ...]
    handles: FxHandles = dataclasses.field(repr=False, compare=False)

    @property
    def rotations(self) -> int:
        """How many q/k rotations use this encoding."""
        return len(self.applications)

    def computed_handles(self) -> FxComputedHandles:
        """The fx handles of computed angles; ValueError for a table site."""
        if not isinstance(self.handles, FxComputedHandles):
            raise ValueError(f"a {self.angles.value} RoPE site has no angle computation")
        return self.handles

    def to_dict(self) -> dict[str, Any]:
        first = self.applications[0] if self.applications else None
        inv = self.handles.inv_freq_node if isinstance(self.handles, FxComputedHandles) else None
        return self.encoding.to_dict(
            rotations=self.rotations,
            cos=None if first is None else first.cos.name,
            sin=None if first is None else first.sin.name,
            inv_freq=None if inv is None else inv.name,
        )


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
