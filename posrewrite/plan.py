"""One frozen plan per rewrite, made once: what a `RewriteOptions` request means for one detected model.

    request (RewriteOptions) + config.json (read once, when the request needs it) + the detection
        ──make_plan──▶ RewritePlan (frozen): RoPE parameters, per-site plans, budgets checked,
                       implied --fp32-positions, fused cache rows, log-n length

The pipeline (`posrewrite.pipeline.build_pipeline`, its `ValidationStep`) and the validation of a rewrite made
earlier (`posrewrite.api.validate`, ``posrewrite validate ORIGINAL REWRITTEN``) read the same plan: every check
made here (the target length, the table budgets, sites that cannot take the request) holds for both.

Precedence of the RoPE parameters, key by key: the explicit flag (``--rope-scale``, ``--rope-method``,
``--original-max-positions``, ``--rope-base``), then ``--rope-params``, then the model's ``config.json`` (its
``rope_theta`` and ``max_position_embeddings``), then what the graph tells (the trained length of a table, or the
one an earlier posrewrite rescale recorded). The numbers themselves come from `posrewrite.math`.
"""

from __future__ import annotations

__all__ = [
    "RewritePlan",
    "check_table_budget",
    "make_plan",
    "refuse_identified",
    "requested_rope_parameters",
    "site_rope_parameters",
]

import dataclasses
import math
import os
import types
from collections.abc import Mapping
from typing import Any

from posrewrite import config as config_files
from posrewrite import errors
from posrewrite.config import rope_params_from_config
from posrewrite.limits import MAX_LENGTH, MEMORY_BUDGET_BYTES, TABLE_BYTES_PER_ELEMENT
from posrewrite.math import rope as rope_math
from posrewrite.options import RewriteOptions
from posrewrite.passes.onnx.detect import Detection
from posrewrite.passes.onnx.rope import rescale
from posrewrite.passes.onnx.rope.precision import needs_fp32_positions
from posrewrite.passes.onnx.rope.rescale import SitePlan
from posrewrite.sites.rope import AngleSource, RopeSite


@dataclasses.dataclass(frozen=True)
class RewritePlan:
    """What a rewrite of one model does, decided before the graph is touched. Frozen; read by the pipeline (which
    passes run, with which numbers) and by validation (what the written model must compute)."""

    #: the request as given (what the output's provenance records; an implied --fp32-positions is not in it)
    options: RewriteOptions
    #: the model the plan was made for (config.json is looked for beside it)
    model_path: str | os.PathLike | None
    #: config.json beside the model, read once; None when there is none or nothing in the request needed it
    config: Mapping[str, Any] | None
    #: the HF-style ``rope_parameters`` requested (flags, --rope-params, config.json), before the gaps each site
    #: fills from the graph; None when no 1-D RoPE site is rescaled
    rope_parameters: Mapping[str, Any] | None
    #: per RoPE site: a rescale, a 2-D grid rescale, or a --max-positions extension of its tables
    site_plans: tuple[SitePlan, ...]
    #: RoPE (and ALiBi) positions made fp32: asked for, or implied by a rescale of half-precision positions
    fp32_positions: bool
    #: --fp32-positions was not asked for but the rescale implies it
    fp32_implied: bool
    #: rows of fused RoPE caches for sites without a table of their own (--fuse; None: the pass's default)
    fused_cache_rows: int | None
    #: L of --logn-scaling (None without it)
    logn_length: int | None
    #: ALiBi / learned / sinusoidal / T5 tables are rewritten (--max-positions, --pos-scale, --alibi-scale,
    #: --bias-scale on a model with such sites)
    rewrites_other_tables: bool


def make_plan(options: RewriteOptions, model_path: str | os.PathLike | None, detection: Detection) -> RewritePlan:
    """The plan of rewriting the model at ``model_path`` (detected as ``detection``) as ``options`` ask.

    config.json beside the model is read at most once, and only when the request needs it. Raises UsageError
    (exit 2) for a request no site can take or one past the documented bounds (target length, table budget),
    PartialMatchError (exit 5) for an identified site that cannot take it, NoEncodingError (exit 4) when the
    request names an encoding the model does not have."""
    read: list[Mapping[str, Any] | None] = []

    def config() -> Mapping[str, Any] | None:
        if not read:
            data = config_files.read_config_json(model_path) if model_path is not None else None
            read.append(types.MappingProxyType(data) if data is not None else None)
        return read[0]

    if options.max_positions:
        check_table_budget(detection.sites, int(options.max_positions), "--max-positions")
    requested: list[dict[str, Any]] = []
    site_plans = _site_plans(options, model_path, detection, config, requested)
    half = bool(options.rescales_rope and needs_fp32_positions(detection.rope_sites))
    implied = bool(options.rescales_rope and not options.fp32_positions and half)
    rows = None
    if options.fuse != "none":
        rows = _fused_cache_rows(options, config)
    logn = _logn_length(options, config) if options.logn_scaling else None
    others = [s for s in detection.sites if not isinstance(s, RopeSite)]
    tables = bool(others and (options.max_positions or options.pos_scale or options.alibi_scale
                              or options.bias_scale))
    return RewritePlan(
        options=options,
        model_path=model_path,
        config=read[0] if read else None,
        rope_parameters=types.MappingProxyType(requested[0]) if requested else None,
        site_plans=tuple(site_plans),
        fp32_positions=bool(options.fp32_positions or implied),
        fp32_implied=implied,
        fused_cache_rows=rows,
        logn_length=logn,
        rewrites_other_tables=tables,
    )


# ---------------------------------------------------------------------------------------------------------------
# RoPE parameters
# ---------------------------------------------------------------------------------------------------------------


def requested_rope_parameters(options: RewriteOptions, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An HF-style ``rope_parameters`` dict for the rescaled model, from the request and config.json.

    Precedence for each key: the explicit flag (``--rope-scale``, ``--rope-method``, ``--original-max-positions``,
    ``--rope-base``), then ``--rope-params``, then ``config`` (its ``rope_theta`` and ``max_position_embeddings``).
    Keys that stay unknown are left out: the caller takes them from the graph. Without any scale the result has
    ``rope_type`` ``"default"`` (a new base alone).
    """
    from_config = rope_params_from_config(config) if config else {}
    params: dict[str, Any] = {}
    scale = options.effective_rope_scale
    params["rope_type"] = (options.rope_method if (scale is not None or "long_factor" in options.rope_params)
                           else "default")
    if scale is not None:
        params["factor"] = scale
    orig = options.original_max_positions or options.rope_params.get("original_max_position_embeddings")
    if orig is None:
        orig = from_config.get("original_max_position_embeddings")
    if orig is not None:
        params["original_max_position_embeddings"] = int(orig)
    theta = options.rope_base or options.rope_params.get("rope_theta") or from_config.get("rope_theta")
    if theta is not None:
        params["rope_theta"] = float(theta)
    for key, value in options.rope_params.items():
        params.setdefault(key, value)
    if "partial_rotary_factor" in from_config:
        params.setdefault("partial_rotary_factor", from_config["partial_rotary_factor"])
    return params


def site_rope_parameters(requested: Mapping[str, Any], site: RopeSite,
                         config: Mapping[str, Any] | None = None) -> rope_math.RopeParameters:
    """The RoPE request for one site: ``requested`` (`requested_rope_parameters`), its trained length filled from
    what the graph tells (the length an earlier posrewrite rescale recorded, the site's tables) or config.json
    when a method needs it. UsageError for parameters that are not valid or a target length past the bound."""
    hf = dict(requested)
    hf.pop("partial_rotary_factor", None)
    method = hf.get("rope_type", "default")
    if method in ("dynamic", "yarn", "llama3", "longrope") and "original_max_position_embeddings" not in hf:
        record = site.encoding.rescaled
        recorded = record.original_max_position_embeddings if record is not None else None
        if recorded:  # an earlier posrewrite rescale recorded the trained length: a second one starts from it
            hf["original_max_position_embeddings"] = int(recorded)
        elif site.max_positions is not None:
            hf["original_max_position_embeddings"] = int(rescale.switched_threshold(site) or site.max_positions)
        elif config and config.get("max_position_embeddings"):
            hf["original_max_position_embeddings"] = int(config["max_position_embeddings"])
        else:
            raise errors.UsageError(
                f"--rope-method {method} needs the training length and the graph does not tell it "
                "(angles are computed on the fly, no config.json beside the model): pass --original-max-positions N"
            )
    try:
        params = rope_math.RopeParameters.from_hf(hf)
        params.validate()
    except (ValueError, TypeError, OverflowError) as exc:
        raise errors.UsageError(str(exc)) from None
    _check_target_length(hf, site)
    return params


def _check_target_length(hf: dict[str, Any], site: RopeSite) -> None:
    """A rescale's target length (scale x the trained length) within the documented bound (exit 2)."""
    factor = hf.get("factor")
    trained = hf.get("original_max_position_embeddings") or site.max_positions
    if factor is None or not trained:
        return
    target = float(factor) * float(trained)
    if target > MAX_LENGTH:
        raise errors.UsageError(
            f"--rope-scale {float(factor):g} x the trained length {int(trained)} = {target:.4g} positions, over the "
            f"limit of {MAX_LENGTH} (see README, Reliability)"
        )


# ---------------------------------------------------------------------------------------------------------------
# per-site plans
# ---------------------------------------------------------------------------------------------------------------


def _site_plans(options: RewriteOptions, path, found: Detection, config, requested: list) -> list[SitePlan]:
    """The frozen site plans, from the detection of the model before anything is touched: a rescale plan per RoPE
    site (tables at least --max-positions rows), or, with --max-positions alone, an extension plan per RoPE table
    that is shorter; 2-D RoPE sites with --original-grid/--target-grid. Usage errors (exit 2) for requests a site
    cannot take. The requested rope_parameters (when 1-D sites are rescaled) are appended to ``requested``."""
    rope_sites = found.rope_sites
    grid_plans = _grid_plans(options, path, found)
    if grid_plans:
        rope_sites = [s for s in rope_sites if all(p.site is not s for p in grid_plans)]
    if not options.rescales_rope:
        if not options.max_positions:
            return grid_plans
        # RoPE tables (GPT-J/CodeGen sincos tables, fused caches) grow to --max-positions, same frequencies
        return [p for p in (rescale.plan_extension(s, options.max_positions) for s in rope_sites) if p is not None]
    if not rope_sites and grid_plans:
        raise errors.UsageError("--rope-scale/--rope-base rescale 1-D RoPE and this model has only 2-D RoPE: "
                                "--original-grid/--target-grid (with --rope-method) rescale it")
    if not rope_sites:
        refuse_identified(found, path)
        raise errors.NoEncodingError(f"--rope-scale/--rope-base given but no RoPE found in {path}")
    plans = list(grid_plans)
    request = requested_rope_parameters(options, config())
    requested.append(request)
    for site in rope_sites:
        params = site_rope_parameters(request, site, config())
        try:
            plan = rescale.plan_site(site, params)
        except rescale.NotRewritable as exc:
            raise errors.PartialMatchError(str(exc)) from None
        except ValueError as exc:
            raise errors.UsageError(str(exc)) from None
        if site.encoding.decay is not None and options.xpos_decay == "scaled":
            plan = dataclasses.replace(plan, decay_ratio=_xpos_ratio(params))
        if options.max_positions and plan.new_length is not None:  # tables at least --max-positions rows
            plan = dataclasses.replace(plan, new_length=max(plan.new_length, int(options.max_positions)))
        if plan.new_length is not None:
            if plan.new_length > MAX_LENGTH:
                raise errors.UsageError(
                    f"the rescaled length {plan.new_length} is over the limit of {MAX_LENGTH} (lower --rope-scale)"
                )
            check_table_budget([site], int(plan.new_length), "--rope-scale")
        plans.append(plan)
    return plans


def _xpos_ratio(params: rope_math.RopeParameters) -> float:
    """--xpos-decay scaled: positions divided by the factor before the decay too (linear interpolation only)."""
    if params.rope_type != "linear" or params.rope_theta is not None:
        raise errors.UsageError("--xpos-decay scaled divides the decay's positions like the angles': it goes with "
                                "--rope-method linear only")
    return 1.0 / float(params.factor)


def _grid_plans(options: RewriteOptions, path, found: Detection) -> list[SitePlan]:
    """--original-grid/--target-grid: a per-axis plan for every 2-D RoPE site; exit 4 when there is none (exit 5
    with the reason when a RoPE was identified but is not rewritable, e.g. baked by a static export), exit 5 when
    one cannot take it (normalised coordinates: the model already adapts to resolution)."""
    if options.target_grid is None or options.original_grid is None:
        return []
    grid = [s for s in found.rope_sites if s.angles == AngleSource.GRID]
    if not grid:
        if not found.rope_sites:  # a RoPE identified but not rewritable (a static export...): exit 5, the reason
            refuse_identified(found, path)
        raise errors.NoEncodingError(f"--original-grid/--target-grid given but no 2-D RoPE found in {path}")
    try:
        return [rescale.plan_grid_site(s, options.rope_method, options.original_grid, options.target_grid)
                for s in grid]
    except rescale.NotRewritable as exc:
        raise errors.PartialMatchError(str(exc)) from None


def refuse_identified(found: Detection, path) -> None:
    """Exit 5 with the reason when an encoding was identified but cannot be rewritten (not exit 4)."""
    identified = [r for r in found.refusals if not r.kind.endswith("?")]
    if identified:
        first = identified[0]
        more = f" (and {len(identified) - 1} more)" if len(identified) > 1 else ""
        raise errors.PartialMatchError(f"{path}: {first.kind} found but not rewritable: {first.where}: "
                                       f"{first.reason}{more}")


# ---------------------------------------------------------------------------------------------------------------
# lengths and budgets
# ---------------------------------------------------------------------------------------------------------------


def _fused_cache_rows(options: RewriteOptions, config) -> int | None:
    """Rows of fused caches for sites without a table of their own: --max-positions, else config.json's
    max_position_embeddings (None: the pass's default)."""
    if options.max_positions:
        return int(options.max_positions)
    value = (config() or {}).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def _logn_length(options: RewriteOptions, config) -> int:
    """L of --logn-scaling: --original-max-positions, else config.json's seq_length (Qwen-1),
    original_max_position_embeddings or max_position_embeddings."""
    length, source = None, "--original-max-positions"
    if options.original_max_positions:
        length = int(options.original_max_positions)
    else:
        found = config() or {}
        key = next((k for k in ("seq_length", "original_max_position_embeddings", "max_position_embeddings")
                    if found.get(k)), None)
        if key is not None:
            length, source = int(found[key]), f"config.json {key}"
    if length is not None:
        if length < 2:  # the factor is log(p + 1) / log(L)
            raise errors.UsageError(f"--logn-scaling needs a trained length L of at least 2 ({source} is {length})")
        return length
    raise errors.UsageError("--logn-scaling needs the trained length L: pass --original-max-positions N "
                            "(or keep the model's config.json beside it)")


def check_table_budget(sites, rows: int, flag: str) -> None:
    """Tables grown to ``rows`` positions (learned, sinusoidal, ALiBi, RoPE cos/sin) stay within the memory
    budget, counted at TABLE_BYTES_PER_ELEMENT (float64 math and temporaries); exit 2 naming the flag otherwise."""
    for site in sites:
        for attr in ("table", "cos_cache", "sin_cache"):
            value = getattr(site, attr, None)
            shape = getattr(value, "shape", None)
            if shape is None or not shape.is_static() or not len(shape.dims):
                continue
            dims = [int(d) for d in shape.dims]
            elements = math.prod(dims)
            if elements == 0:
                continue
            width = getattr(site, "dim", None)
            old_rows = getattr(site, "rows", None) or getattr(site, "max_positions", None)
            axis = getattr(site, "table_axis", None)
            if isinstance(width, int) and width > 0 and attr == "table" and not isinstance(axis, int):
                new_elements = rows * width  # learned / sinusoidal: [rows, dim]
            elif isinstance(axis, int) and -len(dims) <= axis < len(dims):  # ALiBi baked along a key axis
                old = dims[axis]
                square = dims.count(old) >= 2 and old > 1  # [.., T, T]: both axes grow
                new_elements = elements // (old * old) * rows * rows if square else elements // old * rows
            elif isinstance(old_rows, int) and old_rows > 0 and elements % old_rows == 0:
                new_elements = elements // old_rows * rows  # RoPE caches: [rows, width]
            else:
                new_elements = elements // max(dims) * rows
            new_bytes = new_elements * TABLE_BYTES_PER_ELEMENT
            if new_bytes > MEMORY_BUDGET_BYTES:
                raise errors.UsageError(
                    f"{flag} {rows}: the table {getattr(value, 'name', '?')} {dims} would need about "
                    f"{new_bytes / 2**30:.3g} GiB, over the memory budget of {MEMORY_BUDGET_BYTES >> 20} MiB "
                    "(see README, Reliability)"
                )
