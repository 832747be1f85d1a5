"""The rewrite pipeline: which passes run for a `RewritePlan` (`posrewrite.plan`), in what order and why, and
what they claim.

    detection (cached) ──▶ PassManager([rescale RoPE, extend tables, extend masks, fp32 RoPE, fp32 ALiBi,
                                         fuse RotaryEmbedding, cleanup, fuse attention, extend attention,
                                         cleanup]) ──▶ RewriteReport (changes, notes, claims) ──▶ validation step

(with --fuse, --extend runs in place of the attention fusion and log-n alone just before it: step 5 below)

Every posrewrite pass is a `ReportingPass`: an `onnx_ir` in-place pass that implements `run(model)`, fills its
own `changes` / `notes` lines and hands them, with its `PassResult`, to the shared `PipelineContext`. The context
appends them to one `RewriteReport` and keeps the detection of the model cached until a pass reports
``modified=True``: a pass that needs sites reads `context.detection(model)`, which is never a detection made
before an earlier rewrite (the fusion reads `context.rope_sites(model)`: that detection, plus the sites a
runtime rescale claims and the detector cannot read back, whose rotations the rescale left as they were).
Plans are frozen; a pass that rewrites a planned site under another form (the fusion) claims a derived plan in
the report, it does not change the plan it was given.

The validation step (`ValidationStep`) checks the report's claims against the written model with the oracles
of `posrewrite.validate`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from posrewrite import errors
from posrewrite.passes.onnx._graph import has_past_inputs
from posrewrite.passes.onnx._infra import PipelineContext, RewriteReport, cleanup_passes
from posrewrite.passes.onnx.detect import Detection
from posrewrite.progress import NullReporter

if TYPE_CHECKING:
    from posrewrite.plan import RewritePlan
    from posrewrite.validate import ValidationReport

__all__ = [
    "NOTHING_CHANGED",
    "Pipeline",
    "ValidationStep",
    "build_pipeline",
    "run_passes",
]

NOTHING_CHANGED = "nothing changed: the model already is as requested"


# ---------------------------------------------------------------------------------------------------------------
# building the pipeline
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pipeline:
    """What a rewrite runs: the plan it follows (`posrewrite.plan.RewritePlan`), the passes (in order), the shared
    context, and the validation of the written model."""

    plan: RewritePlan
    passes: list[ir.passes.PassBase]
    context: PipelineContext
    validation: ValidationStep

    @property
    def report(self) -> RewriteReport:
        return self.context.report

    def run(self, model: ir.Model) -> RewriteReport:
        """Runs every pass on ``model`` (in place); the report says what they did."""
        report = self.context.report
        run_passes(self.passes, model)
        if not report.changes:
            report.notes.append(NOTHING_CHANGED)
        return report


def run_passes(passes: Sequence[ir.passes.PassBase], model: ir.Model) -> ir.passes.PassResult:
    """``passes`` composed by one `onnx_ir.passes.PassManager`; what a pass raises (a `PosrewriteError`: bad
    request, refusal with its exit code; a failed precondition) comes out as itself, not wrapped in onnx_ir's
    PassError."""
    if not passes:
        return ir.passes.PassResult(model, False)
    try:
        return ir.passes.PassManager(list(passes), steps=1)(model)
    except ir.passes.PassError as exc:
        cause: BaseException | None = exc
        while isinstance(cause, ir.passes.PassError) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is exc:
            raise
        raise cause from None


def build_pipeline(plan: RewritePlan, detection: Detection, *, progress: Any = None) -> Pipeline:
    """The passes a rewrite runs for ``plan`` (`posrewrite.plan.make_plan`) on a model whose ``detection`` (the
    one the plan was made from) is given, and why:

    1. RoPE rescale or --max-positions extension (the plan's site plans, made before anything is touched);
    2. other encodings (ALiBi / learned / sinusoidal / T5 tables), then causal masks baked as [T, T] constants
       (--max-positions);
    3. fp32 positions: RoPE, then ALiBi (implied by a rescale of half-precision positions; with --fuse the
       fused caches are fp32 math already, so only ALiBi);
    4. --fuse: RotaryEmbedding, cleanup (onnxscript's attention rules and the KV-cache fusion's shape inference
       read a sorted graph without the replaced rotations), attention fusion;
    5. --extend / --logn-scaling: attention-level extension on the re-detected RoPE sites (with --fuse: after the
       rotary fusion, on the RotaryEmbedding nodes; --extend leaves attention unfused, --logn-scaling alone scales
       the queries before attention fusion);
    6. with --extend or --fuse: torch's NaN guard of attention left unfused moved from its [.., S, T] probabilities
       to its output rows (`SoftmaxGuardPass`, exact); cleanup;
    7. a run-time method (dynamic, longrope) on a KV-cache export: its decode contract in the metadata
       (``--runtime-decode``: when a generation loop must re-prefill; `posrewrite.decode` honours it).
    """
    from posrewrite.passes.onnx.alibi.fp32 import Fp32AlibiPass
    from posrewrite.passes.onnx.attention.extend import AttentionExtendPass, RerotatePastKeysPass
    from posrewrite.passes.onnx.attention.fuse import FuseAttentionPass
    from posrewrite.passes.onnx.attention.softmax_guard import SoftmaxGuardPass
    from posrewrite.passes.onnx.bias.rewrite import Fp32ScoreBiasPass
    from posrewrite.passes.onnx.extend_tables import ExtendTablesPass
    from posrewrite.passes.onnx.masks import ExtendSquareMasksPass
    from posrewrite.passes.onnx.rope.decode_contract import DecodeContractPass
    from posrewrite.passes.onnx.rope.fp32 import Fp32PositionsPass
    from posrewrite.passes.onnx.rope.fuse import FuseRotaryPass
    from posrewrite.passes.onnx.rope.rescale import RescaleRopePass

    options, plans = plan.options, plan.site_plans
    context = PipelineContext(model_path=plan.model_path, progress=progress or NullReporter())
    context.report.notes.extend(f"skipped {r.where}: {r.reason}" for r in detection.refusals)
    passes: list[ir.passes.PassBase] = []
    runtime_plan = None
    if plans:
        passes.append(RescaleRopePass(plans=plans, usage_errors=options.rescales_rope, context=context))
        runtime_plan = next((p for p in plans if p.runtime), None)
        runtime = runtime_plan.params.rope_type if runtime_plan is not None else None
        if runtime is not None and options.runtime_decode == "rerotate":
            passes.append(RerotatePastKeysPass(method=runtime, required=True, context=context))
    if plan.rewrites_other_tables:
        passes.append(ExtendTablesPass(max_positions=options.max_positions, pos_scale=options.pos_scale,
                                       alibi_scale=options.alibi_scale, bias_scale=options.bias_scale,
                                       context=context))
    if options.max_positions:
        passes.append(ExtendSquareMasksPass(rows=int(options.max_positions), context=context))
    fp32_preface: list[str] = []
    if plan.fp32_implied:
        fp32_preface.append("positions or angles are computed in half precision: --fp32-positions is implied by "
                            "the rescale")
    if plan.fp32_positions:
        if options.fuse != "none":
            fp32_preface.append("RoPE caches of the fused ops are computed in fp32 and cast to the activation dtype")
        else:
            passes.append(Fp32PositionsPass(context=context, preface=fp32_preface))
            fp32_preface = []
        passes.append(Fp32AlibiPass(context=context, preface=fp32_preface))
        passes.append(Fp32ScoreBiasPass(context=context))
    extends = options.extend is not None or options.logn_scaling
    if options.fuse != "none":
        rotary = FuseRotaryPass(target=options.fuse, max_positions=plan.fused_cache_rows, context=context)
        passes.append(rotary)
        passes.extend(cleanup_passes())
        if options.extend is not None:
            # a fused attention op computes one score matrix; the extension merges two or three: the rotations
            # stay fused (the second position system is a second RotaryEmbedding), attention stays as it is
            unfused = (f"attention left unfused: --extend {options.extend} merges several score matrices, which "
                       "GroupQueryAttention / MultiHeadAttention / Attention-23 cannot express")
            passes.append(AttentionExtendPass(extension=options.attention_extension, logn_length=plan.logn_length,
                                              context=context, preface=[unfused]))
        elif extends:
            # log-n alone scales each query row (before the rotation, which is linear), so attention still fuses
            passes.append(AttentionExtendPass(logn_length=plan.logn_length, logn_on_queries=True, context=context))
            passes.extend(cleanup_passes())
            passes.append(FuseAttentionPass(target=options.fuse, after=rotary, context=context))
        else:
            passes.append(FuseAttentionPass(target=options.fuse, after=rotary, context=context))
    elif extends:
        passes.append(AttentionExtendPass(extension=options.attention_extension, logn_length=plan.logn_length,
                                          context=context))
    if options.fuse != "none" or options.extend is not None:
        # attention left unfused (--extend rewrites its scores; --fuse leaves it where it cannot fuse): torch's NaN
        # guard on its rows, not on the whole [.., S, T] matrix; exact (after a cleanup: the products the extension
        # replaced still read the guarded probabilities until then)
        passes.extend(cleanup_passes())
        passes.append(SoftmaxGuardPass(context=context))
    passes.extend(cleanup_passes())
    if runtime_plan is not None and runtime_plan.params.original_max_position_embeddings:
        passes.append(DecodeContractPass(mode=options.runtime_decode or "hf", method=runtime,
                                         original_max_positions=runtime_plan.params.original_max_position_embeddings,
                                         asked=options.runtime_decode is not None, context=context))
    return Pipeline(plan, passes, context, ValidationStep(plan, detection))


# ---------------------------------------------------------------------------------------------------------------
# validation: the report's claims against the written model
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ValidationStep:
    """Checks what the passes claim (`RewriteReport`) against the model written at ``saved`` (not yet switched
    into place), with the oracles of `posrewrite.validate`:

    - attention-level extension alone: the rewritten model equals the original inside the window (and below L
      for log-n) and runs past it;
    - anything else: `validate_rewrite` with the claimed RoPE plans, other-encoding changes and fused cache rows.

    None when validation is off or nothing changed. A model whose original onnxruntime cannot load is an error
    (exit 3), not a validation that passed."""

    plan: RewritePlan
    detection: Detection

    def __call__(self, report: RewriteReport, saved: str | os.PathLike, model: ir.Model,
                 progress: Any = None) -> ValidationReport | None:
        progress = progress or NullReporter()
        if not self.plan.options.validate or not report.changes:
            return None
        path = self.plan.model_path
        if report.attention_changes and not report.rope_plans and not report.other_changes:
            from posrewrite.validate import release_graphs

            try:
                result = self._attention(saved, model, progress, report.fused_cache_rows)
            finally:
                release_graphs()
        else:
            from posrewrite.passes.onnx.attention.extend import REROTATE_CHANGE
            from posrewrite.validate import validate_rewrite

            with progress.stage("validating"):
                result = validate_rewrite(path, saved, self.plan, found=self.detection,
                                          plans=list(report.rope_plans), other_changes=list(report.other_changes),
                                          fused_cache_rows=report.fused_cache_rows, model=model,
                                          exact_decode=any(c.startswith(REROTATE_CHANGE)
                                                           for c in report.attention_changes))
        refuse_if_original_cannot_load(result, path)
        return result

    def _attention(self, saved, model: ir.Model, progress, cache_rows: int | None = None) -> ValidationReport:
        """Inside the window (and below L for log-n) the rewritten model must equal the original; past it, it
        must run (up to the rows of fused RotaryEmbedding caches, ``cache_rows``; one position past them it must be
        refused, as for --fuse alone)."""
        from posrewrite.validate import MAX_VALIDATION_LENGTH, RunCheck, ValidationReport, model_runs, token_id_limits

        opts, path = self.plan.options, self.plan.model_path
        report = ValidationReport()
        runs = model_runs(path, saved, opts, list(self.detection.rope_sites), token_id_limits(path), report)
        ext = opts.attention_extension
        inside = [ext.unchanged_length] if ext is not None else []
        if opts.logn_scaling:
            inside.append(int(self.plan.logn_length))
        length = max(1, min(min(inside), MAX_VALIDATION_LENGTH))
        cache = has_past_inputs(model)
        with progress.stage("validating"):
            if cache and opts.extend is not None:
                report.notes.append("KV-cache export: the cache now holds the keys of every position system (see "
                                    "docs/long-context.md), so the original and the rewritten model read a past "
                                    "differently and are not compared; the rewritten model is run")
            else:
                report.rows.append(dataclasses.replace(runs.compare(length), site="model inside the window"))
            far = min(max(4 * length, 16), MAX_VALIDATION_LENGTH, cache_rows or MAX_VALIDATION_LENGTH)
            ok, message = runs.run_far(far)
            report.rows.append(RunCheck(site="model", length=far, ok=ok, message=message,
                                        compared=f"the rewritten model at {far} tokens: runs, every output finite"))
            if cache_rows:  # fused RotaryEmbedding nodes (--fuse): one position past their caches must be refused
                report.rows.append(runs.probe_past_cache(cache_rows))
        return report


def refuse_if_original_cannot_load(report: ValidationReport | None, original) -> None:
    """A validation row skipped because the original does not run says nothing about the rewrite; when
    onnxruntime cannot even load the original, that is an error (exit 3), not a validation that passed."""
    if report is None or not any("skipped" in str(r.message or "") for r in report.rows):
        return
    if report.scope == "bounded":  # the bounded check loaded the original's cut itself (a whole load is not bounded)
        return
    reason = _onnxruntime_load_error(original)
    if reason is not None:
        raise errors.ModelLoadError(f"{original}: onnxruntime cannot load the model: {reason}")


def _onnxruntime_load_error(path) -> str | None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(str(Path(path)), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several types
        return " ".join(str(exc).split())[:300]
    return None
