"""fx passes as small objects composed by one pass manager (the torch side of load -> detect -> rewrite).

Each pass has one job, runs detection on the program it is given (node references do not survive a
previous rewrite) and returns an `FxPassResult` whose ``modified`` flag says whether anything changed:

    RescaleRope(params)   new inv_freq / attention factor (static) or runtime inv_freq (dynamic, longrope);
                          probed angles times per-element ratios; xPos decay (xpos_decay="scaled")
    RescaleGrid(...)      2-D RoPE: angles times per-axis ratios for another patch grid
    Fp32Positions()       positions, angles and cos/sin in float32
    FuseRope()            applications -> torch.ops.posrewrite.rope_qk / rope

Like the ONNX pipeline (`posrewrite.pipeline`), the manager keeps one shared `FxReport`: each step's result
(name, modified, messages) is recorded in the order the steps ran.

`prepare` makes the working copy (a copy of the graph with the autocast/no-grad regions HF wraps its
rotary module in inlined); `finalize` rebuilds a verified ExportedProgram.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, TensorArgument

from posrewrite.errors import NoEncodingError, PartialMatchError, UsageError
from posrewrite.math import rope as rope_math
from posrewrite.passes.fx.detect_rope import detect_rope
from posrewrite.passes.fx.fp32_positions import make_fp32, needs_fp32
from posrewrite.passes.fx.fuse_rope import fuse_sites
from posrewrite.passes.fx.rescale import RescaleRefused, apply_rescale, plan_grid, plan_rescale
from posrewrite.sites.base import Refusal
from posrewrite.sites.rope import AngleSource

__all__ = ["FxPass", "FxPassResult", "FxPassRecord", "FxReport", "RescaleRope", "RescaleGrid", "Fp32Positions",
           "FuseRope", "not_found",
           "FxPassManager", "prepare", "finalize"]


@dataclasses.dataclass
class FxPassResult:
    program: ExportedProgram
    modified: bool
    messages: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class FxPassRecord:
    """What one step did: its name, whether it modified the program, its messages."""

    name: str
    modified: bool
    messages: tuple[str, ...]


@dataclasses.dataclass
class FxReport:
    """The steps of one `FxPassManager` run, in order."""

    records: list[FxPassRecord] = dataclasses.field(default_factory=list)

    @property
    def messages(self) -> list[str]:
        return [f"{r.name}: {m}" for r in self.records for m in r.messages]

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)


class FxPass:
    """Base: ``__call__(program) -> FxPassResult``; rewrites the (working-copy) program in place."""

    name = "pass"

    def __call__(self, ep: ExportedProgram) -> FxPassResult:
        result = self.call(ep)
        if result.modified:
            ep.graph_module.recompile()
        return result

    def call(self, ep: ExportedProgram) -> FxPassResult:  # pragma: no cover - abstract
        raise NotImplementedError


def not_found(refusals: list[Refusal], what: str = "RoPE site") -> Exception:
    """The error for a program with no site to rewrite: exit 5 with the first reason when a RoPE was identified
    but is not rewritable (as the ONNX side), exit 4 when nothing was found."""
    if refusals:
        first = refusals[0]
        more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
        return PartialMatchError(f"rope found but not rewritable: {first.where}: {first.reason}{more}",
                                 detail=[r.reason for r in refusals])
    return NoEncodingError(f"no {what} found in the exported program")


class RescaleRope(FxPass):
    """1-D rescale of every RoPE site (static and run-time methods; probed angles in angle space). With
    ``grid_requested`` (a `RescaleGrid` runs too) 2-D sites are left to it."""

    name = "rescale-rope"

    def __init__(self, params: rope_math.RopeParameters, *, allow_partial: bool = False, xpos_decay: str = "angles",
                 grid_requested: bool = False) -> None:
        params.validate()
        self.params = params
        self.allow_partial = allow_partial
        self.xpos_decay = xpos_decay
        self.grid_requested = grid_requested

    def call(self, ep: ExportedProgram) -> FxPassResult:
        sites, refusals = detect_rope(ep)
        if self.grid_requested:
            one_d = [s for s in sites if s.angles != AngleSource.GRID]
            if sites and not one_d:
                raise UsageError("rope_scale/rope_base rescale 1-D RoPE and this program has only 2-D RoPE: "
                                 "original_grid/target_grid (with rope_method) rescale it")
            sites = one_d
        if not sites:
            raise not_found(refusals)
        plans, refused = [], [r.reason for r in refusals]
        for site in sites:
            try:
                plans.append(plan_rescale(site, self.params, xpos_decay=self.xpos_decay))
            except RescaleRefused as e:
                refused.append(str(e))
        if refused and not self.allow_partial:
            raise PartialMatchError(f"{len(refused)} of {len(sites) + len(refusals)} RoPE sites cannot be rescaled: "
                                    f"{refused[0]}",
                                    detail=refused)
        messages = apply_rescale(ep, plans)
        return FxPassResult(ep, bool(plans), messages + [f"skipped: {r}" for r in refused])


class RescaleGrid(FxPass):
    """2-D RoPE run at another patch grid: per-axis interpolation / NTK / YaRN from ``original`` to ``target``
    (timm's ``ref_feat_shape``), in angle space."""

    name = "rescale-grid"

    def __init__(self, method: str, original: tuple[int, int], target: tuple[int, int], *,
                 allow_partial: bool = False) -> None:
        self.method, self.original, self.target = method, tuple(original), tuple(target)
        self.allow_partial = allow_partial

    def call(self, ep: ExportedProgram) -> FxPassResult:
        sites, refusals = detect_rope(ep)
        grid = [s for s in sites if s.angles == AngleSource.GRID]
        if not grid:
            if not sites:
                raise not_found(refusals)
            raise NoEncodingError("original_grid/target_grid given but no 2-D RoPE found in the exported program")
        plans, refused = [], []
        for site in grid:
            try:
                plans.append(plan_grid(site, self.method, self.original, self.target))
            except RescaleRefused as e:
                refused.append(str(e))
        if refused and not self.allow_partial:
            raise PartialMatchError(refused[0], detail=refused)
        messages = apply_rescale(ep, plans)
        return FxPassResult(ep, bool(plans), messages + [f"skipped: {r}" for r in refused])


class Fp32Positions(FxPass):
    name = "fp32-positions"

    def call(self, ep: ExportedProgram) -> FxPassResult:
        sites, _ = detect_rope(ep)
        todo = [s for s in sites if needs_fp32(s)]
        # what this pass does not rebuild (angles identified by probing, 2-D grids, tables) is said, not hidden
        left = [f"left in {s.angle_dtype}: {s.angles.value} angles ({s.rotations} rotation(s)) are not rebuilt in "
                "float32 on the torch side" for s in sites
                if all(s is not t for t in todo) and s.angle_dtype in ("float16", "bfloat16")]
        if not todo:
            return FxPassResult(ep, False, left or ["positions and angles are already float32"])
        return FxPassResult(ep, True, make_fp32(ep, todo) + left)


class FuseRope(FxPass):
    name = "fuse-rope"

    def __init__(self, *, allow_partial: bool = False, angles: str = "tables") -> None:
        self.allow_partial = allow_partial
        self.angles = angles

    def call(self, ep: ExportedProgram) -> FxPassResult:
        sites, refusals = detect_rope(ep)
        if not sites:
            raise not_found(refusals)
        # a 2-D RoPE is left as it is with a note, as on the ONNX side (the op reads one position per token)
        grid = [s for s in sites if s.angles == AngleSource.GRID]
        notes = [f"not fused: 2-D RoPE over a patch grid ({s.rotations} rotation(s)): the fused op reads one "
                 "position per token" for s in grid]
        done, refused = fuse_sites(ep, [s for s in sites if s.angles != AngleSource.GRID], angles=self.angles)
        refused = [r.reason for r in refusals] + refused
        if refused and not self.allow_partial:
            raise PartialMatchError(f"{len(refused)} RoPE applications cannot be fused: {refused[0]}", detail=refused)
        return FxPassResult(ep, bool(done),
                            [f"fused {d}" for d in done] + [f"not fused: {r}" for r in refused] + notes)


class FxPassManager:
    """Runs ``steps`` in order on a working copy (each re-detects on the program as the steps before left it);
    returns the final program, every message and whether anything changed. ``report`` gets one record per
    step (a new `FxReport` when not given)."""

    def __init__(self, steps: list[FxPass], report: FxReport | None = None) -> None:
        self.steps = list(steps)
        self.report = report if report is not None else FxReport()

    def __call__(self, ep: ExportedProgram) -> tuple[ExportedProgram, list[str], bool]:
        work = prepare(ep)
        start = len(self.report.records)
        for step in self.steps:
            result = step(work)
            self.report.records.append(FxPassRecord(step.name, bool(result.modified), tuple(result.messages)))
        run = FxReport(self.report.records[start:])
        return finalize(work), run.messages, run.modified


def prepare(ep: ExportedProgram) -> ExportedProgram:
    """A working copy: its own graph (higher-order regions inlined, metadata asserts dropped) and its own
    state/constant dicts. Much cheaper than ``run_decompositions({})``, which would also do it."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(ep.graph, {})
    graph.output(out)
    gm = torch.fx.GraphModule(ep.graph_module, graph)
    inline_regions(gm)
    sig = ExportGraphSignature(input_specs=_renamed_inputs(gm, ep.graph_signature.input_specs),
                               output_specs=_renamed_outputs(gm, ep.graph_signature.output_specs))
    return _rebuild(ep, gm, sig, dict(ep.state_dict), dict(ep.constants))


def _renamed_inputs(gm: torch.fx.GraphModule, specs: list) -> list:
    """The input specs with the names the copied graph gave its placeholders (a copy renames a placeholder whose
    name shadows a Python builtin, e.g. ``input`` -> ``input_1``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(specs):
        return list(specs)
    renamed = []
    for spec, node in zip(specs, placeholders, strict=True):
        if isinstance(spec.arg, TensorArgument) and spec.arg.name != node.name:
            spec = dataclasses.replace(spec, arg=TensorArgument(name=node.name))
        renamed.append(spec)
    return renamed


def _renamed_outputs(gm: torch.fx.GraphModule, specs: list) -> list:
    """The output specs with the names of the values the output node now returns: an output that was the
    ``getitem`` of an inlined region (rotary-embedding-torch runs under autocast) is now the region's own
    value."""
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = list(torch.utils._pytree.tree_leaves(out_node.args[0]))
    if len(values) != len(specs):
        return list(specs)
    renamed = []
    for spec, value in zip(specs, values, strict=True):
        if isinstance(value, torch.fx.Node) and isinstance(spec.arg, TensorArgument) and spec.arg.name != value.name:
            spec = dataclasses.replace(spec, arg=TensorArgument(name=value.name))
        renamed.append(spec)
    return renamed


def _rebuild(ep, gm, sig, state_dict, constants) -> ExportedProgram:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # pytree deprecation noise in deepcopy
        return ep._update(gm, sig, state_dict=state_dict, constants=constants)


def _identity_slice(n: torch.fx.Node) -> bool:
    if n.op != "call_function" or n.target is not torch.ops.aten.slice.Tensor:
        return False
    args = list(n.args) + [None] * (5 - len(n.args))
    _, _, start, end, step = args[:5]
    return (start in (None, 0)) and (step in (None, 1)) and isinstance(end, int) and end >= 2**63 - 1


_REGIONS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")


def inline_regions(gm: torch.fx.GraphModule) -> None:
    """Inline the no-grad/autocast regions (higher-order ops calling submodules) into ``gm``'s graph and
    drop ``aten._assert_tensor_metadata`` checks (dtype rewrites would trip them)."""
    graph = gm.graph
    for _ in range(16):  # nested regions: repeat until none is left
        hops = [n for n in graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") in _REGIONS]
        if not hops:
            break
        for node in hops:
            idx = next(i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node) and a.op == "get_attr")
            sub_node = node.args[idx]
            sub = getattr(gm, sub_node.target)
            operands = node.args[idx + 1:]
            env: dict = {}
            placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
            env.update(zip(placeholders, operands, strict=True))
            outs = None
            with graph.inserting_before(node):
                for sn in sub.graph.nodes:
                    if sn.op == "placeholder":
                        continue
                    if sn.op == "output":
                        outs = torch.fx.node.map_arg(sn.args[0], env.__getitem__)
                        continue
                    if sn.op == "get_attr":
                        name = f"{sub_node.target}_{sn.target}".replace(".", "_")
                        setattr(gm, name, getattr(sub, sn.target))
                        new = graph.get_attr(name)
                        new.meta = dict(sn.meta)
                        env[sn] = new
                        continue
                    env[sn] = graph.node_copy(sn, env.__getitem__)
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            for user in list(node.users):
                if user.target is operator.getitem:
                    user.replace_all_uses_with(outs[user.args[1]])
                    graph.erase_node(user)
            if not node.users:
                graph.erase_node(node)
            if not sub_node.users:
                graph.erase_node(sub_node)
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(n)
        elif _identity_slice(n):  # x[:, ...] left in by dynamic shapes
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)
    gm.delete_all_unused_submodules()
    gm.recompile()


def finalize(ep: ExportedProgram) -> ExportedProgram:
    gm = ep.graph_module
    gm.graph.lint()
    gm.recompile()
    return _rebuild(ep, gm, ep.graph_signature, ep.state_dict, ep.constants)
