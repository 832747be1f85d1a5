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
``|i - j| >= W`` the query is rotated to position W and the key to position 0.  Leaky ReRoPE with slope 1/k:
beyond W relative positions grow as ``W + (i - j - W) / k``: queries at ``i / k + W (1 - 1/k)``, keys at ``j / k``.

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
    "cli_flags",
    "logn_factor",
    "recommended",
    "rerope",
    "selfextend",
    "selfextend_defaults",
]


@dataclasses.dataclass(frozen=True)
class AttentionExtension:
    """One attention-level method: ``method`` is "self-extend" or "rerope"; ``window`` W; ``group_size`` G
    (SelfExtend); ``leaky`` k (Leaky ReRoPE; None for plain ReRoPE)."""

    method: str
    window: int
    group_size: int | None = None
    leaky: float | None = None

    def __post_init__(self) -> None:
        if self.method not in ("self-extend", "rerope"):
            raise ValueError(f"unknown attention extension {self.method!r}")
        if int(self.window) < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.method == "self-extend":
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
        return self.leaky is None

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
        """Boolean [..., q, k]: where the second score matrix is used (SelfExtend: ``i - j >= W``, the
        paper's ``mask[W:, :-W] -= tril``; ReRoPE: ``|i - j| >= W``, Su's ``rectified_mask``)."""
        d = np.asarray(p_q)[..., :, None] - np.asarray(p_k)[..., None, :]
        if self.method == "self-extend":
            return d >= self.window
        return np.abs(d) >= self.window

    def relative_positions(self, p_q: np.ndarray, p_k: np.ndarray) -> np.ndarray:
        """The relative position [..., q, k] the rotary dot product sees after the rewrite."""
        near = np.asarray(p_q, np.float64)[..., :, None] - np.asarray(p_k, np.float64)[..., None, :]
        far = self.query_positions(p_q)[..., :, None] - self.key_positions(p_k)[..., None, :]
        return np.where(self.use_second(p_q, p_k), far, near)

    def max_relative_position(self, length: int) -> float:
        """Largest relative position seen at ``length`` tokens (positions 0 .. length-1), causal part: the
        query at N-1 against the key at 0 when that pair is beyond the window, else N-1."""
        n = int(length)
        if n - 1 < self.window:
            return float(max(n - 1, 0))
        far = float(self.query_positions(np.array(n - 1)) - self.key_positions(np.array(0)))
        return max(far, float(self.window - 1))

    def describe(self) -> str:
        if self.method == "self-extend":
            return f"self-extend (group size {self.group_size}, window {self.window})"
        if self.leaky is not None:
            return f"leaky rerope (window {self.window}, slope 1/{self.leaky:g})"
        return f"rerope (window {self.window})"


def selfextend(window: int, group_size: int) -> AttentionExtension:
    return AttentionExtension("self-extend", int(window), group_size=int(group_size))


def rerope(window: int, leaky: float | None = None) -> AttentionExtension:
    return AttentionExtension("rerope", int(window), leaky=None if leaky is None else float(leaky))


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


ATTENTION_METHODS = ("self-extend", "rerope", "leaky-rerope")


def recommended(method: str, original: int, target: int) -> dict:
    """Parameters for an attention-level method extending a model trained on ``original`` tokens to ``target``.

    - self-extend: :func:`selfextend_defaults` (W = L/4, the smallest G keeping every relative position < L);
    - rerope: W = L/2 (Su's experiments clip at a fraction of the training length; every relative position is
      then < L at any length);
    - leaky-rerope: W = L/2 and the smallest slope 1/k (k >= 2, one decimal) keeping the largest relative position
      ``W + (N - 1 - W) / k`` below L.
    Returns {"window": W, "group_size": G} or {"window": W, "leaky": k} or {"window": W}.
    """
    L, N = int(original), int(target)
    if method == "self-extend":
        g, w = selfextend_defaults(L, N)
        return {"window": w, "group_size": g}
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
    ext = "self-extend" if method == "self-extend" else "rerope"
    flags = ["--extend", ext, "--window", str(params["window"])]
    if "group_size" in params:
        flags += ["--group-size", str(params["group_size"])]
    if "leaky" in params:
        flags += ["--leaky", f"{params['leaky']:g}"]
    return flags
