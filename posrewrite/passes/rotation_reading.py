"""Reading a rotation from probe matrices, free of any graph: shared by the ONNX side
(`posrewrite.passes.onnx.rope.rotation_probe`) and the torch side (`posrewrite.passes.fx.rotation_probe`).

M [heads, positions, W, W] with y = M(p)·x, measured on unit vectors of x, says which channels rotate together
and with which sign (rotate-half, interleaved, DeepSeek's interleaved-written-de-interleaved, or any other
pairing), which pass through, whether x holds several heads on its last axis, the angle of every pair at every
position, and the magnitude |a|² + |b|² (xPos when it changes with position).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from posrewrite.sites.rope import Layout, PositionDecay


class NotARotation(Exception):
    """A candidate whose cone is not y = a·x + b·P(x); the message is why."""



def _block(m: np.ndarray, width: int, tol: float) -> int:
    """The smallest head width D dividing W such that M is block-diagonal with identical D x D blocks."""
    for d in range(2, width + 1, 2):
        if width % d:
            continue
        blocks = width // d
        ok = True
        mask = np.kron(np.eye(blocks), np.ones((d, d))).astype(bool)
        if np.max(np.abs(m[..., ~mask]), initial=0.0) > 1e-6:
            continue
        first = m[..., :d, :d]
        for b in range(1, blocks):
            s = slice(b * d, (b + 1) * d)
            if np.max(np.abs(m[..., s, s] - first)) > tol * max(1.0, float(np.max(np.abs(first)))):
                ok = False
                break
        if ok:
            return d
    return width



@dataclasses.dataclass(frozen=True)
class MatrixReading:
    """What probe matrices M [heads, positions, W, W] (y = M(p)·x) say, free of any graph: shared by the ONNX
    and the torch.fx side."""

    layout: Layout | None
    rotary_dim: int
    head_dim: int
    heads_in_last_axis: int
    pairs: tuple[tuple[int, int], ...]
    angles: np.ndarray
    magnitude: np.ndarray
    decay: PositionDecay | None





def read_matrices(m_all: np.ndarray, tol: float) -> MatrixReading:
    """Pairing, range, heads, angles and magnitude of probe matrices m_all [heads, positions, W, W]; NotARotation
    with the reason when they are not a rotation. `tol`: relative round-off of the probed dtype."""
    scale = max(1.0, float(np.max(np.abs(m_all))))
    if np.max(np.abs(m_all - m_all[:1])) > tol * scale:
        raise NotARotation("the rotation differs between heads")
    m = m_all[0]  # [P, W, W]
    width = m.shape[-1]
    d = _block(m, width, tol)
    heads = width // d
    m = m[:, :d, :d]
    at0 = m[0]
    # position 0: angle 0, so M(0) is a (scaled) identity on rotated and pass-through channels alike
    diag0 = np.diag(at0)
    relative = m
    if np.max(np.abs(at0 - np.diag(diag0))) > tol * scale:
        out_perm = np.argmax(np.abs(at0), axis=1)
        if (np.max(np.abs(at0[np.arange(d), out_perm])) > 0 and len(set(out_perm.tolist())) == d
                and _is_permutation(at0, out_perm, tol * scale)):
            return _identify_permuted(m, out_perm, d, heads, tol)
        # positions that are an affine map of the index (a phase offset: coordinates from -1 to 1, an offset
        # added to the positions): no probed position has angle 0. The pairing is read from the rotation
        # relative to the first probed position, R(p) = M(0)^-1 M(p) (block rotations on the same pairs
        # commute), the angles and magnitudes from M itself.
        relative = _relative_to_first(m, tol, scale)
    off = relative.copy()
    idx = np.arange(d)
    off[:, idx, idx] = 0.0
    moving = np.max(np.abs(off), axis=0)  # [i, j]
    partner = np.argmax(moving, axis=1)
    strength = moving[idx, partner]
    rotated = strength > 1e-6 * scale
    if not rotated.any():
        raise NotARotation("no channel is mixed with another one")
    # every row mixes with at most one other channel
    second = np.sort(moving, axis=1)[:, -2] if d > 1 else np.zeros(d)
    if np.any(second > tol * scale):
        raise NotARotation("an output channel mixes more than two input channels")
    pairs: list[tuple[int, int]] = []
    for i in np.flatnonzero(rotated):
        j = int(partner[i])
        if not rotated[j] or int(partner[j]) != i:
            raise NotARotation(f"channel {i} is mixed with {j} but not the other way round")
        if i < j:
            # y_i = a x_i - b x_j, y_j = a x_j + b x_i: the coefficient of x_j in y_i is -sin
            first, second_ = (i, j) if _sin_sign(relative, i, j) < 0 else (j, i)
            pairs.append((first, second_))
    return _finish(m, standard_orientation(pairs), d, heads, rotated, scale, tol)


def _is_permutation(at0: np.ndarray, out_perm: np.ndarray, atol: float) -> bool:
    """Whether M(0) holds one non-zero per row at `out_perm` (a channel permutation, possibly scaled)."""
    rest = at0.copy()
    rest[np.arange(at0.shape[0]), out_perm] = 0.0
    return float(np.max(np.abs(rest), initial=0.0)) <= atol


def _relative_to_first(m: np.ndarray, tol: float, scale: float) -> np.ndarray:
    """M(0)^-1 M(p) for every probed position p; NotARotation when M(0) is not invertible (not a rotation)."""
    at0 = m[0]
    try:
        cond = np.linalg.cond(at0)
    except np.linalg.LinAlgError:
        cond = np.inf
    if not np.isfinite(cond) or cond > 1e6:
        raise NotARotation("at position 0 the output is neither a copy of the input nor a rotation of it")
    relative = np.linalg.solve(at0[None], m)
    if np.max(np.abs(relative[0] - np.eye(at0.shape[0]))) > 16 * tol * max(1.0, cond):
        raise NotARotation("at position 0 the output is neither a copy of the input nor a rotation of it")
    return relative


def standard_orientation(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The pairs oriented as rotate-half (i, i + d/2) or interleaved (2i, 2i + 1) where they are those pairs with
    some of them reversed. A reversed pair is the same rotation by the opposite angle: at integer positions a
    frequency above pi per position aliases to a negative step (rotary-embedding-torch's pixel frequencies), so
    the direction read from one position says nothing; the angles, read from the cone, keep their sign."""
    unordered = sorted(tuple(sorted(p)) for p in pairs)
    rd = 2 * len(pairs)
    half = rd // 2
    for standard in ([(i, i + half) for i in range(half)], [(i, i + 1) for i in range(0, rd, 2)]):
        if unordered == standard:
            return list(standard)
    return list(pairs)


def _sin_sign(m: np.ndarray, i: int, j: int) -> float:
    """Sign of the coefficient of x_j in y_i at the first probed position where it is not 0 (position 1: angle
    pos·f with f > 0 small enough that sin > 0)."""
    col = m[:, i, j]
    k = int(np.argmax(np.abs(col) > 1e-9))
    return float(np.sign(col[k]))


def _finish(m, pairs, d, heads, rotated, scale, tol) -> MatrixReading:
    pairs.sort(key=lambda p: min(p))
    firsts = [p[0] for p in pairs]
    seconds = [p[1] for p in pairs]
    rot_channels = sorted(firsts + seconds)
    rd = len(rot_channels)
    passing = [c for c in range(d) if not rotated[c]]
    if passing:
        ident = m[:, passing, :][:, :, passing]
        if np.max(np.abs(ident - np.eye(len(passing))[None])) > tol * scale:
            raise NotARotation("channels that do not rotate are not passed through unchanged")
    layout = None
    half = rd // 2
    if rot_channels == list(range(rd)):
        if firsts == list(range(half)) and seconds == list(range(half, rd)):
            layout = Layout.ROTATE_HALF
        elif firsts == list(range(0, rd, 2)) and seconds == list(range(1, rd, 2)):
            layout = Layout.INTERLEAVED
    f, s = np.array(firsts), np.array(seconds)
    a = m[:, f, f]
    b = m[:, s, f]  # coefficient of x_first in y_second: +sin
    if np.max(np.abs(m[:, s, s] - a)) > tol * scale or np.max(np.abs(m[:, f, s] + b)) > tol * scale:
        raise NotARotation("paired channels are not rotated by one angle (not a rotation)")
    angles = np.unwrap(np.arctan2(b, a), axis=0)
    magnitude = a * a + b * b
    return MatrixReading(layout=layout, rotary_dim=rd, head_dim=d, heads_in_last_axis=heads,
                         pairs=tuple((int(p), int(q)) for p, q in pairs), angles=angles, magnitude=magnitude,
                         decay=_decay(magnitude, tol))


def _identify_permuted(m, out_perm, d, heads, tol) -> MatrixReading:
    """y = Q·R(p)·x with Q a channel permutation (DeepSeek's interleave written as even/odd slices and a
    concatenation of halves): read R from the rows put back in input order."""
    inverse = np.empty(d, dtype=np.int64)
    inverse[out_perm] = np.arange(d)  # output row holding input channel c's copy
    r = m[:, inverse, :]  # rows in input order: r[c] = row of y that equals x_c at position 0
    inner = identify_matrix(r)
    if inner is None:
        raise NotARotation("a permuted output that is not a permuted rotation")
    pairs, layout = inner
    rd = 2 * len(pairs)
    is_interleaved_to_half = (
        layout == Layout.INTERLEAVED
        and list(out_perm[: rd // 2]) == list(range(0, rd, 2))
        and list(out_perm[rd // 2: rd]) == list(range(1, rd, 2))
        and list(out_perm[rd:]) == list(range(rd, d))
    )
    f, s = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    a, b = r[:, f, f], r[:, s, f]
    angles = np.unwrap(np.arctan2(b, a), axis=0)
    magnitude = a * a + b * b
    return MatrixReading(layout=Layout.INTERLEAVED_TO_HALF if is_interleaved_to_half else None, rotary_dim=rd,
                         head_dim=d, heads_in_last_axis=heads, pairs=tuple(pairs), angles=angles,
                         magnitude=magnitude, decay=_decay(magnitude, tol))


def identify_matrix(m: np.ndarray) -> tuple[list[tuple[int, int]], Layout | None] | None:
    """Pairs and layout of rotation matrices m [P, d, d] (rows = outputs in input order); None if not one."""
    d = m.shape[-1]
    scale = max(1.0, float(np.max(np.abs(m))))
    idx = np.arange(d)
    off = m.copy()
    off[:, idx, idx] = 0.0
    moving = np.max(np.abs(off), axis=0)
    partner = np.argmax(moving, axis=1)
    rotated = moving[idx, partner] > 1e-6 * scale
    pairs = []
    for i in np.flatnonzero(rotated):
        j = int(partner[i])
        if int(partner[j]) != i:
            return None
        if i < j:
            pairs.append((i, j) if _sin_sign(m, i, j) < 0 else (j, i))
    pairs = standard_orientation(sorted(pairs, key=lambda p: min(p)))
    rd = 2 * len(pairs)
    firsts, seconds = [p[0] for p in pairs], [p[1] for p in pairs]
    layout = None
    if firsts == list(range(0, rd, 2)) and seconds == list(range(1, rd, 2)):
        layout = Layout.INTERLEAVED
    elif firsts == list(range(rd // 2)) and seconds == list(range(rd // 2, rd)):
        layout = Layout.ROTATE_HALF
    return [(int(a), int(b)) for a, b in pairs], layout


def _decay(magnitude: np.ndarray, tol: float) -> PositionDecay | None:
    """xPos: |a|² + |b|² = ζ_c^(2 (p - p0)/γ) changes with position. Fit log r_c(p) = k_c (p - p0) + log r_c(p0)
    per pair; None when the magnitude is constant (a plain attention factor)."""
    r = np.sqrt(np.maximum(magnitude, 1e-300))
    if np.max(np.abs(r - r[:1])) <= 4 * tol * max(1.0, float(np.max(r))):
        return None
    logs = np.log(r)
    pos = np.arange(r.shape[0], dtype=np.float64)
    pc = pos - pos.mean()
    rate = (pc @ (logs - logs.mean(axis=0))) / (pc @ pc)  # per pair: d log r / d position
    fitted = logs.mean(axis=0) + np.outer(pc, rate)
    if np.max(np.abs(fitted - logs)) > max(1e-4, 4 * tol):
        raise NotARotation("the rotation's magnitude changes with position, but not exponentially (not xPos)")
    # log r(p) = rate (p - p0): p0 = position where the magnitude is 1
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(np.abs(rate) > 0, -(logs[0]) / rate, 0.0)
    return PositionDecay(log_rate=rate.astype(np.float64), zero_position=float(np.median(p0)),
                         probed_length=int(r.shape[0]))


def probed_site_facts(decays: list[PositionDecay], rotations: int, heads: set[int], head_dim: int | None,
                      refuse: type[Exception]) -> tuple[PositionDecay | None, list[str]]:
    """What probing read of a site's rotations, shared by the ONNX and fx detectors: the site's xPos decay (q's,
    whose scale shrinks with position: ζ < 1; k's is its inverse) with its note, and a note for rotations applied
    per head on a [.., H·D] activation. `decays` of the site's `rotations`: all or none carry one (else `refuse`)."""
    notes: list[str] = []
    decay = None
    if decays:
        if len(decays) != rotations:
            raise refuse("xPos decay on some rotations of a site but not on others")
        on_q = [d for d in decays if float(np.mean(d.log_rate)) < 0]  # q: zeta^((p - p0)/gamma), zeta < 1
        decay = on_q[0] if on_q else decays[0]
        gamma = decay.scale_base
        notes.append("xPos: rotation scaled by zeta^((p - p0)/gamma) on q and its inverse on k"
                     + (f" (paper zeta, gamma = {gamma:g})" if gamma else "")
                     + ("; p0 = length // 2" if decay.length_centred else ""))
    if heads:
        notes.append(f"rotation applied per head on a [.., {max(heads)}x{head_dim}] activation")
    return decay, notes

