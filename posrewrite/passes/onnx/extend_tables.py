"""Lets models with length-limited position encodings run past their training length.

Per kind (sites from `detect_other.py`), the rewrite lives with the encoding:
- learned absolute and sinusoidal tables, computed sinusoids: `absolute/extend.py`
- ALiBi (computed, or a baked table and the Slice bounds computed from its length): `alibi/extend.py`
- T5 relative bias: runs at any length (distances past max_distance share the last bucket).
Baked causal masks are extended by `masks.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from posrewrite.passes.onnx.absolute.extend import extend_learned, extend_sinusoidal
from posrewrite.passes.onnx.alibi.extend import extend_alibi
from posrewrite.sites.absolute import LearnedAbsoluteSite, SinusoidalSite
from posrewrite.sites.alibi import AlibiSite
from posrewrite.sites.base import EncodingSite
from posrewrite.sites.t5 import T5BiasSite

__all__ = ["ExtendTablesPass"]


class ExtendTablesPass(ir.passes.InPlacePass):
    """Extends the ALiBi / learned / sinusoidal / T5 sites to `max_positions` (see module doc).

    After `call`, `changes` lists what was rewritten and `notes` what was left as is and why.
    """

    def __init__(
        self,
        sites: Sequence[EncodingSite],
        *,
        max_positions: int | None = None,
        pos_scale: float | None = None,
        alibi_scale: float | None = None,
    ) -> None:
        super().__init__()
        if max_positions is not None and max_positions < 1:
            raise ValueError("max_positions must be positive")
        for name, v in (("pos_scale", pos_scale), ("alibi_scale", alibi_scale)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive")
        self.sites = list(sites)
        self.max_positions = max_positions
        self.pos_scale = pos_scale
        self.alibi_scale = alibi_scale
        self.changes: list[str] = []
        self.notes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.changes, self.notes = [], []
        modified = False
        for site in self.sites:
            if isinstance(site, LearnedAbsoluteSite):
                modified |= self._learned(model.graph, site)
            elif isinstance(site, SinusoidalSite):
                modified |= self._sinusoidal(model.graph, site)
            elif isinstance(site, AlibiSite):
                modified |= self._alibi(model.graph, site)
            elif isinstance(site, T5BiasSite):
                self.notes.append(
                    f"T5 relative bias {site.table.name}: runs at any length as is (distances past "
                    f"max_distance={site.max_distance} share the last bucket)"
                )
        return ir.passes.PassResult(model, modified)

    # -- per kind: absolute/extend.py, alibi/extend.py -------------------------------------------------
    def _learned(self, graph: ir.Graph, site: LearnedAbsoluteSite) -> bool:
        return self._record(extend_learned(graph, site, max_positions=self.max_positions, pos_scale=self.pos_scale))

    def _sinusoidal(self, graph: ir.Graph, site: SinusoidalSite) -> bool:
        return self._record(
            extend_sinusoidal(graph, site, max_positions=self.max_positions, pos_scale=self.pos_scale)
        )

    def _alibi(self, graph: ir.Graph, site: AlibiSite) -> bool:
        return self._record(extend_alibi(graph, site, max_positions=self.max_positions, alibi_scale=self.alibi_scale))

    def _record(self, outcome: tuple[list[str], list[str]]) -> bool:
        """Keeps a kind's (changes, notes); the site was rewritten when it reports a change."""
        changes, notes = outcome
        self.changes.extend(changes)
        self.notes.extend(notes)
        return bool(changes)
