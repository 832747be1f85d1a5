"""Typed descriptions of the positional encodings found in a graph."""

from posrewrite.sites.base import EncodingSite, Refusal
from posrewrite.sites.rope import (
    AngleSource,
    AttentionRotary,
    CachedTable,
    ComputedAngles,
    FusedCaches,
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

__all__ = [
    "AngleSource",
    "AttentionRotary",
    "CachedTable",
    "ComputedAngles",
    "EncodingSite",
    "FusedCaches",
    "InvFreqOrigin",
    "Layout",
    "LengthSelection",
    "Refusal",
    "RescaleRecord",
    "RopeApplication",
    "RopeEncoding",
    "RopeSite",
    "RopeSource",
    "RuntimeInvFreq",
]
