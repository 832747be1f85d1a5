"""Position maps of the attention-level extension methods (numpy only).

Frequency methods (``posrewrite.math.rope``) change cos/sin.  The methods here keep RoPE as trained and change
which relative positions attention sees; each needs a second score matrix computed from other positions,
merged with the normal one by distance before the softmax.  Every method is described by three maps, each
applied to position ids:

- ``query_positions(p)``: the positions the second rotation of q uses,
- ``key_positions(p)``: the positions the second rotation of k uses,
- ``use_second(p_q, p_k)``: where the second score matrix replaces the normal one.

so that for a query at i and a key at j the rotary dot product sees the relative position
``query_positions(i) - key_positions(j)`` wherever ``use_second(i, j)``, and ``i - j`` elsewhere.

SelfExtend (Jin et al. 2024, arXiv 2401.01325, Algorithm 1): neighbour window W, group size G.  Keys at distance
``i - j >= W`` are attended with grouped positions: keys at ``j // G``, queries at ``i // G + (W - W // G)``, so
that grouped relative positions continue the neighbour ones at the window edge.

ReRoPE (Su 2023, kexue.fm/archives/9708 and github.com/bojone/rerope): relative positions clipped at W: where
``i - j >= W`` the query is rotated to position W and the key to position 0 (Su's mask is ``|i - j| >= W``; the keys
W or more after a query are masked in causal attention, and keep the model's own scores here).  Leaky ReRoPE with
slope 1/k:
beyond W relative positions grow as ``W + (i - j - W) / k``: queries at ``i / k + W (1 - 1/k)``, keys at ``j / k``.

Dual Chunk Attention (An et al. 2024, arXiv 2402.17463, Sec. 3; Qwen2.5-1M's ``dual_chunk_attention_config``
``chunk_size`` C and ``local_size`` W): the sequence is cut into chunks of s = C - W tokens; every key sits at its
index in its chunk, ``j mod s``; a query attends to keys of its own chunk at ``i mod s`` (intra-chunk: the relative
position is ``i - j``, the model's own attention), to keys of the chunk before it at ``min(s + i mod s, C)``
(successive-chunk: the true distance for the first W tokens of a chunk, then clipped), and to keys of earlier
chunks at the constant C (inter-chunk).  C plays the paper's ``c - 1`` (the largest trained position): every
relative position is at most C.  Two extra score matrices (successive and inter), selected by the chunk distance
``i // s - j // s`` (1, and 2 or more); the model's own scores stay in each chunk.

log-n scaling (Su 2021 "entropy invariance", kexue.fm/archives/8823; Qwen-1 ``use_logn_attn``): the query at
0-based position p is multiplied by ``log(p + 1) / log(L)`` when ``p + 1 > L``, else 1 (Qwen's
``logn_list = [math.log(i, seq_length) if i > seq_length else 1 for i in range(1, 32768)]`` indexed by the
1-based position; Su's rerope patch uses ``clip(log(position_ids + 1) / log(L), 1)``, the same numbers).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "ATTENTION_METHODS",
    "AttentionExtension",
    "Branch",
    "PositionMap",
    "Region",
    "dual_chunk",
    "cli_flags",
    "logn_factor",
    "recommended",
    "rerope",
    "selfextend",
    "selfextend_defaults",
]


@dataclasses.dataclass(frozen=True)
class PositionMap:
    """A map of position ids as a sequence of elementwise steps, each ``(op, constant)``: "floordiv" (p // n),
    "mod" (p mod n, n > 0, for p >= 0), "mul", "add", "min".  The numpy evaluation here and the ONNX rewrite
    build the same steps, so one description serves both."""

    steps: tuple[tuple[str, float], ...] = ()

    @property
    def integer(self) -> bool:
        """True when integer positions stay integers (the map can index cached cos/sin rows)."""
        return all(op in ("floordiv", "mod") or float(c).is_integer() for op, c in self.steps)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        x = np.asarray(p, np.float64)
        for op, c in self.steps:
            if op == "floordiv":
                x = np.floor(x / c)
            elif op == "mod":
                x = x - np.floor(x / c) * c
            elif op == "mul":
                x = x * c
            elif op == "add":
                x = x + c
            elif op == "min":
                x = np.minimum(x, c)
            else:
                raise ValueError(f"unknown position map step {op!r}")
        return x

    @staticmethod
    def affine(a: float, b: float, divisor: int = 1) -> PositionMap:
        """``(p // divisor) * a + b`` (only the steps that change something)."""
        steps: list[tuple[str, float]] = []
        if divisor != 1:
            steps.append(("floordiv", int(divisor)))
        if a != 1.0:
            steps.append(("mul", a))
        if b != 0.0 or a == 0.0:
            steps.append(("add", b))
        return PositionMap(tuple(steps))


@dataclasses.dataclass(frozen=True)
class Region:
    """Where a branch's scores replace the ones before it, as a function of query and key positions i, j:
    "distance_ge" ``i - j >= n``; "chunk_eq" ``i // n - j // n == k``; "chunk_ge" ``i // n - j // n >= k``.
    Every kind is a band below the diagonal (keys before the query), so :meth:`box` bounds it."""

    kind: str
    n: int
    k: int = 0

    def __call__(self, p_q: np.ndarray, p_k: np.ndarray) -> np.ndarray:
        q = np.asarray(p_q, np.float64)[..., :, None]
        kk = np.asarray(p_k, np.float64)[..., None, :]
        if self.kind == "distance_ge":
            return q - kk >= self.n
        chunks = np.floor(q / self.n) - np.floor(kk / self.n)
        if self.kind == "chunk_eq":
            return chunks == self.k
        if self.kind == "chunk_ge":
            return chunks >= self.k
        raise ValueError(f"unknown region {self.kind!r}")

    # -- the box that holds the region (pure arithmetic: the ONNX rewrite builds the same steps) ---------------
    @property
    def reach(self) -> int:
        """k in ``coordinate(i) - coordinate(j) >= k``, which every pair of the region meets (n for the distance
        regions, the chunk distance k for the chunk ones)."""
        return int(self.n) if self.kind == "distance_ge" else int(self.k)

    def coordinate(self, p: float) -> float:
        """The position as the region compares it: p itself (distance regions) or its chunk ``floor(p / n)``."""
        return float(p) if self.kind == "distance_ge" else float(math.floor(p / self.n))

    def box(self, min_key: float, max_query: float) -> tuple[float, float]:
        """(c_q, c_k): every pair (i, j) of the region with key positions >= ``min_key`` and query positions <=
        ``max_query`` has ``coordinate(i) >= c_q`` and ``coordinate(j) <= c_k``, so the region lies in the box of
        those queries (rows) and keys (columns); outside it the scores are the ones before this branch.

        From ``coordinate(i) - coordinate(j) >= reach`` and the coordinate growing with the position:
        ``coordinate(i) >= coordinate(min_key) + reach`` and ``coordinate(j) <= coordinate(max_query) - reach``.
        SelfExtend (i - j >= W): queries at W or more past the first key, keys at W or more before the last
        query. Dual Chunk (chunk distance k, chunks of s): queries from chunk k after the first key's chunk on,
        keys up to chunk k before the last query's."""
        return self.coordinate(min_key) + self.reach, self.coordinate(max_query) - self.reach


@dataclasses.dataclass(frozen=True)
class Branch:
    """One extra score matrix: q rotated at ``query(i)``, k at ``key(j)``, used where ``region(i, j)``."""

    query: PositionMap
    key: PositionMap
    region: Region


@dataclasses.dataclass(frozen=True)
class AttentionExtension:
    """One attention-level method: ``method`` is "self-extend", "rerope" or "dual-chunk"; ``window`` W (for
    dual-chunk: the local size); ``group_size`` G (SelfExtend); ``leaky`` k (Leaky ReRoPE; None for plain ReRoPE);
    ``chunk_size`` C (dual-chunk)."""

    method: str
    window: int
    group_size: int | None = None
    leaky: float | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in ("self-extend", "rerope", "dual-chunk"):
            raise ValueError(f"unknown attention extension {self.method!r}")
        if int(self.window) < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.method != "dual-chunk" and self.chunk_size is not None:
            raise ValueError("--chunk-size belongs to dual-chunk")
        if self.method == "dual-chunk":
            if self.group_size is not None or self.leaky is not None:
                raise ValueError("--group-size / --leaky do not belong to dual-chunk")
            if self.chunk_size is None or int(self.chunk_size) <= int(self.window):
                raise ValueError(f"dual-chunk needs a chunk size C > the local size W ({self.window}), got "
                                 f"{self.chunk_size}")
        elif self.method == "self-extend":
            if self.group_size is None or int(self.group_size) < 1:
                raise ValueError("self-extend needs a group size >= 1")
            if self.leaky is not None:
                raise ValueError("--leaky belongs to rerope, not self-extend")
        else:
            if self.group_size is not None:
                raise ValueError("--group-size belongs to self-extend, not rerope")
            if self.leaky is not None and not float(self.leaky) > 1.0:
                raise ValueError(f"leaky ReRoPE needs k > 1 (slope 1/k), got {self.leaky}")

    # -- the maps (numpy; the ONNX rewrite builds the same arithmetic from these coefficients) ----------------
    @property
    def integer_positions(self) -> bool:
        """True when the second positions are integers (they can index cached cos/sin tables)."""
        return all(b.query.integer and b.key.integer for b in self.branches())

    @property
    def chunk_length(self) -> int | None:
        """dual-chunk: s = C - W, the tokens of one chunk."""
        return int(self.chunk_size) - int(self.window) if self.method == "dual-chunk" else None

    @property
    def unchanged_length(self) -> int:
        """Up to this many tokens (positions 0 .. n-1) the model computes what it computed before."""
        return self.chunk_length if self.method == "dual-chunk" else int(self.window)

    def branches(self) -> tuple[Branch, ...]:
        """The extra score matrices, in the order they are merged (a later region wins); the model's own scores
        are used wherever no region holds."""
        if self.method == "dual-chunk":
            s, c = self.chunk_length, int(self.chunk_size)
            key = PositionMap((("mod", s),))
            succ = PositionMap((("mod", s), ("add", s), ("min", c)))
            inter = PositionMap((("mul", 0.0), ("add", c)))
            return (Branch(succ, key, Region("chunk_eq", s, 1)), Branch(inter, key, Region("chunk_ge", s, 2)))
        region = Region("distance_ge", int(self.window))
        return (Branch(PositionMap.affine(*self.query_affine()), PositionMap.affine(*self.key_affine()), region),)

    def query_affine(self) -> tuple[float, float, int]:
        """(a, b, divisor) with second query position ``(p // divisor) * a + b`` (divisor 1 = no flooring)."""
        if self.method == "self-extend":
            g, w = int(self.group_size), int(self.window)
            return 1.0, float(w - w // g), g
        if self.leaky is None:
            return 0.0, float(self.window), 1
        k = float(self.leaky)
        return 1.0 / k, float(self.window) * (1.0 - 1.0 / k), 1

    def key_affine(self) -> tuple[float, float, int]:
        """(a, b, divisor) with second key position ``(p // divisor) * a + b``."""
        if self.method == "self-extend":
            return 1.0, 0.0, int(self.group_size)
        if self.leaky is None:
            return 0.0, 0.0, 1
        return 1.0 / float(self.leaky), 0.0, 1

    @staticmethod
    def _apply(p: np.ndarray, affine: tuple[float, float, int]) -> np.ndarray:
        a, b, div = affine
        p = np.asarray(p)
        base = np.floor_divide(p, div) if div != 1 else p
        return base.astype(np.float64) * a + b

    def query_positions(self, p: np.ndarray) -> np.ndarray:
        return self._apply(p, self.query_affine())

    def key_positions(self, p: np.ndarray) -> np.ndarray:
        return self._apply(p, self.key_affine())

    def use_second(self, p_q: np.ndarray, p_k: np.ndarray) -> np.ndarray:
        """Boolean [..., q, k]: where an extra score matrix is used (SelfExtend: ``i - j >= W``, the
        paper's ``mask[W:, :-W] -= tril``; ReRoPE: ``i - j >= W``, the causal part of Su's ``rectified_mask``
        ``|i - j| >= W``: keys W or more after the query, which causal attention masks, keep the model's own
        scores; dual-chunk: keys of an earlier chunk)."""
        out = np.zeros(np.broadcast_shapes(np.shape(p_q)[:-1], np.shape(p_k)[:-1]) +
                       (np.shape(p_q)[-1], np.shape(p_k)[-1]), bool)
        for b in self.branches():
            out |= b.region(p_q, p_k)
        return out

    def relative_positions(self, p_q: np.ndarray, p_k: np.ndarray) -> np.ndarray:
        """The relative position [..., q, k] the rotary dot product sees after the rewrite."""
        rel = np.asarray(p_q, np.float64)[..., :, None] - np.asarray(p_k, np.float64)[..., None, :]
        for b in self.branches():
            far = b.query(p_q)[..., :, None] - b.key(p_k)[..., None, :]
            rel = np.where(b.region(p_q, p_k), far, rel)
        return rel

    def max_relative_position(self, length: int) -> float:
        """Largest relative position seen at ``length`` tokens (positions 0 .. length-1), causal part: the
        query at N-1 against the key at 0 when that pair is beyond the window, else N-1."""
        n = int(length)
        if self.method == "dual-chunk":
            s, c = self.chunk_length, int(self.chunk_size)
            if n <= s:
                return float(max(n - 1, 0))
            if n <= 2 * s:  # successive chunk: min(s + i mod s, C) - j mod s, largest at j mod s = 0
                return float(max(s - 1, min(n - 1, c)))
            return float(max(min(2 * s - 1, c), c))  # inter-chunk: C
        if n - 1 < self.window:
            return float(max(n - 1, 0))
        far = float(self.query_positions(np.array(n - 1)) - self.key_positions(np.array(0)))
        return max(far, float(self.window - 1))

    def describe(self) -> str:
        if self.method == "dual-chunk":
            return f"dual-chunk (chunk size {self.chunk_size}, local size {self.window})"
        if self.method == "self-extend":
            return f"self-extend (group size {self.group_size}, window {self.window})"
        if self.leaky is not None:
            return f"leaky rerope (window {self.window}, slope 1/{self.leaky:g})"
        return f"rerope (window {self.window})"


def selfextend(window: int, group_size: int) -> AttentionExtension:
    return AttentionExtension("self-extend", int(window), group_size=int(group_size))


def rerope(window: int, leaky: float | None = None) -> AttentionExtension:
    return AttentionExtension("rerope", int(window), leaky=None if leaky is None else float(leaky))


def dual_chunk(chunk_size: int, local_size: int) -> AttentionExtension:
    return AttentionExtension("dual-chunk", int(local_size), chunk_size=int(chunk_size))


def selfextend_defaults(original: int, target: int) -> tuple[int, int]:
    """(group size G, window W) so that SelfExtend covers ``target`` tokens of a model trained on ``original``.

    The paper's condition (Sec. 3.2): the largest relative position, ``(N - 1) // G + W - W // G``, must stay
    below the trained length L.  Its settings keep W a fraction of L (Llama-2 4k: W 1024, G 8 for 16k); here
    W = L / 4 and the smallest G that meets the condition.
    """
    L, N = int(original), int(target)
    w = max(1, L // 4)
    for g in range(1, max(N, 1) + 1):
        if selfextend(w, g).max_relative_position(N) <= L - 1:
            return g, w
    return max(N, 1), w


def logn_factor(positions: np.ndarray, original: int) -> np.ndarray:
    """Per-query factor ``max(1, log(p + 1) / log(L))`` for 0-based positions p (Qwen-1's logn_list)."""
    L = int(original)
    if L < 2:
        raise ValueError(f"log-n scaling needs a trained length >= 2, got {L}")
    n = np.asarray(positions, dtype=np.float64) + 1.0
    return np.maximum(1.0, np.log(np.maximum(n, 1.0)) / math.log(L))


ATTENTION_METHODS = ("self-extend", "rerope", "leaky-rerope", "dual-chunk")


def recommended(method: str, original: int, target: int) -> dict:
    """Parameters for an attention-level method extending a model trained on ``original`` tokens to ``target``.

    - self-extend: :func:`selfextend_defaults` (W = L/4, the smallest G keeping every relative position < L);
    - rerope: W = L/2 (Su's experiments clip at a fraction of the training length; every relative position is
      then < L at any length);
    - dual-chunk: chunk size C = 3L/4 and local size W = L/8 (the paper's released settings), any length;
    - leaky-rerope: W = L/2 and the smallest slope 1/k (k >= 2, one decimal) keeping the largest relative position
      ``W + (N - 1 - W) / k`` below L.
    Returns {"window": W, "group_size": G} or {"window": W, "leaky": k} or {"window": W} or {"chunk_size": C,
    "local_size": W}.
    """
    L, N = int(original), int(target)
    if method == "self-extend":
        g, w = selfextend_defaults(L, N)
        return {"window": w, "group_size": g}
    if method == "dual-chunk":
        # ChunkLlama's settings (An et al. 2024): chunk size 3L/4, local window L/8; every relative position <= C
        return {"chunk_size": max(2, 3 * L // 4), "local_size": max(1, L // 8)}
    w = max(1, L // 2)
    if method == "rerope":
        return {"window": w}
    if method == "leaky-rerope":
        need = (N - 1 - w) / max(L - 1 - w, 1)
        k = max(2.0, math.ceil(need * 10) / 10)
        return {"window": w, "leaky": k}
    raise ValueError(f"unknown attention method {method!r}")


def cli_flags(method: str, params: dict) -> list[str]:
    """The posrewrite flags of an attention-level method with ``params`` from :func:`recommended`."""
    if method == "dual-chunk":
        return ["--extend", "dual-chunk", "--chunk-size", str(params["chunk_size"]), "--local-size",
                str(params["local_size"])]
    ext = "self-extend" if method == "self-extend" else "rerope"
    flags = ["--extend", ext, "--window", str(params["window"])]
    if "group_size" in params:
        flags += ["--group-size", str(params["group_size"])]
    if "leaky" in params:
        flags += ["--leaky", f"{params['leaky']:g}"]
    return flags
