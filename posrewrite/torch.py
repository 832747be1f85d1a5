"""posrewrite for PyTorch: rewrite `torch.export` programs and export them to ONNX.

    import posrewrite.torch as pt

    ep = torch.export.export(model, (input_ids, position_ids))
    sites = pt.detect(ep)                                    # RoPE / ALiBi sites found in the ATen graph
    new = pt.rewrite(ep, rope_scale=4, rope_method="yarn", original_max_positions=4096, fuse=True)
    result = pt.export_onnx(model, (input_ids, position_ids), "model.onnx",
                            rope_scale=4, rope_method="yarn", fuse="ort")   # export + rewrite + save + ORT check

Options have the names and meanings of the ONNX side (`posrewrite.options.RewriteOptions`): ``rope_scale``,
``rope_method`` (linear, ntk, dynamic, yarn, llama3, longrope), ``original_max_positions`` (L),
``rope_base``, ``rope_params`` (an HF ``rope_parameters`` dict for the rest: beta_fast, short_factor, ...),
``xpos_decay``, ``original_grid`` / ``target_grid`` (2-D RoPE), ``fp32_positions``, ``fuse`` (False/"none",
True/"ort" -> com.microsoft.RotaryEmbedding in ONNX, "onnx" -> opset-23 RotaryEmbedding; in the torch program
both are the `torch.ops.posrewrite.rope_qk` custom op) and ``allow_partial``. ``config`` (an HF config or its
dict) supplies defaults such as ``max_position_embeddings``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posrewrite.errors import UsageError, ValidationError
from posrewrite.math.rope import RopeParameters
from posrewrite.options import RewriteOptions
from posrewrite.passes.fx.detect_alibi import detect_alibi
from posrewrite.passes.fx.detect_rope import detect_rope
from posrewrite.passes.fx.pipeline import (
    Fp32Positions,
    FuseRope,
    FxPass,
    FxPassManager,
    RescaleGrid,
    RescaleRope,
    prepare,
)
from posrewrite.passes.fx.sites import FxAlibiSite, FxRopeSite
from posrewrite.plan import requested_rope_parameters

__all__ = ["detect", "rewrite", "export_onnx", "TorchExportResult", "rope_parameters"]


def detect(program: torch.export.ExportedProgram) -> list[FxRopeSite | FxAlibiSite]:
    """The RoPE and ALiBi sites of ``program`` (a working copy is analysed; ``program`` is not changed).
    ``site.to_dict()`` gives the JSON form the ONNX side's ``inspect`` prints."""
    work = prepare(program)
    sites, _ = detect_rope(work)
    return [*sites, *detect_alibi(work)]


def _fuse_mode(fuse: bool | str | None) -> str:
    if fuse is None or fuse is False:
        return "none"
    if fuse is True:
        return "ort"
    if fuse in ("com.microsoft", "msft"):
        return "ort"
    return str(fuse)


def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise UsageError(f"config must be an HF config or a dict, not {type(config).__name__}")


def _options(**kw: Any) -> RewriteOptions:
    return RewriteOptions(
        rope_scale=kw.get("rope_scale"),
        rope_method=kw.get("rope_method") or "linear",
        original_max_positions=kw.get("original_max_positions"),
        rope_base=kw.get("rope_base"),
        rope_params=dict(kw.get("rope_params") or {}),
        fp32_positions=bool(kw.get("fp32_positions")),
        fuse=_fuse_mode(kw.get("fuse")),
        allow_partial=bool(kw.get("allow_partial")),
        xpos_decay=kw.get("xpos_decay") or "angles",
        original_grid=kw.get("original_grid"),
        target_grid=kw.get("target_grid"),
    )


def rope_parameters(opts: RewriteOptions, config: Any = None) -> RopeParameters | None:
    """The `RopeParameters` a rewrite with ``opts`` applies (None when the frequencies do not change)."""
    if not opts.rescales_rope:
        return None
    cfg = _config_dict(config)
    params = requested_rope_parameters(opts, cfg)
    max_pos = cfg.get("max_position_embeddings") if cfg else None
    try:
        rp = RopeParameters.from_hf(params, max_position_embeddings=max_pos)
        rp.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return rp


def _steps(opts: RewriteOptions, config: Any, fuse_angles: str = "tables") -> list[FxPass]:
    steps: list[FxPass] = []
    if opts.target_grid is not None:
        steps.append(RescaleGrid(opts.rope_method, opts.original_grid, opts.target_grid,
                                 allow_partial=opts.allow_partial))
    params = rope_parameters(opts, config)
    if params is not None:
        steps.append(RescaleRope(params, allow_partial=opts.allow_partial, xpos_decay=opts.xpos_decay,
                                 grid_requested=opts.target_grid is not None))
    if opts.fp32_positions:
        steps.append(Fp32Positions())
    if opts.fuse != "none":
        steps.append(FuseRope(allow_partial=opts.allow_partial, angles=fuse_angles))
    return steps


def rewrite(
    program: torch.export.ExportedProgram,
    *,
    rope_scale: float | None = None,
    rope_method: str = "linear",
    original_max_positions: int | None = None,
    rope_base: float | None = None,
    rope_params: dict[str, Any] | None = None,
    fp32_positions: bool = False,
    fuse: bool | str = False,
    fuse_angles: str = "tables",
    allow_partial: bool = False,
    xpos_decay: str = "angles",
    original_grid: tuple[int, int] | str | None = None,
    target_grid: tuple[int, int] | str | None = None,
    config: Any = None,
    messages: list[str] | None = None,
) -> torch.export.ExportedProgram:
    """A new ExportedProgram with RoPE rescaled / made fp32-safe / fused; ``program`` is left as it is.

    ``fuse_angles``: "tables" (the fused op reads the cos/sin the graph computes) or "inv_freq" (the op
    computes them in float32 from positions and inv_freq where the site allows; in ONNX the angles are
    then computed just before RotaryEmbedding). ``messages``, when given a list, receives one line per
    change (and per site skipped).

    ``original_grid`` / ``target_grid`` ((rows, columns) or "HxW"): a 2-D RoPE (ViTs) run at the target patch
    grid, per axis by ``rope_method`` (linear: timm's ``ref_feat_shape``, rotary-embedding-torch's
    ``interpolate_factor``; ntk; yarn). ``xpos_decay``: what a rescale does to an xPos decay, "angles" (kept on
    the original positions, x-transformers' interpolation) or "scaled" (its positions divided too; linear only).

    Raises `PartialMatchError` (exit 5) when a RoPE is identified but cannot take the request (the reason in
    the message; other sites are rewritten with ``allow_partial``), `NoEncodingError` (exit 4) when none is
    found, `UsageError` (exit 2) for options that do not go together.
    """
    from posrewrite.passes.fx.fuse_rope import ANGLE_MODES

    if fuse_angles not in ANGLE_MODES:
        raise UsageError(f"fuse_angles must be one of {', '.join(ANGLE_MODES)}, not {fuse_angles!r}")
    opts = _options(rope_scale=rope_scale, rope_method=rope_method, original_max_positions=original_max_positions,
                    rope_base=rope_base, rope_params=rope_params, fp32_positions=fp32_positions, fuse=fuse,
                    allow_partial=allow_partial, xpos_decay=xpos_decay, original_grid=original_grid,
                    target_grid=target_grid)
    new, lines, _ = FxPassManager(_steps(opts, config, fuse_angles))(program)
    if messages is not None:
        messages.extend(lines)
    return new


# --------------------------------------------------------------------------------------------------
# Export to ONNX in one call
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TorchExportResult:
    """What `export_onnx` did."""

    path: Path
    program: torch.export.ExportedProgram  # the rewritten program that was exported
    messages: list[str]
    onnx_ops: dict[str, int]  # "domain::op_type" -> count in the saved model
    max_abs_diff: float | None  # onnxruntime vs the rewritten program on the example inputs

    @property
    def fused_ops(self) -> int:
        return sum(v for k, v in self.onnx_ops.items() if k.endswith("::RotaryEmbedding"))


def _find_config(model: Any) -> Any:
    for obj in (model, getattr(model, "model", None)):
        cfg = getattr(obj, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            return cfg
    return None


def _flat_tensors(args: tuple, kwargs: dict | None) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def export_onnx(
    model: torch.nn.Module | torch.export.ExportedProgram,
    args: tuple,
    path: str | os.PathLike,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    opset_version: int | None = None,
    validate: bool = True,
    atol: float = 1e-4,
    external_data: bool = False,
    optimize: bool = True,
    config: Any = None,
    **options: Any,
) -> TorchExportResult:
    """``torch.export`` + `rewrite` + ``torch.onnx.export(dynamo=True)`` + save + onnxruntime check.

    ``options`` are those of `rewrite`. With ``fuse`` set, the custom op becomes
    ``com.microsoft.RotaryEmbedding`` (``fuse=True`` / ``"ort"``) or the opset-23 ``RotaryEmbedding``
    (``fuse="onnx"``, which raises the opset to 23). With ``validate`` the saved model is run in
    onnxruntime (CPU) on ``args`` and compared with the rewritten program (``ValidationError`` past
    ``atol``). ``optimize`` is passed to ``torch.onnx.export`` (its onnxscript graph optimizer).
    """
    from posrewrite.ops.rope_onnx import onnx_opset_for, translation_table

    unknown = set(options) - {"rope_scale", "rope_method", "original_max_positions", "rope_base", "rope_params",
                              "fp32_positions", "fuse", "fuse_angles", "allow_partial", "xpos_decay",
                              "original_grid", "target_grid"}
    if unknown:
        raise UsageError(f"export_onnx got unknown option {sorted(unknown)[0]!r}")
    args = tuple(args)
    if config is None and isinstance(model, torch.nn.Module):
        config = _find_config(model)
    if isinstance(model, torch.export.ExportedProgram):
        ep = model
    else:
        ep = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    messages: list[str] = []
    new = rewrite(ep, config=config, messages=messages, **options)

    mode = _fuse_mode(options.get("fuse"))
    target = "onnx" if mode == "onnx" else "com.microsoft"
    needed = onnx_opset_for(target)
    if needed is not None and opset_version is not None and opset_version < needed:
        raise UsageError(f"fuse='onnx' needs opset_version >= {needed}, got {opset_version}")
    opset = opset_version or needed
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            new, args, kwargs=kwargs, dynamo=True, custom_translation_table=translation_table(target),
            opset_version=opset, input_names=input_names, output_names=output_names, optimize=optimize,
        )
    from types import SimpleNamespace

    from posrewrite import provenance

    # what was done, in the model's metadata as every posrewrite output records it (posrewrite.provenance)
    provenance.record(onnx_program.model, provenance.entry(
        SimpleNamespace(**{k: v for k, v in options.items() if k != "fuse_angles"}), [], context_length=None,
        changes=len(messages)) | {"exported_by": "posrewrite.torch.export_onnx"})
    onnx_program.save(str(out), external_data=external_data)
    ops: dict[str, int] = {}
    for node in onnx_program.model_proto.graph.node:
        key = f"{node.domain or 'ai.onnx'}::{node.op_type}"
        ops[key] = ops.get(key, 0) + 1

    diff = None
    if validate:
        diff = _validate(out, new, args, kwargs, atol)
    return TorchExportResult(out, new, messages, ops, diff)


def _validate(path: Path, program: torch.export.ExportedProgram, args: tuple, kwargs: dict | None,
              atol: float) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds_in = _flat_tensors(args, kwargs)
    inputs = sess.get_inputs()
    if len(inputs) != len(feeds_in):
        raise ValidationError(f"the ONNX model has {len(inputs)} inputs, the example has {len(feeds_in)} tensors")
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(inputs, feeds_in, strict=True)}
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = program.module()(*args, **(kwargs or {}))
    want = [t for t in torch.utils._pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    diff = 0.0
    for a, b in zip(got, want, strict=False):
        diff = max(diff, float(np.max(np.abs(np.asarray(a, np.float64) - b.detach().double().cpu().numpy())))
                   if b.numel() else 0.0)
    if not diff <= atol:
        raise ValidationError(f"onnxruntime output differs from the rewritten torch program by {diff:.3g} "
                              f"(> {atol:g})")
    return diff
