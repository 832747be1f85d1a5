"""Validation in onnxruntime: an oracle of what a rewrite claims, never a re-reading of what it wrote.

This module turns a rewrite's claims into checks; the checks themselves are in `posrewrite.validation`:
- Rotations (every RoPE rewrite): each q/k rotation of the rewritten model, run on its own subgraph with
  random pre-rotation q/k (no weights read) or captured from the model's prefix, against `numpy_rotation`
  of the same q/k with the frequencies and attention factor `posrewrite.math.rope` gives for the request
  (`validation.rotations`).
- Output-preserving rewrites: the original and the rewritten model on the same inputs, one after the other,
  within `output_tolerance` (from the outputs' magnitude and dtype; see COMPARE_EPS_UNITS) (`validation.runs`),
  on a cut of both models unless asked for the whole ones (`validation.bounded`, `validation.scope`).
- Rescales: the whole rewritten model at the new length runs and gives finite outputs.
Entry points: `validate_rewrite` (called by `api.rewrite` and `api.validate`); the names in ``__all__`` are the
ones callers import from here.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from posrewrite.math import precision
from posrewrite.sites.rope import RopeSite, site_key
from posrewrite.validation.report import Check, GridCheck, RunCheck, ValidationReport, describe_failure
from posrewrite.validation.rotations import RopeReference, check_rotations
from posrewrite.validation.runs import MAX_VALIDATION_LENGTH, compare_models, release_graphs, token_id_limits
from posrewrite.validation.scope import model_runs

if TYPE_CHECKING:
    from posrewrite.plan import RewritePlan

__all__ = [
    "FUSE_COMPARE_LENGTH",
    "Check",
    "MAX_VALIDATION_LENGTH",
    "RunCheck",
    "ValidationReport",
    "check_grid_rescales",
    "compare_models",
    "describe_failure",
    "model_runs",
    "release_graphs",
    "rotation_lengths",
    "token_id_limits",
    "validate_rewrite",
]


FUSE_COMPARE_LENGTH = 48  # tokens at which an output-preserving rewrite is run beside the original


def _half(dtype_name: str | None) -> bool:
    return str(dtype_name) in ("float16", "bfloat16")


def _plan_for(site: RopeSite, plans: list) -> Any:
    """The plan made for `site` (a later pass may have replaced the plan's site object by an updated copy)."""
    for p in plans:
        if p.site is site:
            return p
    key = site_key(site)
    for p in plans:
        if site_key(p.site) == key:
            return p
    inputs = {a.input.name for a in site.applications}
    for p in plans:  # fused since: its nodes read the rotations' inputs (or a Reshape of them)
        read = set()
        for node in p.site.fused_nodes:
            x = node.inputs[0] if node.inputs else None
            if x is None:  # the node was folded into an attention op since
                continue
            read.add(x.name)
            if x.producer() is not None and x.producer().inputs:
                read.add(x.producer().inputs[0].name)
        if inputs and inputs <= read:
            return p
    return None


def rotation_lengths(references: list[RopeReference]) -> list[int]:
    """Lengths for the rotation oracle: below and just above each site's original length L and the new length,
    never past the rows a table holds (a table of L rows serves positions 0..L-1 only)."""
    lengths = {FUSE_COMPARE_LENGTH}
    limits = []
    for ref in references:
        plan, site = ref.plan, ref.site
        if plan is not None:
            L = plan.params.original_max_position_embeddings or site.max_positions
            target = plan.new_length or plan.params.target_length() or (L * 4 if L else 2048)
            lengths.add(int(target))
            if site.max_positions is not None:
                limits.append(int(plan.new_length or site.max_positions))
        else:
            L = site.max_positions
            if L:
                limits.append(int(L))
        if L:
            lengths.update({max(2, L // 2), L + 1})
    limit = min(limits) if limits else None
    if limit is not None:
        lengths = {min(n, limit) for n in lengths}
    return sorted(n for n in lengths if n <= 4 * MAX_VALIDATION_LENGTH)


def _switch_lengths(sites) -> set[int]:
    """One token past every length at which a site switches its frequencies at run time (LongRoPE exports,
    dynamic rewrites): a fused model must keep the switch."""
    lengths: set[int] = set()
    for site in sites:
        encoding = site.encoding
        switch = (encoding.selection.threshold if encoding.selection is not None
                  else encoding.runtime.original_max_position_embeddings if encoding.runtime is not None else None)
        if switch and switch + 1 <= MAX_VALIDATION_LENGTH:
            lengths.add(int(switch) + 1)
    return lengths


def validate_rewrite(original, rewritten, plan: RewritePlan, *, found, plans, other_changes, fused_cache_rows=None,
                     compare_lengths=(), model: ir.Model | None = None, exact_decode: bool = False,
                     rotations: bool | None = None) -> ValidationReport:
    """The oracle of what a rewrite of `original` into `rewritten` (saved files) claims, from the rewrite's
    `plan` (`posrewrite.plan.RewritePlan`: the request, and what it implies, e.g. fp32 positions):

    - every RoPE rotation of the rewritten model (each site, each layer) against a numpy rotation of its own
      pre-rotation q/k with the frequencies and attention factor `posrewrite.math.rope` gives for the request
      (the original's own numbers when nothing was rescaled), at lengths below and above L and at the new one;
    - output-preserving rewrites (fusion, --fp32-positions on a model with fp32 positions, extension within the
      old length, dynamic below L): original and rewritten outputs on the same inputs (`compare_models`);
    - rescales: the whole rewritten model at the new length is finite;
    - fused caches: a position past them is rejected.

    `found` is the detection of the original the plan was made from, `plans` the SitePlans the rewrite claims
    (the plan's own, or the forms a pass derived from them, e.g. a fused site's).
    Whole models are run one after the other, never skipped for their size."""
    try:
        return _validate_rewrite(original, rewritten, plan, found=found, plans=plans, other_changes=other_changes,
                                 fused_cache_rows=fused_cache_rows, compare_lengths=compare_lengths, model=model,
                                 rotations=rotations, exact_decode=exact_decode)
    finally:
        release_graphs()


def _validate_rewrite(original, rewritten, plan: RewritePlan, *, found, plans, other_changes, fused_cache_rows,
                      compare_lengths, model, rotations, exact_decode=False) -> ValidationReport:
    options, fp32_positions = plan.options, plan.fp32_positions
    report = ValidationReport()
    start = time.perf_counter()
    grid_plans = [p for p in plans if p.grid is not None]
    if grid_plans:  # 2-D RoPE: the rewritten angles re-fitted by probing against the planned ones
        if model is None:
            from posrewrite import io

            model = io.load_model(rewritten)
        report.rows.extend(check_grid_rescales(model, grid_plans))
        plans = [p for p in plans if p.grid is None]
    rope_sites = [s for s in found.rope_sites if all(p.site is not s for p in grid_plans)]
    if len(plans) == len(rope_sites) and all(_plan_for(s, plans) is None for s in rope_sites):
        references = [RopeReference(s, p) for s, p in zip(rope_sites, plans, strict=True)]  # one plan per site
    else:
        references = [RopeReference(s, _plan_for(s, plans)) for s in rope_sites]
    rescaled = any(p.params.rope_type != "default" or p.params.rope_theta is not None for p in plans)
    touches_rope = bool(plans) or options.fuse != "none" or fp32_positions if rotations is None else rotations
    vocab = token_id_limits(original)
    if touches_rope and references:
        if model is None:
            from posrewrite import io

            model = io.load_model(rewritten)
        lengths = set(rotation_lengths(references))
        # the fused caches' last row (claimed by the rewrite, or by --max-positions) must be reachable
        lengths.update(n for n in (fused_cache_rows, options.max_positions) if n and n <= 4 * MAX_VALIDATION_LENGTH)
        bounded = getattr(options, "validate_scope", "bounded") != "full"
        report.rows.extend(check_rotations(model, references, sorted(lengths), vocab,
                                           keys_rotated_after_cache=exact_decode, bounded=bounded))
    half_positions = any(_half(s.position_dtype) or _half(s.angle_dtype) for s in rope_sites)
    changes_outputs = (rescaled or bool(options.pos_scale) or bool(options.alibi_scale) or bool(options.bias_scale)
                       or (fp32_positions and half_positions))
    lengths = set(compare_lengths)
    if not changes_outputs:
        lengths.update(_switch_lengths(rope_sites))
    for p in plans:
        if (p.params.rope_type == "dynamic" and p.params.original_max_position_embeddings
                and p.site.prior_scaling is None and p.params.rope_theta is None):
            lengths.add(max(2, int(p.params.original_max_position_embeddings) // 2))  # dynamic keeps it below L
    if not changes_outputs and (touches_rope or other_changes):
        lengths.add(FUSE_COMPARE_LENGTH)
    elif fp32_positions and half_positions and not rescaled:
        report.notes.append("outputs not compared with the original: its positions or angles are in half "
                            "precision, which --fp32-positions changes on purpose (rotations were checked)")
    runs = model_runs(original, rewritten, options, rope_sites, vocab, report)
    if not changes_outputs or rescaled:
        for n in sorted(lengths):
            if n <= MAX_VALIDATION_LENGTH:
                # exact decode (--runtime-decode rerotate): the caches hold other values, so the whole models
                # are compared from an empty past
                report.rows.append(compare_models(original, rewritten, n, cache_contract_changed=True)
                                   if exact_decode else runs.compare(n))
    length = None
    if rescaled:
        length = min(max(rotation_lengths(references)), MAX_VALIDATION_LENGTH)
    elif (other_changes or plans) and options.max_positions:  # extended tables: run at their new length
        length = min(int(options.max_positions), MAX_VALIDATION_LENGTH)
    if length:
        ok, message = runs.run_far(length)
        report.rows.append(RunCheck(site="model", length=length, ok=ok, message=message,
                                    compared=f"the rewritten model at {length} positions: runs, no NaN or +inf"))
    rows = fused_cache_rows
    if rows and rows < 4 * MAX_VALIDATION_LENGTH:
        report.rows.append(runs.probe_past_cache(int(rows)))
    report.seconds = time.perf_counter() - start
    return report


def check_grid_rescales(model: ir.Model, plans: list) -> list[GridCheck]:
    """Each 2-D RoPE plan against the rewritten model: its angle tensor is found and fitted again by probing
    (a·row + b·column per channel at the same probe grid), and must equal the original slopes times the planned
    per-channel ratio, with the planned attention factor on cos/sin."""
    from posrewrite.passes.onnx.rope.detect import detect_rope

    sites, _ = detect_rope(model)
    by_key = {site_key(s): s for s in sites}
    rows: list[GridCheck] = []
    for index, plan in enumerate(plans):
        row = GridCheck(site=index, length=None, ok=False,
                        compared="2-D RoPE angles of the rewritten model (fitted per channel on probe grids) vs the "
                                 "original's times the planned per-axis ratios")
        new = by_key.get(site_key(plan.site))
        if new is None or new.angles.value != "grid":
            rows.append(dataclasses.replace(row, message="the 2-D RoPE is not found in the rewritten model"))
            continue
        ratio = np.asarray(plan.grid.angle_ratio, np.float64).reshape(-1)
        old_axes, new_axes = plan.site.source.axes, new.source.axes
        want = np.stack([old_axes.row_slope * ratio, old_axes.col_slope * ratio])
        got = np.stack([new_axes.row_slope, new_axes.col_slope])
        if want.shape != got.shape:
            rows.append(dataclasses.replace(row, message=f"angle channels {got.shape} vs planned {want.shape}"))
            continue
        err = float(np.max(np.abs(got - want)))
        # the slopes are fitted from float32 angles of up to slope x grid size: a few roundings of those
        tol = 16 * precision.unit_roundoff("float32") * max(1.0, float(np.max(np.abs(want)))) * max(
            old_axes.probe_grid)
        factor_ok = bool(np.isclose(new.attention_factor, plan.attention_factor, rtol=1e-6))
        rows.append(dataclasses.replace(
            row, max_abs_error=err, tolerance=tol, ok=err <= tol and factor_ok,
            message=None if factor_ok else f"attention factor {new.attention_factor:g}, planned "
                                           f"{plan.attention_factor:g}"))
    return rows
