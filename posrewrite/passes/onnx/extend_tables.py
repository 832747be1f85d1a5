"""Lets models with length-limited position encodings run past their training length.

Per kind (sites from `detect_other.py`), the rewrite lives with the encoding:
- learned absolute and sinusoidal tables, computed sinusoids: `absolute/extend.py`
- ALiBi (computed, or a baked table and the Slice bounds computed from its length): `alibi/extend.py`
- T5 relative bias: runs at any length (distances past max_distance share the last bucket).
- score biases read by value (KERPLE, Sandwich, ALiBi as other libraries write it, baked tables):
  `bias/rewrite.py` (the fitted formula; --bias-scale, or --alibi-scale, divides the distances).
Baked causal masks are extended by `masks.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass
from posrewrite.passes.onnx.absolute.extend import extend_learned, extend_sinusoidal
from posrewrite.passes.onnx.alibi.extend import extend_alibi
from posrewrite.passes.onnx.bias.rewrite import rewrite_score_bias
from posrewrite.sites.absolute import LearnedAbsoluteSite, SinusoidalSite
from posrewrite.sites.alibi import AlibiSite
from posrewrite.sites.base import EncodingSite
from posrewrite.sites.bias import ScoreBiasSite
from posrewrite.sites.rope import RopeSite
from posrewrite.sites.t5 import T5BiasSite

__all__ = ["ExtendTablesPass"]


class ExtendTablesPass(ReportingPass):
    """Extends the ALiBi / learned / sinusoidal / T5 sites to `max_positions` (see module doc).

    ``sites``: the sites to extend; None: the non-RoPE sites of the model as the pass finds it (the pipeline's
    cached detection). After `call`, `changes` lists what was rewritten and `notes` what was left as is and
    why (also appended to the context's report, the changes as other-encoding claims).
    """

    def __init__(
        self,
        *,
        sites: Sequence[EncodingSite] | None = None,
        max_positions: int | None = None,
        pos_scale: float | None = None,
        alibi_scale: float | None = None,
        bias_scale: float | None = None,
        context: PipelineContext | None = None,
        preface: Sequence[str] = (),
    ) -> None:
        super().__init__(context=context, preface=preface)
        if max_positions is not None and max_positions < 1:
            raise ValueError("max_positions must be positive")
        for name, v in (("pos_scale", pos_scale), ("alibi_scale", alibi_scale), ("bias_scale", bias_scale)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive")
        self.sites = None if sites is None else list(sites)
        self.max_positions = max_positions
        self.pos_scale = pos_scale
        self.alibi_scale = alibi_scale if alibi_scale is not None else bias_scale
        self.bias_scale = bias_scale if bias_scale is not None else alibi_scale

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        sites = self.sites
        if sites is None:
            sites = [s for s in self.context.detection(model).sites if not isinstance(s, RopeSite)]
        for site in sites:
            if isinstance(site, LearnedAbsoluteSite):
                modified |= self._learned(model.graph, site)
            elif isinstance(site, SinusoidalSite):
                modified |= self._sinusoidal(model.graph, site)
            elif isinstance(site, AlibiSite):
                modified |= self._alibi(model.graph, site)
            elif isinstance(site, ScoreBiasSite):
                modified |= self._record(rewrite_score_bias(model.graph, site, max_positions=self.max_positions,
                                                            scale=self.bias_scale))
            elif isinstance(site, T5BiasSite):
                self.notes.append(
                    f"T5 relative bias {site.table.name}: runs at any length as is (distances past "
                    f"max_distance={site.max_distance} share the last bucket)"
                )
        self.context.report.other_changes.extend(self.changes)
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
