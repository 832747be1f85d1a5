"""The ``posrewrite`` command: argument parsing, dispatch and exit codes — nothing else.

Every command maps its flags to :class:`~posrewrite.options.RewriteOptions` (`options_from_flags`, where every
option value is checked) or plain arguments, calls the Python API (``posrewrite.api``, ``posrewrite.plot``,
``posrewrite.advise``, imported lazily so that ``--help`` and usage errors stay fast), and hands the result to
:mod:`posrewrite.render`: rich tables for people, or exactly one JSON object on stdout with ``--json``. Errors
print one line ``posrewrite: error: ...`` on stderr and exit with the code of their :mod:`posrewrite.errors`
class; ``--debug`` adds the traceback.
"""

from __future__ import annotations

__all__ = ["main", "build_parser", "options_from_args"]

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from posrewrite import render
from posrewrite.errors import EXIT_CODES, PosrewriteError, UsageError
from posrewrite.limits import DEFAULT_CHECK_LENGTH, check_positive
from posrewrite.options import FUSE_MODES, ROPE_METHODS, RewriteOptions, options_from_flags
from posrewrite.provenance import DECODE_MODES
from posrewrite.render import PROG, Output

COMMANDS = ("rewrite", "inspect", "check", "plot", "advise", "validate")

_DESCRIPTION = """\
Find the positional encodings of an exported transformer (ONNX) and rewrite them: rescale RoPE for longer
contexts (linear, ntk, dynamic, yarn, llama3, longrope, or a new base), make positions fp32-safe, extend
absolute/ALiBi tables, fuse RoPE into fused ops, and validate the result in onnxruntime.

  posrewrite MODEL.onnx --rope-scale 4 --rope-method yarn --original-max-positions 4096 -o out.onnx
  posrewrite inspect MODEL.onnx
  posrewrite check MODEL.onnx --max-length 131072
  posrewrite plot MODEL.onnx --rope-scale 4 --rope-method yarn --original-max-positions 4096 -o rope.png
  posrewrite advise --context 131072 --head-dim 128
"""


def _exit_code_epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageError (one line, exit 2) instead of usage text + SystemExit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------------- parser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else there")
    p.add_argument("--debug", action="store_true", help="show the traceback of errors")


def _add_rope_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("RoPE scaling (llama.cpp spellings accepted)")
    g.add_argument("--rope-scale", type=float, metavar="S", help="context scaling factor: expand the context S times")
    g.add_argument(
        "--rope-freq-scale", type=float, metavar="F", help="llama.cpp's inverse spelling: same as --rope-scale 1/F"
    )
    g.add_argument(
        "--rope-method",
        "--rope-scaling",
        dest="rope_method",
        metavar="METHOD",
        help=f"scaling method: {', '.join(ROPE_METHODS)} (default linear; 'none' = no scaling)",
    )
    g.add_argument(
        "--original-max-positions",
        type=int,
        metavar="N",
        help="context length the model was trained with (yarn, llama3, dynamic, longrope need it; "
        "default: config.json beside the model, or the model's cache length)",
    )
    g.add_argument(
        "--yarn-orig-ctx",
        type=int,
        metavar="N",
        help="llama.cpp's name for --original-max-positions (0 = from the model)",
    )
    g.add_argument(
        "--rope-base", "--rope-freq-base", dest="rope_base", type=float, metavar="B", help="new RoPE base (theta)"
    )
    g.add_argument(
        "--rope-params",
        metavar="JSON|FILE",
        help="HF-style rope parameters as JSON text or a JSON file; a whole HF config.json works too",
    )
    g.add_argument("--original-grid", metavar="HxW",
                   help="2-D RoPE (ViTs): the patch grid the model was trained at (timm's ref_feat_shape), e.g. 14x14")
    g.add_argument("--target-grid", metavar="HxW",
                   help="2-D RoPE: the patch grid to run at; each axis is rescaled by target/original with "
                   "--rope-method linear (interpolation, default), ntk or yarn")
    g.add_argument("--yarn-beta-fast", type=float, metavar="X", help="YaRN beta_fast (default 32)")
    g.add_argument("--yarn-beta-slow", type=float, metavar="X", help="YaRN beta_slow (default 1)")
    g.add_argument(
        "--xpos-decay", choices=("angles", "scaled"), default="angles",
        help="xPos models: rescale the angles only (x-transformers' interpolation, default) or divide the "
             "decay's positions too (rotary-embedding-torch's interpolate_factor)")
    g.add_argument(
        "--yarn-attn-factor",
        type=float,
        metavar="X",
        help="llama.cpp's YaRN attention factor: multiplies the default magnitude scale 0.1*ln(S)+1",
    )


def _output_path(text: str) -> Path:
    if not text.strip() or "\0" in text or Path(text).name in ("", ".", ".."):
        raise argparse.ArgumentTypeError(f"not a file name: {text!r}")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_exit_code_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "rewrite",
        help="rewrite a model (the default: 'posrewrite MODEL ...' means 'posrewrite rewrite MODEL ...')",
        description="Rewrite the positional encodings of MODEL and write a new model beside it (or to -o).",
        epilog=_exit_code_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="the ONNX model (external data is read from beside it), or a "
                   "model folder (onnxruntime-genai's genai_config.json, or config.json + *.onnx): -o is a new folder")
    _add_rope_flags(p)
    g = p.add_argument_group("other rewrites")
    g.add_argument(
        "--fp32-positions", action="store_true", help="compute positions and angles in fp32 (no fp16 rounding)"
    )
    g.add_argument(
        "--fuse", default="none", metavar="MODE", help=(
            f"fuse RoPE (and the attention around it) into fused ops: {', '.join(FUSE_MODES)}. ort: "
            "com.microsoft.RotaryEmbedding/GroupQueryAttention/MultiHeadAttention (onnxruntime only); onnx: "
            "RotaryEmbedding-23 + Attention-23 (raises the opset to 23). Default none: a rescaled model keeps "
            "standard ops and runs on every runtime and opset it ran on before"
        ),
    )
    g.add_argument(
        "--max-positions", type=int, metavar="N",
        help="extend absolute / sinusoidal / ALiBi tables to N positions; rows of fused RoPE caches "
        "(default: config.json's max_position_embeddings, else 4096)"
    )
    g.add_argument("--pos-scale", type=float, metavar="S", help="interpolate learned absolute positions by S")
    g.add_argument("--alibi-scale", type=float, metavar="S", help="scale ALiBi slopes by S")
    g.add_argument("--bias-scale", type=float, metavar="S", help="distance interpolation of every score bias "
                   "with a formula (ALiBi, KERPLE, Sandwich): distances / S (--alibi-scale is its ALiBi spelling)")
    g = p.add_argument_group("attention-level extension (the model is unchanged inside the window)")
    g.add_argument("--extend", metavar="METHOD", help="self-extend (Jin et al. 2024: grouped positions beyond the "
                   "window), rerope (Su 2023: relative positions clipped at the window) or dual-chunk (An et al. "
                   "2024: intra-, successive- and inter-chunk positions)")
    g.add_argument("--window", type=int, metavar="W", help="neighbour window in tokens (--extend)")
    g.add_argument("--group-size", type=int, metavar="G", help="self-extend group size")
    g.add_argument("--leaky", type=float, metavar="K", help="leaky ReRoPE: relative positions grow at slope 1/K "
                   "beyond the window")
    g.add_argument("--chunk-size", type=int, metavar="C", help="dual-chunk: chunk_size (every relative position "
                   "is at most C; chunks hold C - W tokens)")
    g.add_argument("--local-size", type=int, metavar="W", help="dual-chunk: local_size (tokens at the start of a "
                   "chunk that see the chunk before at their true distance)")
    g.add_argument("--runtime-decode", choices=DECODE_MODES, help="dynamic / longrope on KV-cache exports: exact "
                   "(recommended: the hf graph, and metadata telling the generation loop to re-prefill when the "
                   "frequencies change, so every step equals the whole sequence at once; posrewrite.decode does "
                   "it: longrope once at L + 1, dynamic at every step past L), hf (default: HF's cached behaviour, "
                   "past keys keep the frequencies of their own step) or rerotate (the cache holds keys before "
                   "rotation and every step rotates all of them with the current frequencies; "
                   "see docs/long-context.md)")
    g.add_argument("--logn-scaling", action="store_true", help="scale queries at position n > L by log(n)/log(L) "
                   "(Qwen-1 use_logn_attn); L from --original-max-positions or config.json")
    g = p.add_argument_group("output")
    g.add_argument(
        "-o", "--output", type=_output_path, metavar="OUT",
        help="output model (default: MODEL.<what>.onnx beside MODEL; its folder must exist)",
    )
    g.add_argument(
        "--link-weights", action="store_true",
        help="folders: hard-link the external weights into OUT (onnxruntime reads them; onnx/onnx_ir refuse "
        "hard-linked data) instead of a copy-on-write clone or copy",
    )
    g.add_argument(
        "--share-weights", action="store_true",
        help="one model: the output reads the weights no pass changed from the input's data file (OUT must be in "
        "its folder; keep the input) instead of a copy (sparse files stay sparse)",
    )
    g.add_argument("--no-validate", dest="validate", action="store_false", help="skip the onnxruntime validation")
    _add_validate_scope(g)
    g.add_argument(
        "--allow-partial", action="store_true", help="rewrite the understood sites even if others were not understood"
    )
    _add_common(p)
    p.set_defaults(handler=_cmd_rewrite)

    p = sub.add_parser(
        "validate",
        help="check a rewrite made earlier or by another tool (exit 0 holds, 6 does not)",
        description="Check that REWRITTEN is what the flags make of ORIGINAL: without RoPE flags, that it computes "
        "the same outputs (fusion, fp32 positions on a safe model); with them, that its q/k rotations are that "
        "rescale of ORIGINAL's (numpy rotation of the rewritten model's own q/k) and the model runs at the new "
        "length.",
        epilog=_exit_code_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("original", metavar="ORIGINAL", help="the model before the rewrite")
    p.add_argument("rewritten", metavar="REWRITTEN", help="the rewritten model")
    _add_rope_flags(p)
    g = p.add_argument_group("other rewrites")
    g.add_argument("--fp32-positions", action="store_true",
                   help="the rewrite made half-precision positions fp32 (outputs of such models are not compared)")
    g.add_argument("--max-positions", type=int, metavar="N", help="the rewrite extended tables to N positions")
    _add_validate_scope(g)
    _add_common(p)
    p.set_defaults(handler=_cmd_validate)

    p = sub.add_parser(
        "inspect",
        help="list the positional encodings found in a model",
        description="List the positional-encoding sites of MODEL and the sites that were not understood.",
    )
    p.add_argument("model", metavar="MODEL")
    _add_common(p)
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser(
        "check",
        help="check that positions and angles are precise enough",
        description="Check each site's position and angle precision up to --max-length (exit 7 when unsafe).",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--max-length", type=int, metavar="N",
                   help=f"longest sequence to check (default: {DEFAULT_CHECK_LENGTH})")
    _add_common(p)
    p.set_defaults(handler=_cmd_check)

    p = sub.add_parser(
        "plot",
        help="plot RoPE frequencies before and after scaling",
        description="Plot the RoPE frequencies of MODEL, and the scaled ones when scaling flags are given.",
    )
    p.add_argument("model", metavar="MODEL")
    _add_rope_flags(p)
    p.add_argument("-o", "--output", type=_output_path, metavar="OUT.png", required=True, help="the picture to write")
    _add_common(p)
    p.set_defaults(handler=_cmd_plot)

    p = sub.add_parser(
        "advise",
        help="which RoPE base a context needs, and whether a model (or a planned rescaling) has it",
        description="The smallest RoPE base that supports --context (Men et al. 2024) for --head-dim (default "
        "128) or MODEL's rotary dimension, and whether MODEL, rescaled as the RoPE flags say, meets it.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?")
    p.add_argument("--context", type=int, metavar="N", required=True, help="target context length")
    p.add_argument("--head-dim", type=int, metavar="D", help="attention head dimension (default: from MODEL)")
    p.add_argument("--eval-text", type=Path, metavar="FILE", help="measure every method (frequency and attention "
                   "level) on this text at --context tokens in onnxruntime and rank them (needs MODEL)")
    _add_rope_flags(p)
    _add_common(p)
    p.set_defaults(handler=_cmd_advise)
    return parser


def _version() -> str:
    from posrewrite import __version__

    return __version__


def _with_default_command(argv: list[str]) -> list[str]:
    """``posrewrite MODEL ...`` (or flags first) means ``posrewrite rewrite MODEL ...``."""
    if not argv or argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    first = argv[0]
    if not first.startswith("-") and not Path(first).exists() and Path(first).suffix == "":
        import difflib

        close = difflib.get_close_matches(first, COMMANDS, n=1, cutoff=0.6)
        if close:  # a mistyped command, not a model path
            raise UsageError(f"unknown command '{first}' (did you mean '{close[0]}'? see '{PROG} --help')")
    return ["rewrite", *argv]


# -------------------------------------------------------------------------------------------------- options


def options_from_args(ns: argparse.Namespace, *, require_work: bool = True) -> RewriteOptions:
    """Parsed flags as RewriteOptions (see `posrewrite.options.options_from_flags`, which checks them)."""
    return options_from_flags(vars(ns), require_work=require_work)


def _rope_flags_given(ns: argparse.Namespace, ignore: tuple[str, ...] = ()) -> bool:
    names = (
        "rope_scale",
        "rope_freq_scale",
        "rope_method",
        "original_max_positions",
        "yarn_orig_ctx",
        "rope_base",
        "rope_params",
        "yarn_beta_fast",
        "yarn_beta_slow",
        "yarn_attn_factor",
        "original_grid",
        "target_grid",
    )
    return any(getattr(ns, n, None) is not None for n in names if n not in ignore)


# ------------------------------------------------------------------------------------------------- commands


def _preload(path: str | os.PathLike, *, output: str | os.PathLike | None = None):
    """Read the model once up front so a bad file fails fast with exit 3, and refuse an ``output`` that would
    overwrite the model or its external data. Returns the model: the command hands it to the API (``loaded=``)
    where the API would read the file again."""
    from posrewrite import io

    if output is not None:
        io.ensure_distinct_output(path, output)
        io.check_output_path(output)  # before a possibly long load: a missing folder or a device fails at once
    model = io.load_model(path)
    if output is not None:
        io.ensure_distinct_output(path, output, data_files=io.external_data_files(model))
    return model


def _cmd_rewrite(ns: argparse.Namespace, out: Output) -> int:
    opts = options_from_args(ns)
    model = Path(ns.model)
    loaded = None if model.is_dir() else _preload(model, output=opts.output)

    from posrewrite import api
    from posrewrite.progress import progress_reporter

    if not ns.debug:
        _quiet_onnxruntime()
    target = Path(opts.output) if opts.output is not None else None
    replacing = target is not None and target.is_file()
    with progress_reporter(enabled=not out.json) as reporter:
        result = api.rewrite(model, opts, progress=reporter, loaded=loaded)
    try:  # the output is in place: an interrupt from here on must not claim that nothing was left behind
        return _show_written(out, model, result, replacing)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted after {result.output_path} was written: the output is complete",
              file=sys.stderr)
        return 0


def _show_written(out: Output, model: Path, result: object, replacing: bool) -> int:
    render.show_rewrite(out, model, result)
    if replacing and not out.json:
        out.console().print(f"  note: {render.escape(str(result.output_path))} existed and was replaced")
    validation = getattr(result, "validation", None)
    if validation is not None and not validation.ok:
        from posrewrite.errors import ValidationError

        bad = [r.site for r in validation.rows if not r.ok]
        render.print_error(f"validation failed for {len(bad)} site(s): {', '.join(map(str, bad))}")
        return ValidationError.exit_code
    return 0


def _add_validate_scope(g) -> None:
    g.add_argument(
        "--validate", dest="validate_scope", choices=("bounded", "full"), default="bounded",
        help="bounded (default): rotations on their own subgraphs, outputs compared on a cut of both models (the "
        "first layer), memory independent of the model's size; full: also the whole models, up to 4096 tokens "
        "(docs/validation.md)",
    )


def _cmd_validate(ns: argparse.Namespace, out: Output) -> int:
    opts = options_from_args(ns, require_work=False)
    ns.original, ns.rewritten = _model_file(ns.original), _model_file(ns.rewritten)
    _preload(ns.original)
    _preload(ns.rewritten)
    from posrewrite import api

    hint = ""
    if not (_rope_flags_given(ns) or ns.fp32_positions or ns.max_positions):
        recorded = _recorded_rewrite(ns.rewritten, opts, out)
        if recorded is opts:
            hint = (f" ({ns.rewritten} records no posrewrite rewrite, so it was checked as computing the same as "
                    f"{ns.original}: for a rescale, give the flags it was made with, e.g. --rope-scale S "
                    "--rope-method M --original-max-positions L)")
        opts = recorded

    if not ns.debug:
        _quiet_onnxruntime()
    result = api.validate(Path(ns.original), Path(ns.rewritten), opts)
    render.show_validation(out, result)
    if not result.validation.ok:
        from posrewrite.errors import ValidationError
        from posrewrite.validate import describe_failure

        render.print_error(f"validation failed: {describe_failure(result.validation)}{hint}")
        return ValidationError.exit_code
    return 0


def _model_file(path: str) -> str:
    """A model folder (genai_config.json, or config.json + *.onnx) stands for its model, as in inspect."""
    if not Path(path).is_dir():
        return path
    from posrewrite.folders import model_files

    return str(model_files(path)[0])


def _recorded_rewrite(path: str, opts: RewriteOptions, out: Output) -> RewriteOptions:
    """The options REWRITTEN records (posrewrite.provenance), so that `validate ORIGINAL REWRITTEN` checks the
    recorded rewrite by default; `opts` unchanged when it records none."""
    import dataclasses

    from posrewrite import io, provenance

    items = provenance.history(io.load_model(path))
    fields = provenance.validation_options(items)
    if not fields:
        return opts
    try:
        recorded = dataclasses.replace(opts, **fields)
    except (PosrewriteError, ValueError, TypeError, OverflowError) as exc:
        from posrewrite.errors import ModelLoadError

        raise ModelLoadError(f"{path}: the rewrite it records ({provenance.KEY}) is not valid: {exc}; give the "
                             "flags it was made with") from None
    if not out.json:
        out.console().print(f"checking the rewrite {render.escape(str(path))} records: "
                            f"{render.escape(provenance.describe(items[-1]))}")
    return recorded


def _cmd_inspect(ns: argparse.Namespace, out: Output) -> int:
    loaded = None if Path(ns.model).is_dir() else _preload(ns.model)  # a folder: api.inspect reads its model
    from posrewrite import api

    result = api.inspect(Path(ns.model), loaded=loaded)
    render.show_inspect(out, ns.model, result.to_dict())
    if not result.sites:
        from posrewrite.errors import NoEncodingError, PartialMatchError

        identified = [r for r in result.refusals if not r.kind.endswith("?")]
        if identified:  # found (the reason says what), but nothing a rewrite can take
            render.print_error(f"{identified[0].kind} found in {ns.model} but not rewritable: {identified[0].reason}")
            return PartialMatchError.exit_code
        render.print_error(f"no positional encoding found in {ns.model}")
        return NoEncodingError.exit_code
    return 0


def _cmd_check(ns: argparse.Namespace, out: Output) -> int:
    check_positive(ns.max_length, "--max-length", integer=True)
    loaded = None if Path(ns.model).is_dir() else _preload(ns.model)  # a folder: api.check reads its model
    from posrewrite import api

    result = api.check(Path(ns.model), max_length=ns.max_length, loaded=loaded)
    render.show_check(out, ns.model, result)
    if not result.safe:
        from posrewrite.errors import UnsafeModelError

        unsafe = [str(site.get("site", k)) for k, site in enumerate(result.sites) if not site.get("safe")]
        length = getattr(result, "max_length", None) or ns.max_length or "the checked"
        render.print_error(f"unsafe at {length} tokens: site(s) {', '.join(unsafe)} lose position or angle "
                           "precision (try --fp32-positions)")
        return UnsafeModelError.exit_code
    return 0


def _cmd_plot(ns: argparse.Namespace, out: Output) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("posrewrite plot needs matplotlib: pip install 'posrewrite[plot]'") from None
    opts = options_from_args(ns, require_work=False) if _rope_flags_given(ns) else None
    _preload(ns.model, output=ns.output)
    from posrewrite import plot

    result = plot.plot(Path(ns.model), ns.output, opts)
    render.show_lines(out, result)
    return 0


def _cmd_advise(ns: argparse.Namespace, out: Output) -> int:
    check_positive(ns.context, "--context", integer=True)
    check_positive(ns.head_dim, "--head-dim", integer=True)
    if getattr(ns, "eval_text", None) is not None:
        return _cmd_advise_eval(ns, out)
    rope_params = None
    config = _ConfigOnce(ns.model)
    # --original-max-positions alone says what the model was trained for, not a planned rescale
    if _rope_flags_given(ns, ignore=("original_max_positions", "yarn_orig_ctx")):
        if ns.model is None:
            raise UsageError("a planned rescaling (--rope-scale, --rope-method, ...) needs a MODEL to apply it to")
        from posrewrite.plan import requested_rope_parameters

        opts = options_from_args(ns, require_work=False)
        rope_params = requested_rope_parameters(opts, config())
    path = Path(ns.model) if ns.model is not None else None
    if path is not None:
        _preload(path)
    from posrewrite import advise

    result = advise.advise_model(ns.context, head_dim=ns.head_dim, path=path, rope_params=rope_params)
    from posrewrite.advise_eval import rule_of_thumb

    rule = rule_of_thumb(_training_length(ns, config), ns.context, model=ns.model)
    result.lines.extend(rule)
    render.show_lines(out, result, extra={"method": {"measured": False, "rule_of_thumb": rule}})
    return 0


class _ConfigOnce:
    """config.json beside MODEL, read on first use and at most once (None: no MODEL, or no config.json)."""

    def __init__(self, model: str | None) -> None:
        self.model = model
        self.read: list[dict | None] = []

    def __call__(self) -> dict | None:
        if not self.read:
            from posrewrite.config import read_config_json

            self.read.append(read_config_json(self.model) if self.model is not None else None)
        return self.read[0]


def _training_length(ns: argparse.Namespace, config: _ConfigOnce | None = None) -> int | None:
    """--original-max-positions (or --yarn-orig-ctx), else config.json beside MODEL."""
    orig = ns.original_max_positions or ns.yarn_orig_ctx
    if orig:
        return int(orig)
    if ns.model is not None:
        config = (config or _ConfigOnce(ns.model))() or {}
        rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
        for value in (rp.get("original_max_position_embeddings") if isinstance(rp, dict) else None,
                      config.get("original_max_position_embeddings"), config.get("max_position_embeddings")):
            if value:
                return int(value)
    return None


def _cmd_advise_eval(ns: argparse.Namespace, out: Output) -> int:
    if ns.model is None:
        raise UsageError("--eval-text needs a MODEL to rewrite and measure")
    for flag in ("rope_scale", "rope_freq_scale", "rope_method", "rope_base", "rope_params"):
        if getattr(ns, flag, None) is not None:
            raise UsageError(f"--eval-text measures every method itself: leave out --{flag.replace('_', '-')}")
    original = _training_length(ns)
    if original is None:
        raise UsageError("--eval-text needs the training length: pass --original-max-positions L (or keep "
                         "config.json beside MODEL)")
    path = Path(ns.model)
    _preload(path)
    from posrewrite.advise_eval import evaluate_candidates
    from posrewrite.progress import progress_reporter

    with progress_reporter(enabled=not out.json) as reporter:
        result = evaluate_candidates(path, ns.context, ns.eval_text, original, progress=reporter)
    render.show_lines(out, result)
    return 0


# ------------------------------------------------------------------------------------------------------ main


def _quiet_onnxruntime() -> None:
    """onnxruntime's own log (coloured warnings, and the errors of the runs validation expects to fail) stays off
    stderr."""
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(4)  # fatal only: a failed run is reported by posrewrite, in one line
    except Exception:  # noqa: BLE001 - no onnxruntime: nothing to quiet
        pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and ``except BaseException`` removes what it wrote."""


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise _Terminated()


@contextlib.contextmanager
def _library_output_captured(debug: bool):
    """Warnings (numpy RuntimeWarnings, onnx_ir, onnxscript) and library log records are kept off stderr unless
    --debug: an error is one line, a success prints only its result."""
    if debug:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (see :mod:`posrewrite.errors`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = Output(sys.stdout, json_mode="--json" in args)
    debug = "--debug" in args
    if not args:
        build_parser().print_usage(sys.stderr)
        print(f"{PROG}: error: give a MODEL to rewrite or a command (see '{PROG} --help')", file=sys.stderr)
        return UsageError.exit_code
    # In --json mode nothing but the one JSON object may reach stdout: stray prints go to stderr.
    guard = contextlib.redirect_stdout(sys.stderr) if out.json else contextlib.nullcontext()
    try:
        with guard, _sigterm_as_interrupt(), _library_output_captured(debug):
            ns = build_parser().parse_args(_with_default_command(args))
            if getattr(ns, "handler", None) is None:
                raise UsageError(f"give a MODEL to rewrite or a command (see '{PROG} --help')")
            return ns.handler(ns, out)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except PosrewriteError as e:
        if debug:
            traceback.print_exc()
        render.report_error(out, e.exit_code, type(e).__name__, str(e))
        return e.exit_code
    except KeyboardInterrupt as e:
        if isinstance(e, _Terminated):
            print(f"{PROG}: error: terminated (nothing was left behind)", file=sys.stderr)
            return 143
        print(f"{PROG}: error: interrupted (nothing was left behind)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 1
    except Exception as e:  # a bug: one line, or the traceback with --debug
        if debug:
            traceback.print_exc()
        message = " ".join(f"internal error: {type(e).__name__}: {e}".split())
        if not debug:
            message += " (rerun with --debug for the traceback)"
        render.report_error(out, 1, "InternalError", message)
        return 1
