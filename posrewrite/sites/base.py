"""What detection finds: typed, read-only descriptions of positional-encoding sites.

Descriptions hold references to the `onnx_ir` objects of the model they were found in, so a rewrite
pass can act on exactly those values; `to_dict()` gives the JSON form `inspect` prints.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class EncodingSite:
    """Base of every description. `kind` is the JSON `kind` value ("rope", "alibi", ...)."""

    kind: ClassVar[str] = "unknown"

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A subgraph that looks like a positional encoding but was not understood, with the reason."""

    kind: str
    where: str  # node or value name
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "where": self.where, "reason": self.reason}
