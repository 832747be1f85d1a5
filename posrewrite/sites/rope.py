"""Description of a RoPE encoding: one cos/sin source and the q/k rotations that use it.

Two layers:

- `RopeEncoding`, free of any IR: layout, dimensions, base, inv_freq, typed prior scaling and the angle
  source, a tagged union of frozen dataclasses (`ComputedAngles` | `CachedTable` | `FusedCaches` |
  `AttentionRotary`), each holding exactly the facts its kind has. The ONNX and the torch.fx sides share it.
- `RopeSite` (ONNX): an encoding plus the `onnx_ir` values and nodes it was found on (`OnnxComputedHandles`,
  `OnnxCachedHandles`, `OnnxSwitchedCaches`), so a rewrite pass acts on exactly those. The fx side's
  `FxRopeSite` (`posrewrite/passes/fx/sites.py`) holds the same encoding with torch.fx nodes.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from posrewrite.math.rope import PriorScaling
from posrewrite.sites.base import EncodingSite
from posrewrite.sites.rope_axes import GridAxes, PositionRows


class Layout(str, enum.Enum):
    ROTATE_HALF = "rotate_half"  # Llama/NeoX: rotate_half([x1, x2]) = [-x2, x1]
    INTERLEAVED = "interleaved"  # GPT-J / Meta Llama: pairs (2i, 2i+1)
    # DeepSeek-V3: pairs (2i, 2i+1) rotated, the result written de-interleaved (firsts, then seconds)
    INTERLEAVED_TO_HALF = "interleaved_to_half"


class AngleSource(str, enum.Enum):
    """The JSON `angles` value: the tag of the angle-source union (`FUSED_OP` covers two of its kinds)."""

    COMPUTED = "computed"  # cos/sin of positions x inv_freq computed in the graph
    CACHED = "cached"  # precomputed cos/sin tables gathered or sliced by positions
    FUSED_OP = "fused_op"  # a RotaryEmbedding node (or an attention op with rotary inside) holding its caches
    GRID = "grid"  # angles computed from the row and column of a patch grid (2-D RoPE), identified by probing
    PROBED = "probed"  # angles pos·f_c computed in a form not read term by term: identified by probing


class InvFreqOrigin(str, enum.Enum):
    """How the inv_freq operand of computed angles is produced."""

    CONSTANT = "constant"  # an initializer / Constant holding the vector
    FOLDED = "folded"  # constant ops computing it (base ** (-2i/d) in the graph), folded at detection
    RUNTIME = "runtime"  # computed from run-time values (a dynamic / longrope rewrite: a formula of the length)
    LENGTH_SELECTED = "length_selected"  # HF's LongRoPE export: Where(length > L, long, short)


# -- facts shared by several kinds -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RescaleRecord:
    """What an earlier posrewrite rescale recorded in the graph (the base its frequencies were built from)."""

    rope_type: str
    factor: float | None
    original_max_position_embeddings: int | None
    base: float | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RescaleRecord:
        omp = data.get("original_max_position_embeddings")
        return cls(
            rope_type=str(data.get("rope_type") or "default"),
            factor=None if data.get("factor") is None else float(data["factor"]),
            original_max_position_embeddings=None if omp is None else int(omp),
            base=None if data.get("base") is None else float(data["base"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {"rope_type": self.rope_type, "factor": self.factor,
                "original_max_position_embeddings": self.original_max_position_embeddings, "base": self.base}


@dataclasses.dataclass(frozen=True)
class RuntimeInvFreq:
    """inv_freq computed at run time by a posrewrite dynamic / longrope rewrite, with the numbers it started from."""

    rope_type: str
    factor: float
    original_max_position_embeddings: int
    base: float | None
    inv_freq: np.ndarray  # float32 [rotary_dim / 2]: the model's frequencies before that rewrite

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RuntimeInvFreq:
        return cls(
            rope_type=str(data["rope_type"]),
            factor=float(data["factor"]),
            original_max_position_embeddings=int(data["original_max_position_embeddings"]),
            base=None if data.get("base") is None else float(data["base"]),
            inv_freq=np.asarray(data["inv_freq"], np.float32),
        )


@dataclasses.dataclass(frozen=True)
class LengthSelection:
    """Frequencies switched by sequence length (LongRoPE): `short` up to `threshold` tokens, `long` beyond."""

    threshold: int
    short: np.ndarray  # float32 [rotary_dim / 2]
    long: np.ndarray  # float32 [rotary_dim / 2]
    long_factor: float | None = None  # attention factor of the long caches, when the export holds both caches


@dataclasses.dataclass(frozen=True)
class PositionDecay:
    """xPos (Sun et al. 2022): the rotation is also scaled by ζ_c^((p - p0)/γ) on q and its inverse on k, so
    q·k decays with distance. Read by probing: `log_rate` [rotary_dim/2] = log(ζ_c)/γ per pair (negative on q:
    ζ_c < 1; positive on k), `zero_position` p0 where the scale is 1 on the probe (rotary-embedding-torch centres it on
    the sequence: p0 = length // 2), at `probed_length` positions."""

    log_rate: np.ndarray
    zero_position: float
    probed_length: int

    @property
    def length_centred(self) -> bool:
        """p0 is the middle of the sequence (the scale depends on the call's length, not only on position)."""
        return abs(self.zero_position - self.probed_length // 2) < 1e-3

    @property
    def scale_base(self) -> float | None:
        """γ when ζ_c follows the paper's (2c + 0.4 d) / (1.4 d) (d = rotary_dim), else None."""
        rate = np.abs(np.asarray(self.log_rate, np.float64))
        d = 2 * rate.size
        zeta = (np.arange(0, d, 2) + 0.4 * d) / (1.4 * d)
        gammas = -np.log(zeta) / rate
        if not np.all(np.isfinite(gammas)) or np.ptp(gammas) > 1e-3 * np.max(gammas):
            return None
        return float(np.median(gammas))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "xpos", "log_rate": [float(v) for v in self.log_rate], "scale_base": self.scale_base,
                "zero_position": "length // 2" if self.length_centred else float(self.zero_position)}


# -- the angle-source union ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ComputedAngles:
    """cos/sin of positions x inv_freq computed in the graph."""

    kind: ClassVar[AngleSource] = AngleSource.COMPUTED

    position_dtype: str  # dtype the positions are in when multiplied with inv_freq
    angle_dtype: str  # dtype of the product and of cos/sin
    inv_freq_origin: InvFreqOrigin
    inv_freq_dtype: str | None = None  # float type inv_freq is stored in (its round-off bounds the base fit)
    attention_factor: float = 1.0  # constant Mul after Cos/Sin (YaRN / LongRoPE exports)
    runtime: RuntimeInvFreq | None = None  # origin RUNTIME: the rewrite's parameters
    selection: LengthSelection | None = None  # origin LENGTH_SELECTED: the two vectors
    rescaled: RescaleRecord | None = None  # inv_freq written by an earlier posrewrite rescale
    duplicated: str | None = None  # how angles are widened to rotary_dim: "concat" | "repeat" | None
    rows: PositionRows | None = None  # M-RoPE: the position row each frequency reads (probed)

    @property
    def max_positions(self) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class GridAngles:
    """cos/sin of angles computed from a patch grid made from the input's shape (2-D RoPE), fitted by probing."""

    kind: ClassVar[AngleSource] = AngleSource.GRID

    axes: GridAxes
    angle_dtype: str
    attention_factor: float = 1.0

    @property
    def position_dtype(self) -> str:
        return "float32"  # grid coordinates are made in the graph

    @property
    def max_positions(self) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class CachedTable:
    """Constant cos/sin tables whose rows are selected by position (Gather / Slice)."""

    kind: ClassVar[AngleSource] = AngleSource.CACHED

    rows: int
    dtype: str  # dtype of the stored tables
    position_dtype: str  # dtype of the row index ("int64" when rows are sliced)
    row_selection: str  # op selecting rows: "Gather" | "GatherElements" | "GatherND" | "Slice"
    attention_factor: float  # amplitude of the tables times any constant Mul after the selection
    cos_columns: tuple[int, int] | None = None  # column range of a combined table holding cos (GPT-J: concat)
    # element of a trailing axis of the table holding cos / sin (a table stacking them: torchtune's cache)
    cos_component: int | None = None
    sin_component: int | None = None
    sin_columns: tuple[int, int] | None = None
    cos_scale: float = 1.0  # constant Mul applied after selecting the cos rows
    sin_scale: float = 1.0

    @property
    def angle_dtype(self) -> str:
        return self.dtype

    @property
    def max_positions(self) -> int:
        return self.rows


@dataclasses.dataclass(frozen=True)
class FusedCaches:
    """A RotaryEmbedding node (ONNX 23 or com.microsoft) rotating with its own cos/sin caches [rows, d/2].

    `rows` is None when the caches are computed at run time (a fusion of run-time frequencies, whose
    `runtime` or `selection` then says how)."""

    kind: ClassVar[AngleSource] = AngleSource.FUSED_OP

    op: str  # "RotaryEmbedding" | "com.microsoft.RotaryEmbedding"
    rows: int | None
    dtype: str
    position_dtype: str
    attention_factor: float
    rescaled: RescaleRecord | None = None  # caches written by a posrewrite rescale
    runtime: RuntimeInvFreq | None = None
    selection: LengthSelection | None = None

    @property
    def angle_dtype(self) -> str:
        return self.dtype

    @property
    def max_positions(self) -> int | None:
        return self.rows


@dataclasses.dataclass(frozen=True)
class AttentionRotary:
    """An attention op that rotates q/k itself (com.microsoft.GroupQueryAttention do_rotary=1) with its caches.

    Positions are the op's own (past length + 0..S-1). `selection`: onnxruntime-genai's LongRoPE form, an
    If choosing long or short constant caches by length."""

    kind: ClassVar[AngleSource] = AngleSource.FUSED_OP

    op: str  # "com.microsoft.GroupQueryAttention"
    rows: int
    dtype: str
    interleaved: bool
    attention_factor: float
    rescaled: RescaleRecord | None = None
    selection: LengthSelection | None = None

    @property
    def position_dtype(self) -> str:
        return "int32"

    @property
    def angle_dtype(self) -> str:
        return self.dtype

    @property
    def max_positions(self) -> int:
        return self.rows


@dataclasses.dataclass(frozen=True)
class ProbedAngles:
    """Angles pos[row(c)]·f_c computed in the graph by ops not read term by term (no positions x inv_freq product
    to replace), fitted by evaluating the angle tensor on probe positions. Rescaled in angle space."""

    kind: ClassVar[AngleSource] = AngleSource.PROBED

    position_dtype: str
    angle_dtype: str
    attention_factor: float = 1.0
    rows: PositionRows | None = None  # multi-row positions (M-RoPE)
    # positions made from the length and divided by it (coordinates from -1 to 1): the angles already adapt to
    # the length, there is nothing to rescale
    normalised: bool = False

    @property
    def max_positions(self) -> None:
        return None


RopeSource = ComputedAngles | CachedTable | FusedCaches | AttentionRotary | GridAngles | ProbedAngles

SOURCE_KINDS: tuple[type, ...] = (ComputedAngles, CachedTable, FusedCaches, AttentionRotary, GridAngles,
                                  ProbedAngles)


# -- the IR-free description ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeEncoding:
    """One RoPE configuration as numbers and kinds, with no reference into any graph."""

    layout: Layout
    head_dim: int | None
    rotary_dim: int
    source: RopeSource
    base: float | None  # recovered from inv_freq (None when not geometric)
    inv_freq: np.ndarray | None  # float32 [rotary_dim/2], as found (computed) or fitted (tables)
    prior_scaling: PriorScaling | None = None  # set when inv_freq is already scaled
    notes: tuple[str, ...] = ()
    decay: PositionDecay | None = None  # xPos: a position-dependent magnitude on q (its inverse on k)
    identified_by: str = "pattern"  # "pattern" (a known spelling) | "probe" (read from what the graph computes)
    # per frequency, the position of the first token when the angles are f_c·(t + b_c) (an offset added to the
    # positions inside the model, or coordinates that do not start at 0); None: the angles start at 0
    position_offset: np.ndarray | None = None
    # 1, or -1 when the rotation turns by -θ (y_f = x_f cos θ + x_s sin θ, y_s = x_s cos θ - x_f sin θ: the pairs'
    # orientation reversed, which is a rotation by +θ of the pairs (s, f)): rescaling the angles is the same
    # operation; the validation oracle and --fuse (a negated sin cache) rotate by sign·θ
    angle_sign: int = 1

    @property
    def angles(self) -> AngleSource:
        return self.source.kind

    @property
    def max_positions(self) -> int | None:
        return self.source.max_positions

    @property
    def position_dtype(self) -> str:
        return self.source.position_dtype

    @property
    def angle_dtype(self) -> str:
        return self.source.angle_dtype

    @property
    def attention_factor(self) -> float:
        return self.source.attention_factor

    @property
    def op(self) -> str | None:
        """The fused op holding an attention rotary (JSON `op`), None otherwise."""
        return self.source.op if isinstance(self.source, AttentionRotary) else None

    @property
    def selection(self) -> LengthSelection | None:
        """Frequencies switched by length (LongRoPE), whatever the source kind."""
        source = self.source
        return source.selection if isinstance(source, ComputedAngles | FusedCaches | AttentionRotary) else None

    @property
    def runtime(self) -> RuntimeInvFreq | None:
        """inv_freq computed at run time by a posrewrite rewrite, whatever the source kind."""
        source = self.source
        return source.runtime if isinstance(source, ComputedAngles | FusedCaches) else None

    @property
    def rescaled(self) -> RescaleRecord | None:
        """The record of an earlier posrewrite rescale, whatever the source kind."""
        source = self.source
        return source.rescaled if isinstance(source, ComputedAngles | FusedCaches | AttentionRotary) else None

    @property
    def position_axes(self) -> PositionRows | GridAxes | None:
        """What the angles read from the positions when it is more than one sequence axis (M-RoPE rows, a grid)."""
        source = self.source
        if isinstance(source, GridAngles):
            return source.axes
        return source.rows if isinstance(source, ComputedAngles | ProbedAngles) else None

    def to_dict(self, *, rotations: int, cos: str | None, sin: str | None, inv_freq: str | None) -> dict[str, Any]:
        axes = self.position_axes
        return {
            "kind": "rope",
            "layout": self.layout.value,
            "head_dim": self.head_dim,
            "rotary_dim": self.rotary_dim,
            "base": None if self.base is None else float(self.base),
            "angles": self.angles.value,
            "max_positions": self.max_positions,
            "position_dtype": self.position_dtype,
            "angle_dtype": self.angle_dtype,
            "attention_factor": float(self.attention_factor),
            "prior_scaling": None if self.prior_scaling is None else self.prior_scaling.to_dict(),
            "rotations": rotations,
            "cos": cos,
            "sin": sin,
            "inv_freq": inv_freq,
            "notes": list(self.notes),
            **({"op": self.op} if self.op else {}),
            **({"decay": self.decay.to_dict()} if self.decay is not None else {}),
            **({"identified_by": self.identified_by} if self.identified_by != "pattern" else {}),
            **({"positions": axes.to_dict()} if axes is not None else {}),
            **({"position_offset": _offset_json(self.position_offset)} if self.position_offset is not None else {}),
            **({"angle_sign": -1} if self.angle_sign < 0 else {}),
        }


def _offset_json(offset: np.ndarray) -> float | list[float]:
    """One number when every frequency starts at the same position, else the list."""
    values = np.asarray(offset, np.float64)
    if values.size and np.ptp(values) <= 1e-6 * max(1.0, float(np.max(np.abs(values)))):
        return float(np.median(values))
    return [float(v) for v in values]


# -- ONNX handles ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeApplication:
    """One rotation of q or k: output = x*cos + rotate(x)*sin on the first `rotary_dim` channels."""

    input: ir.Value  # x before rotation (the full head_dim tensor)
    output: ir.Value  # the rotated tensor (after concatenating any pass-through part)
    layout: Layout
    rotary_dim: int
    head_dim: int | None
    num_heads: int | None
    nodes: tuple[ir.Node, ...]  # nodes that only serve this application
    cos: ir.Value | None = None  # the values multiplied with x (after broadcasting ops)
    sin: ir.Value | None = None
    decay: PositionDecay | None = None  # xPos: this rotation's position-dependent magnitude (q grows, k shrinks)
    heads_in_last_axis: int = 1  # H when x is [.., H·D] (every head rotated alike), else 1


@dataclasses.dataclass(frozen=True)
class OnnxTrig:
    """cos or sin of computed angles: the Cos/Sin node and the constant Mul after it, if any."""

    trig: ir.Node
    scale: ir.Node | None = None


@dataclasses.dataclass(frozen=True)
class OnnxComputedHandles:
    """Where a `ComputedAngles` source lives in the graph."""

    product: ir.Node  # positions x inv_freq (Mul / MatMul / Einsum)
    inv_freq: ir.Value  # the operand root holding inv_freq (constant, Where output, run-time value)
    inv_freq_consumer: ir.Node  # the node reading `inv_freq` (the product or a broadcasting op before it)
    positions: ir.Value  # the product's positions operand
    position_source: ir.Value  # positions before casts / broadcasts
    cos: OnnxTrig
    sin: OnnxTrig


@dataclasses.dataclass(frozen=True)
class OnnxTableRead:
    """cos or sin rows read from a constant table."""

    table: ir.Value  # the initializer / Constant
    select: ir.Node  # Gather / Slice selecting rows by position
    scale: ir.Node | None = None  # constant Mul after the selection


@dataclasses.dataclass(frozen=True)
class OnnxCachedHandles:
    """Where a `CachedTable` source lives in the graph."""

    cos: OnnxTableRead
    sin: OnnxTableRead


@dataclasses.dataclass(frozen=True)
class OnnxSwitchedCaches:
    """onnxruntime-genai's LongRoPE caches: the If choosing them and the Constant nodes of the long ones."""

    if_node: ir.Node
    long_cos: ir.Node
    long_sin: ir.Node


@dataclasses.dataclass(frozen=True)
class OnnxAngleHandles:
    """Where a `GridAngles` source lives: the angle tensor and the Cos/Sin nodes reading it."""

    angles: ir.Value
    trig: tuple[ir.Node, ...]
    channel_shape: tuple[int, ...]  # shape of a per-channel constant broadcast on `angles` (1 on position axes)
    channel_freq: np.ndarray | None = None  # probed 1-D angles: each element's frequency (channel_shape)


OnnxHandles = OnnxComputedHandles | OnnxCachedHandles | OnnxSwitchedCaches | OnnxAngleHandles


class RopeEncodingFields:
    """The fields of a site's `RopeEncoding`, read through on the site (``site.base`` is ``site.encoding.base``).
    Mixed into the ONNX `RopeSite` and the fx `FxRopeSite`, which both hold an ``encoding``."""

    encoding: RopeEncoding

    @property
    def layout(self) -> Layout:
        return self.encoding.layout

    @property
    def head_dim(self) -> int | None:
        return self.encoding.head_dim

    @property
    def rotary_dim(self) -> int:
        return self.encoding.rotary_dim

    @property
    def source(self) -> RopeSource:
        return self.encoding.source

    @property
    def angles(self) -> AngleSource:
        return self.encoding.angles

    @property
    def base(self) -> float | None:
        return self.encoding.base

    @property
    def inv_freq(self) -> np.ndarray | None:
        return self.encoding.inv_freq

    @property
    def prior_scaling(self) -> PriorScaling | None:
        return self.encoding.prior_scaling

    @property
    def notes(self) -> tuple[str, ...]:
        return self.encoding.notes

    @property
    def max_positions(self) -> int | None:
        return self.encoding.max_positions

    @property
    def position_dtype(self) -> str:
        return self.encoding.position_dtype

    @property
    def angle_dtype(self) -> str:
        return self.encoding.angle_dtype

    @property
    def attention_factor(self) -> float:
        return self.encoding.attention_factor

    @property
    def op(self) -> str | None:
        return self.encoding.op


@dataclasses.dataclass(frozen=True)
class RopeSite(RopeEncodingFields, EncodingSite):
    """One RoPE configuration of an ONNX graph: its `RopeEncoding` and the values and nodes it was found on."""

    kind: ClassVar[str] = "rope"

    encoding: RopeEncoding
    cos: ir.Value  # the cos tensor as produced by the source (before per-layer broadcasting)
    sin: ir.Value
    positions: ir.Value | None = None  # integer (or float) positions feeding the angles / the fused op
    inv_freq_value: ir.Value | None = None  # the initializer/constant holding inv_freq, when there is one
    cos_cache: ir.Value | None = None  # cached / fused: the tables
    sin_cache: ir.Value | None = None
    applications: tuple[RopeApplication, ...] = ()
    source_nodes: tuple[ir.Node, ...] = ()  # nodes computing cos/sin from positions
    fused_nodes: tuple[ir.Node, ...] = ()  # fused: the RotaryEmbedding / attention nodes
    # (graph input name, "arange" | "ones" | "zeros"): the feed of each integer input the positions read as data
    # under which they are 0..S-1 (a mask of ones for positions made from a mask's cumulative sum), by probing
    position_feeds: tuple[tuple[str, str], ...] = ()
    handles: OnnxHandles | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def rotations(self) -> int:
        """How many q/k rotations use this encoding: one per rotated q or k tensor (a written-out rotation or a
        RotaryEmbedding node), two per attention node rotating q and k inside (GroupQueryAttention do_rotary)."""
        if self.applications:
            return len(self.applications)
        return sum(2 if n.op_type == "GroupQueryAttention" else 1 for n in self.fused_nodes)

    def computed_handles(self) -> OnnxComputedHandles:
        """The graph handles of computed angles; ValueError for other sources."""
        if not isinstance(self.handles, OnnxComputedHandles):
            raise ValueError(f"a {self.angles.value} RoPE site has no angle computation")
        return self.handles

    def cached_handles(self) -> OnnxCachedHandles:
        """The graph handles of cached tables; ValueError for other sources."""
        if not isinstance(self.handles, OnnxCachedHandles):
            raise ValueError(f"a {self.angles.value} RoPE site has no cached tables")
        return self.handles

    def to_dict(self) -> dict[str, Any]:
        return self.encoding.to_dict(
            rotations=self.rotations,
            cos=self.cos.name,
            sin=self.sin.name,
            inv_freq=None if self.inv_freq_value is None else self.inv_freq_value.name,
        )


__all__ = [
    "AngleSource",
    "AttentionRotary",
    "CachedTable",
    "GridAngles",
    "GridAxes",
    "OnnxAngleHandles",
    "PositionRows",
    "ProbedAngles",
    "ComputedAngles",
    "FusedCaches",
    "InvFreqOrigin",
    "Layout",
    "LengthSelection",
    "OnnxCachedHandles",
    "OnnxComputedHandles",
    "OnnxHandles",
    "OnnxSwitchedCaches",
    "OnnxTableRead",
    "OnnxTrig",
    "PositionDecay",
    "RescaleRecord",
    "RopeApplication",
    "RopeEncoding",
    "RopeEncodingFields",
    "RopeSite",
    "RopeSource",
    "RuntimeInvFreq",
    "SOURCE_KINDS",
    "site_key",
]


def site_key(site: RopeSite) -> tuple[str | None, ...]:
    """A name for a RoPE site that survives rewrites of its angles (rescale, fp32): the inputs of its q/k
    rotations and the names of its fused nodes. Plans made on one detection are found again on a later one
    by this key."""
    return tuple(a.input.name for a in site.applications) + tuple(n.name for n in site.fused_nodes)
