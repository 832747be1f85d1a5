"""T5's relative attention bias: bucketed distances looked up in a learned [num_buckets, num_heads] table.

Like `RopeSite`, the description keeps references to the `onnx_ir` values and nodes it was found on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx_ir as ir

from posrewrite.sites.base import EncodingSite

__all__ = ["T5BiasSite"]


@dataclasses.dataclass(frozen=True)
class T5BiasSite(EncodingSite):
    """T5 relative attention bias: distances j - i bucketed (exact below num_buckets/2 per direction, then
    log-spaced up to max_distance) and looked up in a learned [num_buckets, num_heads] table."""

    kind: ClassVar[str] = "t5_relative_bias"

    num_buckets: int
    max_distance: int
    bidirectional: bool
    num_heads: int
    dtype: str
    table: ir.Value
    gather: ir.Node
    buckets: ir.Value
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_buckets": self.num_buckets,
            "max_distance": self.max_distance,
            "bidirectional": self.bidirectional,
            "num_heads": self.num_heads,
            "dtype": self.dtype,
            "table": self.table.name,
            "notes": list(self.notes),
        }
