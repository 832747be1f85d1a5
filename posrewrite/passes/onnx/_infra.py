"""The pass infrastructure every posrewrite pass stands on: `ReportingPass` (an onnx_ir in-place pass that
writes its own change / note lines), the `PipelineContext` the passes of one pipeline share (the report, the
cached detection), the `RewriteReport` (every pass's lines and what the rewrite claims), `site_key`, and the
cleanup passes.

The cached detection is dropped by any modification of the model, whoever made it (`model_fingerprint`). This
module sits below the rewriting passes and above the detectors: passes import it, it imports only detection,
sites, errors and onnx_ir."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from posrewrite.graph_check import check_graph
from posrewrite.passes.onnx.detect import Detection, detect
from posrewrite.progress import NullReporter
from posrewrite.sites.rope import RopeSite, site_key

if TYPE_CHECKING:
    from posrewrite.passes.onnx.rope.rescale import SitePlan

__all__ = [
    "DropUntypedValueInfoPass",
    "PassRecord",
    "PipelineContext",
    "ReportingPass",
    "RewriteReport",
    "cleanup_passes",
    "model_fingerprint",
]


def _still_in(graph: ir.Graph, site: RopeSite) -> bool:
    """Whether every rotation node (or fused node) of ``site`` is still a node of ``graph``."""
    nodes = [n for a in site.applications for n in a.nodes] or list(site.fused_nodes)
    return bool(nodes) and all(n.graph is graph for n in nodes)


#: in-memory constants up to this many bytes are fingerprinted by content (inv_freq, slopes, small tables): a
#: pass may change such a tensor's bytes in place; larger ones (weights) by identity only, never read
FINGERPRINT_CONTENT_BYTES = 1 << 16


def _tensor_token(tensor: object) -> tuple:
    if tensor is None:
        return (None,)
    if isinstance(tensor, (ir.ExternalTensor, ir.LazyTensor)):  # reading them would load weights
        return (id(tensor),)
    try:
        if tensor.nbytes <= FINGERPRINT_CONTENT_BYTES:
            return (id(tensor), hash(tensor.tobytes()))
    except (AttributeError, TypeError, ValueError):  # a tensor type without bytes (strings): identity
        pass
    return (id(tensor),)


def model_fingerprint(model: ir.Model) -> int:
    """A hash of what detection reads: every graph's nodes (identity, op, domain, the identity of their input
    and output values, their attributes), inputs, outputs and initializers, and the bytes of in-memory
    constants up to `FINGERPRINT_CONTENT_BYTES`. Weights in external data are never read (identity only).
    Two calls give the same number exactly when nothing detection could see has changed in between."""
    parts: list[tuple] = []
    for graph in model.graphs():
        parts.append(("graph", id(graph), tuple(id(v) for v in graph.inputs), tuple(id(v) for v in graph.outputs)))
        for name, value in graph.initializers.items():
            parts.append(("init", name, id(value), _tensor_token(value.const_value)))
        for node in graph:
            attrs = []
            for key, attr in node.attributes.items():
                value = attr.value
                if isinstance(value, ir.TensorProtocol):
                    token = _tensor_token(value)
                elif isinstance(value, ir.Graph):
                    token = (id(value),)
                else:
                    try:
                        token = (hash(value if not isinstance(value, list) else tuple(value)),)
                    except TypeError:
                        token = (id(attr), id(value))
                attrs.append((key, token))
            parts.append((id(node), node.op_type, node.domain, tuple(id(v) for v in node.inputs),
                          tuple(id(v) for v in node.outputs), tuple(attrs)))
    return hash(tuple(parts))


# ---------------------------------------------------------------------------------------------------------------
# the shared report
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one pass did: its name, whether it modified the model, and its own lines."""

    name: str
    modified: bool
    changes: tuple[str, ...]
    notes: tuple[str, ...]


@dataclasses.dataclass
class RewriteReport:
    """Every pass's changes and notes, in the order the passes ran, and what the rewrite claims (checked by
    the validation step)."""

    changes: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    #: claim: the RoPE sites rescaled or extended, with their plans (a fused site: the plan of its fused form)
    rope_plans: list[SitePlan] = dataclasses.field(default_factory=list)
    #: claim: ALiBi / learned / sinusoidal / T5 tables and baked masks rewritten
    other_changes: list[str] = dataclasses.field(default_factory=list)
    #: claim: rows of the shortest static fused RoPE cache (positions from here on are outside it)
    fused_cache_rows: int | None = None
    #: the RotaryEmbedding nodes the fusion wrote
    fused_rotary_nodes: list[ir.Node] = dataclasses.field(default_factory=list)
    #: claim: attention-level extension (SelfExtend / ReRoPE / log-n) written
    attention_changes: list[str] = dataclasses.field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(p.modified for p in self.passes) or bool(self.changes)

    def claim_plan(self, plan: SitePlan) -> None:
        """Claims that ``plan`` was applied to its site."""
        self.rope_plans.append(plan)

    def replace_plan(self, old: SitePlan, new: SitePlan) -> None:
        """A later pass rewrote ``old``'s site into another form: ``new`` (derived from ``old``) is what the
        rewrite now claims for it."""
        for k, p in enumerate(self.rope_plans):
            if p is old:
                self.rope_plans[k] = new
                return
        self.rope_plans.append(new)


@dataclasses.dataclass
class PipelineContext:
    """What the passes of one pipeline share: the report, the cached detection, where the model came from."""

    report: RewriteReport = dataclasses.field(default_factory=RewriteReport)
    model_path: str | os.PathLike | None = None
    progress: Any = dataclasses.field(default_factory=NullReporter)
    _detection: Detection | None = dataclasses.field(default=None, repr=False)
    _detected_model: int | None = dataclasses.field(default=None, repr=False)
    _fingerprint: int | None = dataclasses.field(default=None, repr=False)
    #: counts the rewrites (passes that reported modified=True) since the context was made
    generation: int = 0

    def detection(self, model: ir.Model) -> Detection:
        """The detection of ``model`` as it is now: cached while the model is unchanged. Any modification drops
        it, whoever made it: a posrewrite pass reporting ``modified=True``, or any other pass (an onnx_ir pass
        of the user's between two of ours) that changed a node, an edge, an attribute, an initializer or the
        bytes of a small in-memory constant (`model_fingerprint`)."""
        fingerprint = model_fingerprint(model)
        if self._detection is None or self._detected_model != id(model) or self._fingerprint != fingerprint:
            self._detection = detect(model)
            self._detected_model = id(model)
            self._fingerprint = fingerprint
        return self._detection

    def rope_sites(self, model: ir.Model) -> list[RopeSite]:
        """The RoPE sites of ``model`` as it is now: those of `detection`, and, in the order of the report's
        claims, the site of a claimed plan that the detector cannot read back. A runtime rescale (dynamic,
        longrope) of a cached table or of fused caches computes them in the graph in a form the detector does not
        match; the rescale left that site's rotations (or fused nodes) as they were (checked here: each is still
        in the graph) and the plan describes its new angle source."""
        detected = list(self.detection(model).rope_sites)
        by_key = {site_key(s): s for s in detected}
        out: list[RopeSite] = []
        for plan in self.report.rope_plans:
            key = site_key(plan.site)
            if key in by_key:
                out.append(by_key.pop(key))
            elif _still_in(model.graph, plan.site):
                out.append(plan.site)
        kept = {id(s) for s in out}
        return out + [s for s in detected if id(s) not in kept]

    def seed(self, model: ir.Model, detection: Detection) -> None:
        """A detection the caller made on ``model`` before any pass ran (the one its plans come from)."""
        self._detection = detection
        self._detected_model = id(model)
        self._fingerprint = model_fingerprint(model)

    def record(self, pass_: ReportingPass, result: ir.passes.PassResult) -> None:
        report = self.report
        report.changes.extend(pass_.changes)
        report.notes.extend(pass_.notes)
        report.passes.append(PassRecord(type(pass_).__name__, bool(result.modified), tuple(pass_.changes),
                                        tuple(pass_.notes)))
        if result.modified:
            self._detection = None
            self.generation += 1


class ReportingPass(ir.passes.InPlacePass):
    """A posrewrite pass: implements `run(model) -> PassResult`, writes its own ``changes`` / ``notes`` lines;
    `call` hands them to the shared context (which appends them to its report and drops its cached detection
    when the model was modified). Without a context the pass has one of its own (standalone use): it detects
    what it needs on the model as it finds it.

    Every posrewrite pass takes keyword arguments only: its own configuration, then ``context`` (a
    `PipelineContext` shared by the passes of one pipeline, so that they write one report and the later ones
    see the earlier ones' claims) and ``preface`` (notes reported first: why the pass runs)."""

    def __init__(self, *, context: PipelineContext | None = None, preface: Sequence[str] = ()) -> None:
        super().__init__()
        self.context = context if context is not None else PipelineContext()
        #: notes the pipeline attaches to this step (why it runs, how it is configured), reported first
        self.preface = tuple(preface)
        self.changes: list[str] = []
        self.notes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.changes, self.notes = [], list(self.preface)
        result = self.run(model)
        if result.modified:  # a cycle or an undefined value is this pass's bug: said here, with its name
            check_graph(result.model, type(self).__name__)
        self.context.record(self, result)
        return result

    def run(self, model: ir.Model) -> ir.passes.PassResult:  # pragma: no cover - every pass implements it
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# cleanup
# ---------------------------------------------------------------------------------------------------------------


class DropUntypedValueInfoPass(ir.passes.InPlacePass):
    """A value whose type is a tensor of unknown element type (shape inference failed on a model whose declared
    shapes contradict its ops) cannot be written as value_info: forget its type and shape, as if never inferred.
    Graph inputs and outputs keep theirs (they are the model's interface). onnx_ir has no pass for this."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in model.graphs():
            interface = {id(v) for v in (*graph.inputs, *graph.outputs)}
            for node in graph:
                for value in node.outputs:
                    if id(value) in interface or value.type is None:
                        continue
                    if getattr(value.type, "dtype", True) is None:
                        value.type = None
                        value.shape = None
                        modified = True
        return ir.passes.PassResult(model, modified)


def cleanup_passes() -> list[ir.passes.PassBase]:
    """The cleanup after rewrites: nodes nothing reads (the replaced rotations, cos/sin computations, ALiBi
    products), a topological order for the nodes the passes inserted, and value types nobody can write.
    Opsets and initializers are left as they are: a rewrite never drops an opset import or an input."""
    return [RemoveUnusedNodesPass(), TopologicalSortPass(), DropUntypedValueInfoPass()]
