"""What the user asked for, as one checked object: :class:`RewriteOptions`.

The CLI and the Python API build the same object; contradictions are refused here, each with one line
(:class:`~posrewrite.errors.UsageError`), before any model is read. What the request means for a model (the
HF-style ``rope_parameters``, per-site plans, budgets, implied --fp32-positions) is worked out once, in
`posrewrite.plan`; the JSON files a request names are read by `posrewrite.config`. How a command shows its result
(``--json``, ``--debug``) is the CLI's, not part of the request.
"""

from __future__ import annotations

__all__ = [
    "FUSE_MODES",
    "NOTHING_TO_DO",
    "ROPE_METHODS",
    "RewriteOptions",
    "options_from_flags",
    "parse_grid",
]

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from posrewrite.config import NO_SCALING_TYPES, load_rope_params
from posrewrite.errors import UsageError
from posrewrite.limits import MAX_LENGTH, MAX_ROPE_BASE, MAX_SCALE, check_positive, shown
from posrewrite.provenance import DECODE_MODES

#: Scaling methods, named as HF's ``rope_type`` where HF has one ("ntk" is static NTK-aware base scaling).
ROPE_METHODS = ("linear", "ntk", "dynamic", "yarn", "llama3", "longrope")
#: ``--fuse`` values: leave the graph as is, fuse into com.microsoft RotaryEmbedding (onnxruntime), or into the
#: standard ONNX RotaryEmbedding (opset 23).
FUSE_MODES = ("none", "ort", "onnx")

# Accepted spellings of HF rope types / llama.cpp scaling names.
_METHOD_ALIASES = {"ntk-aware": "ntk", "ntk_aware": "ntk", "dynamic-ntk": "dynamic", "su": "longrope"}


def _normalize_method(name: str, flag: str = "--rope-method") -> str:
    method = _METHOD_ALIASES.get(name.strip().lower(), name.strip().lower())
    if method not in ROPE_METHODS:
        raise UsageError(f"{flag} must be one of {', '.join(ROPE_METHODS)}, not {name!r}")
    return method


@dataclasses.dataclass
class RewriteOptions:
    """Everything a rewrite may change. ``None`` means "leave as it is" (or "take it from the model")."""

    rope_scale: float | None = None
    rope_method: str = "linear"
    original_max_positions: int | None = None
    rope_base: float | None = None
    rope_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    fp32_positions: bool = False
    xpos_decay: str = "angles"  # xPos rescale: "angles" (decay kept) | "scaled" (decay's positions divided too)
    fuse: str = "none"
    validate: bool = True
    validate_scope: str = "bounded"  # "bounded": model-level checks on a cut; "full": the whole models
    allow_partial: bool = False
    max_positions: int | None = None
    pos_scale: float | None = None
    alibi_scale: float | None = None
    bias_scale: float | None = None  # distance interpolation of every distance-based score bias (ALiBi too)
    # attention-level methods (posrewrite.math.positions, posrewrite.passes.onnx.attention.extend)
    extend: str | None = None  # "self-extend" | "rerope" | "dual-chunk"
    window: int | None = None
    group_size: int | None = None
    leaky: float | None = None
    chunk_size: int | None = None  # dual-chunk (Qwen2.5-1M dual_chunk_attention_config names)
    local_size: int | None = None
    logn_scaling: bool = False
    # run-time RoPE methods on KV-cache exports: "hf" (HF's cached behaviour, the default), "exact" (the same
    # graph; its metadata tells the generation loop when to re-prefill so that every step equals the whole
    # sequence at once: posrewrite.decode) or "rerotate" (the cache holds keys before rotation, every step rotates
    # all of them with the current frequencies)
    runtime_decode: str | None = None
    # 2-D RoPE (ViTs): the patch grid the model was trained at (timm's ref_feat_shape) and the one to run at
    original_grid: tuple[int, int] | None = None
    target_grid: tuple[int, int] | None = None
    output: Path | None = None
    link_weights: bool = False  # folder rewrites: hard-link external weights instead of clone/copy
    share_weights: bool = False  # one model: untouched weights read from the input's data file (same folder)

    def __post_init__(self) -> None:
        if self.output is not None:
            self.output = Path(self.output)
        self.rope_params = dict(self.rope_params or {})
        self.rope_method = _normalize_method(self.rope_method or "linear")
        if self.xpos_decay not in ("angles", "scaled"):
            raise UsageError(f"--xpos-decay must be 'angles' or 'scaled', not {self.xpos_decay!r}")
        if self.fuse not in FUSE_MODES:
            raise UsageError(f"--fuse must be one of {', '.join(FUSE_MODES)}, not {self.fuse!r}")
        check_positive(self.rope_scale, "--rope-scale", maximum=MAX_SCALE, minimum=1 / MAX_SCALE)
        check_positive(self.rope_base, "--rope-base", maximum=MAX_ROPE_BASE)
        check_positive(self.original_max_positions, "--original-max-positions", integer=True, maximum=MAX_LENGTH)
        check_positive(self.max_positions, "--max-positions", integer=True, maximum=MAX_LENGTH)
        check_positive(self.pos_scale, "--pos-scale", maximum=MAX_SCALE, minimum=1 / MAX_SCALE)
        check_positive(self.alibi_scale, "--alibi-scale", maximum=MAX_SCALE, minimum=1 / MAX_SCALE)
        check_positive(self.bias_scale, "--bias-scale", maximum=MAX_SCALE, minimum=1 / MAX_SCALE)
        if self.alibi_scale is not None and self.bias_scale is not None \
                and not math.isclose(self.alibi_scale, self.bias_scale, rel_tol=1e-9):
            raise UsageError(f"--alibi-scale {self.alibi_scale:g} disagrees with --bias-scale {self.bias_scale:g}")
        self._check_attention_methods()
        if self.runtime_decode is not None:
            self.runtime_decode = str(self.runtime_decode).strip().lower()
            if self.runtime_decode not in DECODE_MODES:
                raise UsageError(f"--runtime-decode must be one of {', '.join(DECODE_MODES)}, not "
                                 f"{self.runtime_decode!r}")
        self.original_grid = parse_grid(self.original_grid, "--original-grid")
        self.target_grid = parse_grid(self.target_grid, "--target-grid")
        if (self.original_grid is None) != (self.target_grid is None):
            raise UsageError("--original-grid and --target-grid go together (e.g. --original-grid 14x14 "
                             "--target-grid 28x28)")

        params = self.rope_params
        factor = params.get("factor")
        if factor is not None:
            check_positive(factor, "--rope-params factor", maximum=MAX_SCALE, minimum=1 / MAX_SCALE)
            if self.rope_scale is not None and not math.isclose(float(factor), self.rope_scale, rel_tol=1e-9):
                raise UsageError(f"--rope-params factor {factor} disagrees with --rope-scale {self.rope_scale:g}")
        ptype = params.get("rope_type")
        if ptype is not None and str(ptype).lower() not in NO_SCALING_TYPES:
            ptype = _normalize_method(str(ptype), "--rope-params rope_type")
            if self.rope_method != "linear" and ptype != self.rope_method:
                raise UsageError(f"--rope-params rope_type {ptype!r} disagrees with --rope-method {self.rope_method!r}")
            self.rope_method = ptype
        orig = params.get("original_max_position_embeddings")
        if orig is not None:
            check_positive(orig, "--rope-params original_max_position_embeddings", integer=True, maximum=MAX_LENGTH)
            if self.original_max_positions is not None and int(orig) != self.original_max_positions:
                raise UsageError(
                    f"--rope-params original_max_position_embeddings {orig} disagrees with "
                    f"--original-max-positions {self.original_max_positions}"
                )
        theta = params.get("rope_theta")
        if theta is not None:
            check_positive(theta, "--rope-params rope_theta", maximum=MAX_ROPE_BASE)
            if self.rope_base is not None and not math.isclose(float(theta), self.rope_base, rel_tol=1e-9):
                raise UsageError(f"--rope-params rope_theta {theta} disagrees with --rope-base {self.rope_base:g}")
        if self.runtime_decode is not None and self.rope_method not in ("dynamic", "longrope"):
            raise UsageError("--runtime-decode applies to the run-time methods (--rope-method dynamic or longrope)")
        if self.runtime_decode == "rerotate" and self.fuse != "none":
            raise UsageError("--runtime-decode rerotate cannot be combined with --fuse: fused attention ops read a "
                             "rotated cache (use --runtime-decode hf)")
        scale = self.effective_rope_scale
        if scale is not None and scale < 1 and self.rope_method not in ("linear",):
            raise UsageError(f"--rope-scale {scale:g} is below 1, which only --rope-method linear accepts")
        if (self.rope_method_requires_scale and scale is None and "long_factor" not in params
                and self.target_grid is None):
            raise UsageError(f"--rope-method {self.rope_method} needs --rope-scale (or a factor in --rope-params)")

    def _dual_chunk_from_params(self) -> bool:
        """``--rope-params`` (or a config.json) with Qwen2.5-1M's ``dual_chunk_attention_config``: its
        ``chunk_size`` and ``local_size`` (flags given as well must agree), and --extend dual-chunk. True when the
        parameters held one."""
        dca = self.rope_params.pop("dual_chunk_attention_config", None)
        if dca is None:
            return False
        if not isinstance(dca, dict) or "chunk_size" not in dca or "local_size" not in dca:
            raise UsageError("--rope-params dual_chunk_attention_config needs chunk_size and local_size")
        for name in ("chunk_size", "local_size"):
            value = dca[name]
            check_positive(value, f"--rope-params dual_chunk_attention_config {name}", integer=True,
                           maximum=MAX_LENGTH)
            given = getattr(self, name)
            if given is not None and int(given) != int(value):
                raise UsageError(f"--{name.replace('_', '-')} {given} disagrees with {name}={value} in "
                                 "--rope-params dual_chunk_attention_config")
            setattr(self, name, int(value))
        if self.extend is None:
            self.extend = "dual-chunk"
        return True

    def _check_attention_methods(self) -> None:

        from_params = self._dual_chunk_from_params()
        for flag, value in (("--window", self.window), ("--group-size", self.group_size),
                            ("--chunk-size", self.chunk_size), ("--local-size", self.local_size)):
            check_positive(value, flag, integer=True, maximum=MAX_LENGTH)
        if self.extend is not None:
            self.extend = str(self.extend).strip().lower().replace("_", "-")
            if self.extend == "selfextend":
                self.extend = "self-extend"
            if self.extend in ("dca", "dualchunk"):
                self.extend = "dual-chunk"
            if self.extend not in ("self-extend", "rerope", "dual-chunk"):
                raise UsageError(f"--extend must be self-extend, rerope or dual-chunk, not {self.extend!r}")
            if self.extend == "dual-chunk":
                if self.chunk_size is None or self.local_size is None:
                    raise UsageError("--extend dual-chunk needs --chunk-size C and --local-size W (or --rope-params "
                                     "with a dual_chunk_attention_config)")
                for flag, value in (("--window", self.window), ("--group-size", self.group_size),
                                    ("--leaky", self.leaky)):
                    if value is not None:
                        raise UsageError(f"{flag} belongs to --extend self-extend / rerope, not dual-chunk "
                                         "(--chunk-size, --local-size)")
            else:
                if from_params:
                    raise UsageError(f"--rope-params dual_chunk_attention_config asks for --extend dual-chunk, not "
                                     f"--extend {self.extend}")
                for flag, value in (("--chunk-size", self.chunk_size), ("--local-size", self.local_size)):
                    if value is not None:
                        raise UsageError(f"{flag} belongs to --extend dual-chunk")
            if self.extend != "dual-chunk" and self.window is None:
                raise UsageError(f"--extend {self.extend} needs --window W (the neighbour window in tokens)")
            if self.extend == "self-extend" and self.group_size is None:
                raise UsageError("--extend self-extend needs --group-size G (and --window W)")
            if self.rescales_rope:
                raise UsageError(f"--extend {self.extend} contradicts rescaling RoPE (--rope-scale/--rope-base/"
                                 "--rope-params): both map far positions into the trained range; use one of them")
            if self.fuse != "none" and self.leaky is not None:
                raise UsageError(f"--extend rerope --leaky cannot be combined with --fuse {self.fuse}: Leaky ReRoPE's "
                                 "fractional positions cannot index the cos/sin caches of fused RotaryEmbedding nodes")
            try:
                self.attention_extension  # noqa: B018 - built to check the parameters
            except ValueError as exc:
                raise UsageError(f"--extend {self.extend}: {exc}") from None
        else:
            for flag, value in (("--window", self.window), ("--group-size", self.group_size), ("--leaky", self.leaky),
                                ("--chunk-size", self.chunk_size), ("--local-size", self.local_size)):
                if value is not None:
                    raise UsageError(f"{flag} belongs to --extend self-extend / rerope / dual-chunk")
        if self.logn_scaling and self.fuse != "none" and self.rescales_rope and \
                self.rope_method in ("dynamic", "longrope"):
            raise UsageError(f"--logn-scaling with --rope-method {self.rope_method} cannot be combined with --fuse: "
                             "the fused caches of a run-time method are computed per call, and the fused rotations "
                             "are not found again to scale their queries (drop --fuse)")

    @property
    def attention_extension(self):
        """The posrewrite.math.positions.AttentionExtension these options ask for, or None."""
        if self.extend is None:
            return None
        from posrewrite.math.positions import AttentionExtension

        if self.extend == "dual-chunk":
            return AttentionExtension("dual-chunk", int(self.local_size), chunk_size=int(self.chunk_size))
        return AttentionExtension(self.extend, int(self.window), self.group_size, self.leaky)

    # -- derived -------------------------------------------------------------------------------------------------

    @property
    def effective_rope_scale(self) -> float | None:
        """``--rope-scale``, or the ``factor`` of ``--rope-params``."""
        if self.rope_scale is not None:
            return float(self.rope_scale)
        factor = self.rope_params.get("factor")
        return float(factor) if factor is not None else None

    @property
    def rope_method_requires_scale(self) -> bool:
        return self.rope_method != "linear"

    @property
    def rescales_rope(self) -> bool:
        """Whether the RoPE frequencies change (a scale, a new base, or a parameter set)."""
        return (
            self.effective_rope_scale is not None
            or self.rope_base is not None
            or "long_factor" in self.rope_params
            or "short_factor" in self.rope_params
        )

    def has_work(self) -> bool:
        """Whether these options ask for any change at all."""
        return (
            self.rescales_rope
            or self.fp32_positions
            or self.fuse != "none"
            or self.max_positions is not None
            or self.pos_scale is not None
            or self.alibi_scale is not None
            or self.bias_scale is not None
            or self.extend is not None
            or self.logn_scaling
            or self.target_grid is not None
        )

    def output_suffix(self) -> str:
        """A short name for what was done, for default output names (``model.yarn4.onnx``)."""
        parts = []
        scale = self.effective_rope_scale
        if scale is not None:
            parts.append(f"{self.rope_method}{scale:g}")
        if self.rope_base is not None:
            parts.append(f"base{self.rope_base:g}")
        if self.max_positions is not None:
            parts.append(f"pos{self.max_positions}")
        if self.extend == "dual-chunk":
            parts.append(f"dualchunk{self.chunk_size}l{self.local_size}")
        elif self.extend is not None:
            group = f"g{self.group_size}" if self.group_size else ""
            parts.append(f"{self.extend.replace('-', '')}{self.window}{group}")
        if self.logn_scaling:
            parts.append("logn")
        if self.target_grid is not None:
            parts.append(f"grid{self.target_grid[0]}x{self.target_grid[1]}")
        if self.pos_scale is not None:
            parts.append(f"posx{self.pos_scale:g}")
        if self.alibi_scale is not None:
            parts.append(f"alibi{self.alibi_scale:g}")
        if self.bias_scale is not None and self.alibi_scale is None:
            parts.append(f"biasx{self.bias_scale:g}")
        if self.fp32_positions:
            parts.append("fp32pos")
        if self.fuse != "none":
            parts.append(f"fused-{self.fuse}")
        return "-".join(parts).replace("+", "") or "rewritten"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output"] = str(self.output) if self.output is not None else None
        return d


#: RewriteOptions fields a command's flags may set as they are (the RoPE flags are mapped by `options_from_flags`).
_PLAIN_FIELDS = (
    "original_grid",
    "target_grid",
    "fp32_positions",
    "xpos_decay",
    "fuse",
    "validate",
    "validate_scope",
    "allow_partial",
    "max_positions",
    "pos_scale",
    "alibi_scale",
    "bias_scale",
    "extend",
    "window",
    "group_size",
    "leaky",
    "chunk_size",
    "local_size",
    "logn_scaling",
    "runtime_decode",
    "output",
    "link_weights",
    "share_weights",
)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


#: what a rewrite without any rewrite flag says (the CLI and the API alike)
NOTHING_TO_DO = ("nothing to do: give --rope-scale, --rope-base, --rope-params, --fp32-positions, --fuse, "
                 "--max-positions, --pos-scale, --alibi-scale, --bias-scale, --extend or --logn-scaling")


def options_from_flags(flags: Mapping[str, Any], *, require_work: bool = True) -> RewriteOptions:
    """RewriteOptions from a command's flags (argparse's names: ``rope_scale``, ``rope_freq_scale``,
    ``yarn_orig_ctx``...; absent ones are not given), refusing contradictions with one line each.

    The llama.cpp spellings are mapped here: ``--rope-freq-scale F`` is ``--rope-scale 1/F``,
    ``--rope-scaling none`` no scaling, ``--yarn-orig-ctx`` (0: from the model) ``--original-max-positions``,
    ``--yarn-beta-fast/-slow`` and ``--yarn-attn-factor`` (a multiple of YaRN's 0.1 ln(S) + 1) rope
    parameters; every other value is checked by RewriteOptions itself."""
    scale = flags.get("rope_scale")
    freq_scale = flags.get("rope_freq_scale")
    if freq_scale is not None:
        if not freq_scale > 0 or not math.isfinite(freq_scale):
            raise UsageError(f"--rope-freq-scale must be greater than 0, not {freq_scale:g}")
        inverse = 1.0 / freq_scale
        if scale is not None and not _close(scale, inverse):
            raise UsageError(
                f"--rope-freq-scale {freq_scale:g} (= --rope-scale {inverse:g}) disagrees with --rope-scale {scale:g}"
            )
        scale = inverse

    method = flags.get("rope_method")
    method = method.strip().lower() if method else None
    if method == "none":
        if scale is not None:
            raise UsageError("--rope-scaling none contradicts --rope-scale")
        method = None

    orig = flags.get("original_max_positions")
    yarn_orig_ctx = flags.get("yarn_orig_ctx")
    if yarn_orig_ctx:  # llama.cpp: 0 means "from the model"
        if orig is not None and orig != yarn_orig_ctx:
            raise UsageError(f"--yarn-orig-ctx {yarn_orig_ctx} disagrees with --original-max-positions {orig}")
        orig = yarn_orig_ctx
    elif yarn_orig_ctx is not None and yarn_orig_ctx < 0:
        raise UsageError(f"--yarn-orig-ctx must be 0 or more, not {yarn_orig_ctx}")

    params = load_rope_params(flags["rope_params"]) if flags.get("rope_params") else {}
    params_type = params.get("rope_type")
    if params_type in NO_SCALING_TYPES:
        params_type = None
    # an explicit --rope-method (linear too, which RewriteOptions cannot tell from its default) must be used
    has_factor = params.get("factor") is not None or "long_factor" in params
    if method is not None and scale is None and not has_factor and not flags.get("target_grid"):
        raise UsageError(f"--rope-method {method} needs --rope-scale (or a factor in --rope-params)")
    if method is not None and params_type is not None and str(params_type).lower() != method:
        raise UsageError(f"--rope-params rope_type {params_type!r} disagrees with --rope-method {method!r}")

    effective_method = method or (str(params_type).lower() if params_type else None)
    yarn_flags = {
        "--yarn-beta-fast": ("beta_fast", flags.get("yarn_beta_fast")),
        "--yarn-beta-slow": ("beta_slow", flags.get("yarn_beta_slow")),
    }
    attn_factor = flags.get("yarn_attn_factor")
    if attn_factor is not None:
        from posrewrite.math.rope import yarn_attention_factor

        factor = scale if scale is not None else params.get("factor")
        magnitude = yarn_attention_factor(factor) if factor is not None else 1.0  # 0.1 ln(S) + 1, 1 for S <= 1
        yarn_flags["--yarn-attn-factor"] = ("attention_factor", attn_factor * magnitude)
    for flag, (key, value) in yarn_flags.items():
        if value is None:
            continue
        if effective_method != "yarn":
            raise UsageError(f"{flag} applies only to --rope-method yarn")
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"{flag} must be greater than 0, not {value:g}")
        if key in params and not _close(float(params[key]), value):
            raise UsageError(f"{flag} disagrees with {key}={params[key]} in --rope-params")
        params[key] = value

    fields: dict[str, Any] = dict(
        rope_scale=scale,
        rope_method=method or "linear",
        original_max_positions=orig,
        rope_base=flags.get("rope_base"),
        rope_params=params,
    )
    fields.update({name: flags[name] for name in _PLAIN_FIELDS if name in flags})
    if isinstance(fields.get("fuse"), str):
        fields["fuse"] = fields["fuse"].strip().lower()
    opts = RewriteOptions(**fields)
    if require_work and not opts.has_work():
        raise UsageError(NOTHING_TO_DO)
    return opts


def parse_grid(value: Any, flag: str) -> tuple[int, int] | None:
    """``"14x14"`` (or a pair of ints) as (rows, columns); UsageError for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        try:
            pair = tuple(int(p) for p in parts)
        except ValueError:
            raise UsageError(f"{flag} takes ROWSxCOLUMNS (e.g. 14x14), not {shown(value)}") from None
    else:
        pair = tuple(int(v) for v in value)
    if len(pair) != 2 or not all(0 < v <= 1 << 16 for v in pair):
        raise UsageError(f"{flag} takes two positive sizes ROWSxCOLUMNS (e.g. 14x14), not {shown(value)}")
    return (pair[0], pair[1])
