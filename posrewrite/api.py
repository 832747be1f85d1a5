"""The Python API: `inspect`, `rewrite` and `check`. The CLI is a thin layer over these functions.

    load -> detect (typed sites) -> plan (pure math) -> build pipeline (posrewrite.pipeline) -> run its passes
    -> write beside -> validate (the pipeline's step) -> switch
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from posrewrite import errors, io, provenance
from posrewrite.graph_check import check_input_graph
from posrewrite.limits import DEFAULT_CHECK_LENGTH, MAX_LENGTH
from posrewrite.options import NOTHING_TO_DO, RewriteOptions
from posrewrite.passes.onnx.alibi.fp32 import alibi_precision
from posrewrite.passes.onnx.detect import detect
from posrewrite.passes.onnx.rope.precision import rope_site_precision
from posrewrite.pipeline import build_pipeline
from posrewrite.plan import make_plan, refuse_identified
from posrewrite.progress import NullReporter
from posrewrite.sites.base import EncodingSite, Refusal
from posrewrite.sites.rope import RopeSite


@dataclasses.dataclass
class InspectResult:
    model_path: str
    sites: list[EncodingSite]
    refusals: list[Refusal]
    rewrites: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # posrewrite.provenance history

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_path,
            "encodings": [s.to_dict() for s in self.sites],
            "rotations": sum(int(s.to_dict().get("rotations") or 0) for s in self.sites),
            "refusals": [r.to_dict() for r in self.refusals],
            "rewrites": [item | {"description": provenance.describe(item)} for item in self.rewrites],
        }


def inspect(path: str | os.PathLike, *, loaded: ir.Model | None = None) -> InspectResult:
    """Describes the positional encodings of the model at `path` (weights are not read). A genai / HF export
    folder: its (first) model. `loaded`: the model at `path` as io.load_model read it (not read again)."""
    if Path(path).is_dir():
        from posrewrite.folders import model_files

        path = model_files(path)[0]
    model = loaded if loaded is not None else io.load_model(path)
    found = detect(model)
    return InspectResult(str(path), found.sites, found.refusals, provenance.history(model))


# ---------------------------------------------------------------------------------------------------------------
# rewrite
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RewriteResult:
    input_path: str
    output_path: str | None
    modified: bool
    changes: list[str]
    notes: list[str]
    validation: Any = None
    sites: list[EncodingSite] = dataclasses.field(default_factory=list)
    #: positions the rewritten RoPE tables / caches hold (None: computed on the fly, or no RoPE rewritten)
    context_length: int | None = None
    #: HF-style rope_parameters of each rescaled RoPE site (what config.json gets in a folder rewrite)
    rope_parameters: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input_path,
            "output": self.output_path,
            "modified": self.modified,
            "changes": self.changes,
            "notes": self.notes,
            "validation": None if self.validation is None else self.validation.to_dict(),
            "encodings": [s.to_dict() for s in self.sites],
        }


def _options(options: RewriteOptions | None, kwargs: dict[str, Any]) -> RewriteOptions:
    if options is None:
        return RewriteOptions(**kwargs)
    if kwargs:
        return dataclasses.replace(options, **kwargs)
    return options


def rewrite(path: str | os.PathLike, options: RewriteOptions | None = None, *, progress=None, saver=None,
            loaded: ir.Model | None = None, **kwargs) -> RewriteResult:
    """Rewrites the model at `path` as `options` say and saves it (atomically) beside it or to options.output.

    Keyword arguments are RewriteOptions fields: `rewrite("m.onnx", rope_scale=4, rope_method="yarn",
    original_max_positions=4096, output="m-yarn.onnx")`. A folder (onnxruntime-genai's genai_config.json, or
    an HF/Optimum export with config.json) is rewritten into a new folder: `posrewrite.folders`.
    `saver(model, output) -> Path` replaces `io.save_model` (the folder rewrite's weight-sharing save).
    `loaded`: the model at `path` as io.load_model read it (the command line reads it up front to fail fast);
    rewritten in place instead of reading the file again.
    """
    if Path(path).is_dir():
        from posrewrite.folders import rewrite_folder

        return rewrite_folder(path, _options(options, kwargs), rewrite_model=rewrite, progress=progress)
    opts = _options(options, kwargs)
    progress = progress or NullReporter()
    if not opts.has_work():
        raise errors.UsageError(NOTHING_TO_DO)
    output = Path(opts.output) if opts.output is not None else io.default_output_path(path, opts.output_suffix())
    io.ensure_distinct_output(path, output)
    io.check_output_path(output)
    with progress.stage("loading"):
        model = loaded if loaded is not None else io.load_model(path)
    check_input_graph(model, path)  # broken as read: exit 3 (the passes' own check would blame the first pass)
    io.remove_leftovers(Path(os.path.abspath(output)), io.external_data_files(model))  # of killed runs
    with progress.stage("detecting"):
        found = detect(model)
    if not found.sites:
        refuse_identified(found, path)
        raise errors.NoEncodingError(f"no positional encoding found in {path}")
    if found.refusals and not opts.allow_partial:
        first = found.refusals[0]
        more = f" (and {len(found.refusals) - 1} more)" if len(found.refusals) > 1 else ""
        raise errors.PartialMatchError(
            f"not understood: {first.where}: {first.reason}{more}; refusing to write a partly rewritten model "
            "(use --allow-partial)"
        )
    blocked = [s for s in found.sites if getattr(s, "rewritable", True) is False]
    if blocked and not opts.allow_partial:
        raise errors.PartialMatchError(
            f"found but not rewritable: {blocked[0].bias.name}: {blocked[0].reason}; refusing to write a partly "
            "rewritten model (use --allow-partial)"
        )
    plan = make_plan(opts, path, found)
    steps = build_pipeline(plan, found, progress=progress)
    steps.context.seed(model, found)
    report = steps.run(model)
    claimed = report.rope_plans
    context = max([p.new_length or p.params.target_length() or 0 for p in claimed]
                  + [report.fused_cache_rows or 0]) or None
    hf_params = [p.params.to_hf(base=p.site.base, dim=p.site.rotary_dim) for p in claimed if not p.extends_only]
    provenance.record(model, provenance.entry(
        opts, [({"rope_theta": float(p.site.base)} if p.site.base else {}) | hf
               for p, hf in zip([p for p in claimed if not p.extends_only], hf_params, strict=True)],
        context_length=context, changes=len(report.changes)))
    if opts.validate:
        _check_inputs_fit_budget(model)
    # Write beside the output, validate what was written, and only then switch it into place: a failure or an
    # interrupt at any point (validation included) leaves the previous output, if any, and nothing else.
    with progress.stage("saving"):
        if saver is not None:  # a folder rewrite writes into its own staging folder and switches the folder
            staged = _WrittenInStage(saver(model, output))
        else:
            share = _share_weights(opts, model, output)
            _announce_disk(model, output, report, progress, share)
            staged = io.stage_model(model, output, share_weights=share)
    with staged:
        saved = staged.path
        validation = steps.validation(report, saved, model, progress)
        if validation is not None and not validation.ok:
            from posrewrite.validate import describe_failure

            raise errors.ValidationError(f"validation failed: {describe_failure(validation)}")
        saved = staged.commit()
    return RewriteResult(str(path), str(saved), bool(report.changes), list(report.changes), list(report.notes),
                         validation, found.sites, context_length=context, rope_parameters=hf_params)


def _share_weights(opts: RewriteOptions, model: ir.Model, output: Path) -> bool:
    if not getattr(opts, "share_weights", False):
        return False
    if not io.shares_weights_with(model, Path(os.path.abspath(output))):
        raise errors.UsageError("--share-weights: the output must be written in the folder of the input's data "
                                "files (the output reads them there); drop the flag to copy them")
    return True


def _announce_disk(model: ir.Model, output: Path, report, progress, share: bool = False) -> None:
    """Say how much new disk the output's data takes before writing it (holes of a sparse input stay holes);
    refuse (exit 8) when the output's file system has less free space than that."""
    from posrewrite.memory import describe_bytes

    try:
        new, apparent = io.output_disk_bytes(model, share)
    except OSError:
        return
    if share:
        line = (f"writing {output.name}: {describe_bytes(new)} of new disk; untouched weights are read from the "
                "input's data file (--share-weights: keep the input beside the output)")
    elif not apparent:
        return
    else:
        line = (f"writing {output.name}: {describe_bytes(new)} of new disk for its data "
                f"({describe_bytes(apparent)} apparent: the input's holes stay holes)")
    try:
        st = os.statvfs(Path(os.path.abspath(output)).parent)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if free is not None and new > free:
        raise errors.OutputError(f"cannot write {output}: its data needs {describe_bytes(new)} of new disk, "
                                 f"{describe_bytes(free)} free")
    progress.note(line)
    report.notes.append(line)


class _WrittenInStage:
    """A model already written inside a staging folder (folder rewrites): nothing to switch or remove here."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _WrittenInStage:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def commit(self) -> Path:
        return self.path


def _check_inputs_fit_budget(model: ir.Model) -> None:
    """Validation feeds every graph input: a static shape declared past the memory budget cannot be fed."""
    from posrewrite.limits import MEMORY_BUDGET_BYTES, fits_budget

    for value in model.graph.inputs:
        shape = value.shape
        if shape is None or value.dtype is None:
            continue
        static = [int(d) for d in shape.dims if isinstance(d, int)]
        symbolic = len(shape.dims) - len(static)
        itemsize = max(1.0, float(value.dtype.itemsize))
        # symbolic axes are fed at most the longest validation length (one of them; batch is 1); every element
        # of a static shape (fed as declared) becomes at least a row of activations: 64 values of 8 bytes
        if not (fits_budget([*static, *([4 * 4096] if symbolic else [])], itemsize)
                and fits_budget(static, max(itemsize, 8.0) * 64)):
            raise errors.UsageError(
                f"input '{value.name}' declares the shape {list(shape.dims)}, over the memory budget of "
                f"{MEMORY_BUDGET_BYTES >> 20} MiB for validation; rerun with --no-validate to write it unvalidated"
            )


@dataclasses.dataclass
class ValidateResult:
    """`posrewrite validate ORIGINAL REWRITTEN [flags]`: whether REWRITTEN is what the flags make of ORIGINAL."""

    original: str
    rewritten: str
    validation: Any

    def to_dict(self) -> dict[str, Any]:
        return {"original": self.original, "rewritten": self.rewritten, "validation": self.validation.to_dict()}


def validate(original: str | os.PathLike, rewritten: str | os.PathLike, options: RewriteOptions | None = None,
             **kwargs) -> ValidateResult:
    """The rewrite's own oracle for a model rewritten earlier or by another tool: without RoPE options,
    REWRITTEN must compute what ORIGINAL computes (and its rotations the original's); with them, REWRITTEN
    must be that rescale of ORIGINAL. Raises nothing for a failed check: see `.validation.ok`."""
    from posrewrite.validate import validate_rewrite

    opts = _options(options, kwargs)
    orig_model = io.load_model(original)
    io.load_model(rewritten)  # a bad file fails here, with exit 3
    found = detect(orig_model)
    plan = make_plan(opts, original, found)  # the plan a rewrite makes, with its checks
    other_changes = ["tables"] if plan.rewrites_other_tables else []
    rows = None
    if not any(s.angles.value == "fused_op" for s in found.rope_sites):  # fused by the rewrite: probe its caches
        try:
            fused = [s.max_positions for s in detect(io.load_model(rewritten)).rope_sites
                     if s.angles.value == "fused_op" and s.max_positions]
        except Exception:  # noqa: BLE001 - the probe is an extra; the rotations are checked regardless
            fused = []
        rows = min(fused) if fused else None
    report = validate_rewrite(original, rewritten, plan, found=found, plans=list(plan.site_plans),
                              other_changes=other_changes, fused_cache_rows=rows, rotations=True)
    return ValidateResult(str(original), str(rewritten), report)


# ---------------------------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CheckResult:
    model_path: str
    max_length: int
    sites: list[dict[str, Any]]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def safe(self) -> bool:
        return all(s["safe"] for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_path, "max_length": self.max_length, "safe": self.safe, "sites": self.sites,
                "notes": self.notes}


def check(path: str | os.PathLike, *, max_length: int | None = None, loaded: ir.Model | None = None) -> CheckResult:
    """Precision analysis of every positional-encoding site at `max_length` tokens (a model folder: its model).
    `loaded`: the model at `path` as io.load_model read it (not read again)."""
    if max_length is not None and not 0 < int(max_length) <= MAX_LENGTH:
        raise errors.UsageError(f"--max-length {max_length} is outside 1..{MAX_LENGTH} (see README, Reliability)")
    if Path(path).is_dir():
        from posrewrite.folders import model_files

        path = model_files(path)[0]
    model = loaded if loaded is not None else io.load_model(path)
    found = detect(model)
    if not found.sites:
        refuse_identified(found, path)
        raise errors.NoEncodingError(f"no positional encoding found in {path}")
    n = int(max_length or DEFAULT_CHECK_LENGTH)
    rows = []
    for k, site in enumerate(found.sites):
        if isinstance(site, RopeSite):
            rows.append(rope_precision(site, n, k))
        elif site.kind == "alibi":
            row = alibi_precision(site, n)
            row.setdefault("site", k)
            rows.append(row)
        elif site.kind == "score_bias":
            from posrewrite.passes.onnx.bias.rewrite import score_bias_precision

            row = score_bias_precision(site, n)
            row.setdefault("site", k)
            rows.append(row)
    return CheckResult(str(path), n, rows)


def rope_precision(site: RopeSite, n: int, index: int = 0) -> dict[str, Any]:
    try:  # dtype tracing along the graph and table measurement
        return rope_site_precision(site, n, index)
    except ValueError as exc:  # an element type the analysis does not know (or the model does not say)
        raise errors.ModelLoadError(
            f"site {index}: cannot analyse its precision: {exc} (the model's element types are missing or invalid)"
        ) from None


