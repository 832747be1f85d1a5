"""Typed descriptions of the positional encodings found in a graph."""

from posrewrite.sites.base import EncodingSite, Refusal
from posrewrite.sites.rope import (
    AngleSource,
    AttentionRotary,
    CachedTable,
    ComputedAngles,
    FusedCaches,
    GridAngles,
    InvFreqOrigin,
    Layout,
    LengthSelection,
    RescaleRecord,
    RopeApplication,
    RopeEncoding,
    RopeSite,
    RopeSource,
    RuntimeInvFreq,
)
from posrewrite.sites.rope_axes import GridAxes, PositionRows

__all__ = [
    "AngleSource",
    "AttentionRotary",
    "CachedTable",
    "ComputedAngles",
    "EncodingSite",
    "FusedCaches",
    "GridAngles",
    "GridAxes",
    "InvFreqOrigin",
    "Layout",
    "LengthSelection",
    "PositionRows",
    "Refusal",
    "RescaleRecord",
    "RopeApplication",
    "RopeEncoding",
    "RopeSite",
    "RopeSource",
    "RuntimeInvFreq",
]
