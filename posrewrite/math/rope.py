"""RoPE arithmetic in plain numpy: inverse frequencies for every scaling method, attention factors,
cos/sin tables and a reference rotation. Reading parameters back from a model's numbers (base fitting, the
float32 vector behind a half-precision one, already-scaled vectors) is `posrewrite.math.rope_fit`.

This module is the single source of truth for what each method means. The reference is Hugging Face
transformers' ``modeling_rope_utils`` (5.x): every vector is built in float32 with the operations in the
order torch performs them (including torch's ``scalar / tensor`` being ``reciprocal(tensor) * scalar``),
so results agree with HF to the last bit except where torch's vectorised ``pow`` (SLEEF, <= 1 ulp) and the
correctly rounded ``powf`` used here round differently (about one element in a few hundred, 1 ulp).

Notation: ``dim`` is the rotary dimension (even; ``head_dim * partial_rotary_factor``), ``k = dim // 2``
frequencies, ``b`` the base (``rope_theta``), ``s`` the scale factor, ``L`` the training length
(``original_max_position_embeddings``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import numpy as np

from posrewrite.math.dtypes import unit_roundoff
from posrewrite.math.rope_fit import fit_base
from posrewrite.math.rope_freq import _F32, PriorScaling, _check_dim, _exponents, _f32, _pos_freqs, default_inv_freq

__all__ = [
    "ROPE_METHODS",
    "RopeParameters",
    "default_inv_freq",
    "unit_roundoff",
    "PriorScaling",
    "parameters_for_site",
    "ntk_base",
    "dynamic_ntk_base",
    "RuntimeOps",
    "NumpyOps",
    "runtime_inv_freq",
    "yarn_attention_factor",
    "yarn_correction_range",
    "longrope_attention_factor",
    "scaled_inv_freq",
    "cos_sin_tables",
    "apply_rotary",
]

ROPE_METHODS = ("default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope")

# Other spellings met in configs -> our method names.
_TYPE_ALIASES = {"su": "longrope", "ntk-aware": "ntk", "ntk_aware": "ntk"}
# Methods that need the training length L.
_NEEDS_L = ("dynamic", "yarn", "llama3", "longrope")


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeParameters:
    """A RoPE scaling request; field names follow HF ``rope_parameters``.

    ``factor`` defaults to 1.0. For ``yarn`` and ``longrope`` HF derives the factor from
    ``max_position_embeddings / original_max_position_embeddings`` when no factor is given; here that
    happens when ``factor == 1.0`` and ``max_position_embeddings`` is set (see :meth:`effective_factor`).
    """

    rope_type: str = "default"
    factor: float = 1.0
    rope_theta: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so the dataclass stays hashable.
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(float(v) for v in value))

    # -- HF dicts ---------------------------------------------------------------------------------

    @classmethod
    def from_hf(
        cls,
        d: dict[str, Any],
        *,
        max_position_embeddings: int | None = None,
        original_max_position_embeddings: int | None = None,
    ) -> RopeParameters:
        """Parse an HF v5 ``rope_parameters`` or v4 ``rope_scaling`` dict.

        The method name comes from ``rope_type`` (or the v4 ``type``); ``"ntk"`` is accepted as our own name
        for static NTK-aware scaling. ``partial_rotary_factor`` is ignored (the rotary dimension is passed to
        the functions instead). Keys set to ``None`` count as absent. Any other unknown key raises ValueError.

        The keyword arguments are the model config's top-level values, when the caller has them:

        - ``max_position_embeddings``: as in HF it stands in for a missing ``original_max_position_embeddings``
          of yarn/llama3/longrope, is the length ``L`` of ``dynamic`` (HF's dynamic compares with
          ``config.max_position_embeddings`` and ignores the dict), and is kept as the target length of
          yarn/longrope (where it gives the factor when none is set).
        - ``original_max_position_embeddings``: a top-level value (Phi-3 keeps it there) that, as in HF,
          takes precedence over the dict's for yarn/llama3/longrope.
        """
        if not isinstance(d, dict):
            raise ValueError(f"rope parameters must be a dict, got {type(d).__name__}")
        raw = {k: v for k, v in d.items() if v is not None}
        rope_type = raw.pop("rope_type", None)
        legacy_type = raw.pop("type", None)
        rope_type = str(rope_type if rope_type is not None else (legacy_type or "default"))
        rope_type = _TYPE_ALIASES.get(rope_type, rope_type)
        if rope_type not in ROPE_METHODS:
            raise ValueError(f"unknown rope_type {rope_type!r} (known: {', '.join(ROPE_METHODS)})")
        raw.pop("partial_rotary_factor", None)

        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r} in rope parameters (rope_type {rope_type!r})")

        kwargs: dict[str, Any] = {"rope_type": rope_type}
        for key, value in raw.items():
            if key in ("original_max_position_embeddings", "max_position_embeddings"):
                kwargs[key] = int(value)
            elif key == "truncate":
                kwargs[key] = bool(value)
            elif key in ("short_factor", "long_factor"):
                kwargs[key] = tuple(float(v) for v in value)
            else:
                kwargs[key] = float(value)
        # HF treats 0 like unset for the yarn betas (`get("beta_fast") or 32`).
        if not kwargs.get("beta_fast", 1.0):
            kwargs.pop("beta_fast")
        if not kwargs.get("beta_slow", 1.0):
            kwargs.pop("beta_slow")

        if original_max_position_embeddings is not None and rope_type in ("yarn", "llama3", "longrope"):
            kwargs["original_max_position_embeddings"] = int(original_max_position_embeddings)
        if max_position_embeddings is not None:
            if rope_type == "dynamic":
                kwargs["original_max_position_embeddings"] = int(max_position_embeddings)
            elif rope_type in ("yarn", "llama3", "longrope"):
                kwargs.setdefault("original_max_position_embeddings", int(max_position_embeddings))
                if rope_type != "llama3":
                    kwargs.setdefault("max_position_embeddings", int(max_position_embeddings))
        return cls(**kwargs)

    def to_hf(self, *, base: float | None = None, dim: int | None = None) -> dict[str, Any]:
        """An HF v5 ``rope_parameters`` dict holding the fields that matter for this method.

        HF has no ``ntk`` type; by default it is written as ``{"rope_type": "ntk", "factor": s}`` (which
        :meth:`from_hf` reads back). Given the model's ``base`` and rotary ``dim`` it is written the HF way
        instead: ``{"rope_type": "default", "rope_theta": ntk_base(base, dim, s)}``.
        """
        t = self.rope_type
        if t == "ntk" and base is not None and dim is not None:
            b = self.rope_theta if self.rope_theta is not None else base
            return {"rope_type": "default", "rope_theta": ntk_base(b, dim, self.factor)}
        out: dict[str, Any] = {"rope_type": t}
        if self.rope_theta is not None:
            out["rope_theta"] = float(self.rope_theta)
        if t in ("linear", "ntk", "dynamic", "yarn", "llama3"):
            out["factor"] = float(self.factor)
        if t == "longrope" and (self.factor != 1.0 or self.max_position_embeddings is None):
            out["factor"] = float(self.factor)
        if t in _NEEDS_L and self.original_max_position_embeddings is not None:
            out["original_max_position_embeddings"] = int(self.original_max_position_embeddings)
        if t in ("yarn", "longrope") and self.attention_factor is not None:
            out["attention_factor"] = float(self.attention_factor)
        if t == "yarn":
            out["beta_fast"] = float(self.beta_fast)
            out["beta_slow"] = float(self.beta_slow)
            if self.mscale is not None:
                out["mscale"] = float(self.mscale)
            if self.mscale_all_dim is not None:
                out["mscale_all_dim"] = float(self.mscale_all_dim)
            if not self.truncate:
                out["truncate"] = False
        if t == "llama3":
            out["low_freq_factor"] = float(self.low_freq_factor)
            out["high_freq_factor"] = float(self.high_freq_factor)
        if t == "longrope":
            if self.short_factor is not None:
                out["short_factor"] = [float(v) for v in self.short_factor]
            if self.long_factor is not None:
                out["long_factor"] = [float(v) for v in self.long_factor]
        return out

    # -- checks -----------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError (one line) for contradictory or incomplete parameters.

        Lengths of the longrope factor lists depend on the rotary dimension and are checked in
        :func:`scaled_inv_freq`.
        """
        t = self.rope_type
        if t not in ROPE_METHODS:
            raise ValueError(f"unknown rope_type {t!r} (known: {', '.join(ROPE_METHODS)})")
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"{t}: factor must be a finite number > 0, got {self.factor!r}")
        if self.rope_theta is not None and not (math.isfinite(self.rope_theta) and self.rope_theta > 1.0):
            raise ValueError(f"{t}: rope_theta must be a finite number > 1, got {self.rope_theta!r}")
        L = self.original_max_position_embeddings
        if L is not None and L <= 0:
            raise ValueError(f"{t}: original_max_position_embeddings must be > 0, got {L}")
        if self.max_position_embeddings is not None and self.max_position_embeddings <= 0:
            raise ValueError(f"{t}: max_position_embeddings must be > 0, got {self.max_position_embeddings}")
        if t in _NEEDS_L and L is None:
            raise ValueError(f"{t} needs original_max_position_embeddings (the training length)")
        if self.attention_factor is not None and not (self.attention_factor > 0):
            raise ValueError(f"{t}: attention_factor must be > 0, got {self.attention_factor!r}")
        if t == "yarn":
            if not (self.beta_fast > 0 and self.beta_slow > 0):
                raise ValueError(f"yarn: beta_fast and beta_slow must be > 0, got {self.beta_fast}, {self.beta_slow}")
            if self.beta_fast < self.beta_slow:
                raise ValueError(f"yarn: beta_fast ({self.beta_fast}) must be >= beta_slow ({self.beta_slow})")
        if t == "llama3":
            if self.low_freq_factor <= 0:
                raise ValueError(f"llama3: low_freq_factor must be > 0, got {self.low_freq_factor}")
            if self.low_freq_factor >= self.high_freq_factor:
                raise ValueError(
                    f"llama3: low_freq_factor ({self.low_freq_factor}) must be < high_freq_factor "
                    f"({self.high_freq_factor})"
                )
        if t == "longrope":
            if self.short_factor is None or self.long_factor is None:
                raise ValueError("longrope needs both short_factor and long_factor")
            for name in ("short_factor", "long_factor"):
                values = getattr(self, name)
                if not all(math.isfinite(v) and v > 0 for v in values):
                    raise ValueError(f"longrope: {name} values must be finite and > 0")

    def effective_factor(self) -> float:
        """The scale factor s as HF uses it: ``factor``, or for yarn/longrope without a factor (1.0 here) and
        with a target length, ``max_position_embeddings / original_max_position_embeddings``."""
        if (
            self.rope_type in ("yarn", "longrope")
            and self.factor == 1.0
            and self.max_position_embeddings is not None
            and self.original_max_position_embeddings
        ):
            return self.max_position_embeddings / self.original_max_position_embeddings
        return float(self.factor)

    def target_length(self) -> int | None:
        """``max_position_embeddings``, else ``round(factor * L)`` when L is known, else None."""
        if self.max_position_embeddings is not None:
            return int(self.max_position_embeddings)
        if self.original_max_position_embeddings is not None:
            return int(round(self.factor * self.original_max_position_embeddings))
        return None


# --------------------------------------------------------------------------------------------------
# Bases and factors
# --------------------------------------------------------------------------------------------------


def parameters_for_site(params: RopeParameters, base: float | None, prior: PriorScaling | None) -> RopeParameters:
    """`params` as applied to a site with fitted `base` whose inv_freq already carries `prior` (or None).

    New parameters replace a prior scaling, as in HF: every method then starts from the plain frequencies
    of the base. Raises ValueError when that base (or, for ``dynamic``, any base) is unknown."""
    if prior is not None and params.rope_theta is None:
        if base is None:
            raise ValueError(f"this RoPE is already scaled ({prior.describe()}) and its base cannot be recovered "
                             "from the graph: pass --rope-base / rope_base (the model's rope_theta) or its config.json")
        params = dataclasses.replace(params, rope_theta=base)
    if params.rope_type == "dynamic" and base is None and params.rope_theta is None:
        raise ValueError("dynamic needs the RoPE base, and inv_freq is not geometric (pass --rope-base / rope_base "
                         "or a config.json with rope_theta)")
    return params


def ntk_base(base: float, dim: int, factor: float) -> float:
    """Static NTK-aware base: b * s^(d/(d-2))."""
    dim = _check_dim(dim)
    if dim == 2:
        raise ValueError("NTK scaling needs a rotary dim > 2")
    return float(base) * float(factor) ** (dim / (dim - 2))


def dynamic_ntk_base(base: float, dim: int, factor: float, seq_len: int, max_position_embeddings: int) -> float:
    """HF dynamic NTK base for a runtime length: b * ((s * n / L) - (s - 1))^(d/(d-2)) with
    n = seq_len, L = max_position_embeddings; the base itself when n <= L."""
    dim = _check_dim(dim)
    if seq_len <= max_position_embeddings:
        return float(base)
    # Same Python-float operation order as HF.
    return float(base) * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))


class RuntimeOps(Protocol):
    """The tensor operations the run-time formulas need. The ONNX node writer and the fx graph writer
    implement it, and `NumpyOps` evaluates it; handles are whatever the implementation uses. ``const`` takes a
    float32 numpy scalar or vector."""

    def const(self, value: np.ndarray) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def div(self, a: Any, b: Any) -> Any: ...
    def sub(self, a: Any, b: Any) -> Any: ...
    def pow(self, a: Any, b: Any) -> Any: ...
    def greater(self, a: Any, b: Any) -> Any: ...
    def where(self, condition: Any, a: Any, b: Any) -> Any: ...


class NumpyOps:
    """`RuntimeOps` in float32 numpy: the run-time formulas evaluated for one length (tests, plots)."""

    def const(self, value: np.ndarray) -> np.ndarray:
        return np.asarray(value, dtype=_F32)

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.multiply(a, b, dtype=_F32)

    def div(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, dtype=_F32)

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.subtract(a, b, dtype=_F32)

    def pow(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):  # a negative ratio below L: Where drops it, as in the graph
            return np.power(a, b, dtype=_F32)

    def greater(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.greater(a, b)

    def where(self, condition: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(condition, a, b).astype(_F32)


def runtime_inv_freq(ops: RuntimeOps, seq: Any, params: RopeParameters, *, inv_freq: np.ndarray | None,
                     base: float | None, dim: int) -> Any:
    """float32 [dim/2] inverse frequencies for the run-time length ``seq`` (a float32 scalar handle, HF's
    ``max(position_ids) + 1``), written with ``ops`` so the ONNX and fx rewrites build the same arithmetic.

    ``dynamic``: HF's ``base * ((s * seq / L) - (s - 1)) ** (d / (d - 2))`` then ``1 / base' ** (2i/d)`` past L,
    the original frequencies up to L. ``longrope``: the long vector past L, the short one up to L.
    ``inv_freq`` / ``base`` are the site's (the base given in ``params.rope_theta`` wins)."""
    dim = _check_dim(dim)
    L = params.original_max_position_embeddings
    if L is None:
        raise ValueError(f"{params.rope_type} needs original_max_position_embeddings")
    longer = ops.greater(seq, ops.const(_f32(L)))
    if params.rope_type == "longrope":
        short, _ = scaled_inv_freq(params, inv_freq=inv_freq, base=base, dim=dim, seq_len=L)
        long, _ = scaled_inv_freq(params, inv_freq=inv_freq, base=base, dim=dim, seq_len=L + 1)
        return ops.where(longer, ops.const(long.astype(_F32)), ops.const(short.astype(_F32)))
    if params.rope_type != "dynamic":
        raise ValueError(f"{params.rope_type} has no run-time formula")
    b = params.rope_theta if params.rope_theta is not None else base
    if b is None:
        raise ValueError("dynamic needs the base (rope_theta)")
    orig = default_inv_freq(b, dim) if params.rope_theta is not None or inv_freq is None else inv_freq
    s = float(params.factor)
    ratio = ops.sub(ops.div(ops.mul(ops.const(_f32(s)), seq), ops.const(_f32(L))), ops.const(_f32(s - 1)))
    new_base = ops.mul(ops.const(_f32(b)), ops.pow(ratio, ops.const(_f32(dim / (dim - 2)))))
    dyn = ops.div(ops.const(_f32(1.0)), ops.pow(new_base, ops.const(_exponents(dim))))
    return ops.where(longer, dyn, ops.const(np.asarray(orig, dtype=_F32)))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(
    factor: float,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
) -> float:
    """YaRN cos/sin multiplier: the given one, else mscale(s, mscale)/mscale(s, mscale_all_dim) when both are
    set (and non-zero, as HF tests truthiness), else 0.1 ln s + 1 (1 for s <= 1)."""
    if attention_factor is not None:
        return float(attention_factor)
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def longrope_attention_factor(
    factor: float, original_max_position_embeddings: int, attention_factor: float | None = None
) -> float:
    """LongRoPE cos/sin multiplier: the given one, else sqrt(1 + ln s / ln L) for s > 1, else 1."""
    if attention_factor is not None:
        return float(attention_factor)
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))


def yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, original_max_position_embeddings: int,
    truncate: bool = True,
) -> tuple[float, float]:
    """YaRN's dimension range [low, high] of the ramp (floor/ceil when ``truncate``), clamped to [0, dim-1]."""

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(beta_fast)
    high = correction_dim(beta_slow)
    if truncate:
        low = math.floor(low)
        high = math.ceil(high)
    return max(low, 0), min(high, dim - 1)


# --------------------------------------------------------------------------------------------------
# Scaled inverse frequencies
# --------------------------------------------------------------------------------------------------


def _yarn_inv_freq(params: RopeParameters, base: float, dim: int, factor: float) -> np.ndarray:
    pos_freqs = _pos_freqs(base, dim)
    one = _F32(1.0)
    extrapolation = one / pos_freqs
    interpolation = one / (_f32(factor) * pos_freqs)
    low, high = yarn_correction_range(
        params.beta_fast, params.beta_slow, dim, base, params.original_max_position_embeddings, params.truncate
    )
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = (np.arange(dim // 2, dtype=_F32) - _f32(low)) / _f32(high - low)
    ramp = np.clip(ramp, _F32(0.0), _F32(1.0))
    extrapolation_factor = one - ramp
    return interpolation * (one - extrapolation_factor) + extrapolation * extrapolation_factor


def _llama3_inv_freq(params: RopeParameters, inv_freq: np.ndarray) -> np.ndarray:
    factor = _f32(params.factor)
    L = params.original_max_position_embeddings
    low_wavelen = L / params.low_freq_factor
    high_wavelen = L / params.high_freq_factor
    wavelen = (_F32(1.0) / inv_freq) * _f32(2 * math.pi)  # torch: 2*pi / t == reciprocal(t) * 2*pi
    scaled = np.where(wavelen > _f32(low_wavelen), inv_freq / factor, inv_freq)
    smooth = ((_F32(1.0) / wavelen) * _f32(L) - _f32(params.low_freq_factor)) / _f32(
        params.high_freq_factor - params.low_freq_factor
    )
    smoothed = (_F32(1.0) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < _f32(high_wavelen)) & ~(wavelen > _f32(low_wavelen))
    return np.where(medium, smoothed, scaled).astype(_F32)


def scaled_inv_freq(
    params: RopeParameters,
    *,
    inv_freq: np.ndarray,
    base: float | None,
    dim: int,
    seq_len: int | None = None,
) -> tuple[np.ndarray, float]:
    """New float32 inverse frequencies [dim//2] and the attention factor for ``params``.

    ``inv_freq`` is the model's current (unscaled) vector, ``base`` its base (None: fitted from ``inv_freq``
    when needed). With ``params.rope_theta`` set, that base replaces ``base`` and ``inv_freq`` is rebuilt
    from it first. ``linear``, ``llama3``, ``default`` and ``dynamic`` below L work on ``inv_freq`` as given;
    ``ntk``, ``dynamic`` above L, ``yarn`` and ``longrope`` rebuild from the base (as HF does).

    ``seq_len`` (runtime length = max position + 1) matters for ``dynamic`` (unchanged while seq_len <= L,
    with L = original_max_position_embeddings in the role of HF's config.max_position_embeddings) and
    ``longrope`` (long_factor when seq_len > L, else short_factor; None counts as short).
    """
    params.validate()
    dim = _check_dim(dim)
    inv = np.asarray(inv_freq, dtype=_F32).reshape(-1)
    if inv.size != dim // 2:
        raise ValueError(f"inv_freq has {inv.size} entries, rotary dim {dim} needs {dim // 2}")
    if params.rope_theta is not None:
        base = float(params.rope_theta)
        inv = default_inv_freq(base, dim)

    def need_base() -> float:
        if base is not None:
            return float(base)
        fitted = fit_base(inv, dim)
        if fitted is None:
            raise ValueError(
                f"{params.rope_type} needs the RoPE base, and inv_freq is not geometric (pass base= or rope_theta)"
            )
        return fitted

    t = params.rope_type
    L = params.original_max_position_embeddings
    if t == "default":
        return inv.copy(), 1.0
    if t == "linear":
        return (inv / _f32(params.factor)).astype(_F32), 1.0
    if t == "ntk":
        return default_inv_freq(ntk_base(need_base(), dim, params.factor), dim), 1.0
    if t == "dynamic":
        if seq_len is None or seq_len <= L:
            return inv.copy(), 1.0
        b = dynamic_ntk_base(need_base(), dim, params.factor, int(seq_len), L)
        return default_inv_freq(b, dim), 1.0
    if t == "yarn":
        factor = params.effective_factor()
        attention = yarn_attention_factor(factor, params.mscale, params.mscale_all_dim, params.attention_factor)
        return _yarn_inv_freq(params, need_base(), dim, factor).astype(_F32), attention
    if t == "llama3":
        return _llama3_inv_freq(params, inv), 1.0
    if t == "longrope":
        for name in ("short_factor", "long_factor"):
            n = len(getattr(params, name))
            if n != dim // 2:
                raise ValueError(f"longrope: {name} has {n} values, rotary dim {dim} needs {dim // 2}")
        attention = longrope_attention_factor(params.effective_factor(), L, params.attention_factor)
        ext = params.long_factor if (seq_len and seq_len > L) else params.short_factor
        ext32 = np.asarray(ext, dtype=_F32)
        return (_F32(1.0) / (ext32 * _pos_freqs(need_base(), dim))).astype(_F32), attention
    raise ValueError(f"unknown rope_type {t!r}")  # unreachable after validate()


# --------------------------------------------------------------------------------------------------
# Tables and rotation
# --------------------------------------------------------------------------------------------------

_LAYOUTS = ("half", "rotate_half", "interleaved")


def cos_sin_tables(
    inv_freq: np.ndarray,
    positions: int | np.ndarray,
    *,
    attention_factor: float = 1.0,
    layout: str = "half",
    dtype=np.float32,
    compute_dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables for ``positions`` (an int N meaning 0..N-1, or an array of any shape).

    Angles are ``positions * inv_freq`` in ``compute_dtype`` (float32 as HF; float64 for references), cos/sin
    in ``compute_dtype``, multiplied by ``attention_factor``, then cast to ``dtype``. Layouts: ``"half"``
    [..., d/2] (the com.microsoft.RotaryEmbedding cache form), ``"rotate_half"`` [..., d] = concat(t, t)
    (HF), ``"interleaved"`` [..., d] with each value repeated for its pair.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(_LAYOUTS)})")
    cdt = np.dtype(compute_dtype)
    if isinstance(positions, (int, np.integer)):
        pos = np.arange(int(positions)).astype(cdt)
    else:
        pos = np.asarray(positions).astype(cdt)
    freqs = np.asarray(inv_freq).reshape(-1).astype(cdt)
    angles = pos[..., None] * freqs
    scale = cdt.type(attention_factor)
    cos = np.cos(angles)
    sin = np.sin(angles)
    if attention_factor != 1.0:
        cos = cos * scale
        sin = sin * scale
    if layout == "rotate_half":
        cos = np.concatenate([cos, cos], axis=-1)
        sin = np.concatenate([sin, sin], axis=-1)
    elif layout == "interleaved":
        cos = np.repeat(cos, 2, axis=-1)
        sin = np.repeat(sin, 2, axis=-1)
    return cos.astype(dtype), sin.astype(dtype)


def apply_rotary(
    x: np.ndarray, cos: np.ndarray, sin: np.ndarray, *, layout: str, rotary_dim: int | None = None
) -> np.ndarray:
    """Reference rotation of the last axis of ``x`` ([..., S, head_dim]).

    ``cos``/``sin`` broadcast against x's leading axes: half form [S, r/2], or full form [S, r] (as made by
    :func:`cos_sin_tables` for ``layout``; then pass ``rotary_dim`` unless r == head_dim). ``layout`` is
    ``"rotate_half"`` (halves of the rotary part) or ``"interleaved"`` (pairs 2i, 2i+1). Channels past
    ``rotary_dim`` pass through unchanged. Computed in the promoted dtype of x and cos.
    """
    if layout == "half":
        layout = "rotate_half"
    if layout not in ("rotate_half", "interleaved"):
        raise ValueError(f"unknown layout {layout!r} (rotate_half or interleaved)")
    x = np.asarray(x)
    cos = np.asarray(cos)
    sin = np.asarray(sin)
    head_dim = x.shape[-1]
    c = cos.shape[-1]
    if rotary_dim is None:
        rotary_dim = 2 * c if 2 * c <= head_dim else c
    r = int(rotary_dim)
    if r % 2 or r > head_dim or r < 2:
        raise ValueError(f"rotary_dim {r} must be even and within head_dim {head_dim}")
    h = r // 2
    if c == r and c != h:  # full form -> half form
        if layout == "rotate_half":
            cos, sin = cos[..., :h], sin[..., :h]
        else:
            cos, sin = cos[..., 0::2], sin[..., 0::2]
    elif c != h:
        raise ValueError(f"cos/sin last axis {c} fits neither rotary_dim {r} nor its half")
    dt = np.result_type(x, cos)
    xr = x[..., :r].astype(dt)
    cos = cos.astype(dt)
    sin = sin.astype(dt)
    if layout == "rotate_half":
        x1, x2 = xr[..., :h], xr[..., h:]
        out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        xe, xo = xr[..., 0::2], xr[..., 1::2]
        out = np.stack([xe * cos - xo * sin, xe * sin + xo * cos], axis=-1).reshape(xr.shape)
    if r < head_dim:
        out = np.concatenate([out, x[..., r:].astype(dt)], axis=-1)
    return out
