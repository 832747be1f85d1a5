"""Typed descriptions of the positional encodings found in a graph."""

from posrewrite.sites.base import EncodingSite, Refusal
from posrewrite.sites.rope import AngleSource, Layout, RopeApplication, RopeSite

__all__ = ["EncodingSite", "Refusal", "AngleSource", "Layout", "RopeApplication", "RopeSite"]
