"""``posrewrite plot``: what a RoPE rescaling does to the frequencies, drawn for people new to RoPE.

Three panels, each before (and after) the rewrite:

1. wavelength of every rotary frequency pair, 2*pi / theta_i (in tokens), against the original (training) and
   the target context: pairs whose wavelength exceeds the training length never completed a turn in training,
   so positions past it give them angles the model has not seen (what rescaling methods fix);
2. the long-term decay of RoPE (Su et al. 2021, RoFormer section 3.4.3): the relative upper bound of q.k over
   relative distance m, (1/(d/2)) sum_{j=1..d/2} |sum_{i<j} exp(i m theta_i)|, normalised to 1 at m = 0 (the
   rewrite's attention factor f multiplies it by f^2, as HF multiplies cos and sin by f);
3. B(m) = sum_i cos(m theta_i) / (d/2), the criterion of Men et al. 2024 (arXiv 2405.14591): the context a RoPE
   supports ends where B(m) first turns negative (see ``posrewrite advise``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from posrewrite.math import base_bound

__all__ = ["PlotResult", "wavelengths", "decay_curve", "plot_rope", "plot_model", "plot", "rewrite_label"]

_MAX_POINTS = 4000  # distances drawn per curve


def wavelengths(inv_freq: np.ndarray) -> np.ndarray:
    """2*pi / theta_i, float64 (tokens per full turn of pair i)."""
    return 2.0 * math.pi / np.asarray(inv_freq, dtype=np.float64).reshape(-1)


def decay_curve(inv_freq: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Su's relative upper bound of |q.k| at each distance: mean_j |S_j(m)|, S_j = sum_{i<j} e^{i m theta_i}
    (j = 1..d/2), divided by its value at m = 0 ((d/2 + 1) / 2)."""
    theta = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    m = np.asarray(distances, dtype=np.float64).reshape(-1)
    out = np.empty(m.size)
    k = theta.size
    for s in range(0, m.size, 2048):
        ang = np.outer(m[s : s + 2048], theta)
        partial = np.cumsum(np.cos(ang), axis=1) + 1j * np.cumsum(np.sin(ang), axis=1)
        out[s : s + 2048] = np.abs(partial).mean(axis=1)
    return out / ((k + 1) / 2.0)


def _distances(n: int) -> np.ndarray:
    if n <= _MAX_POINTS:
        return np.arange(n + 1, dtype=np.int64)
    return np.unique(np.linspace(0, n, _MAX_POINTS + 1).round().astype(np.int64))


@dataclasses.dataclass
class PlotResult:
    path: str
    rotary_dim: int
    original_context: int
    target_context: int
    wavelengths_before: np.ndarray
    wavelengths_after: np.ndarray | None
    attention_factor: float
    label_after: str | None
    lines: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rotary_dim": self.rotary_dim,
            "original_context": self.original_context,
            "target_context": self.target_context,
            "wavelengths_before": [float(x) for x in self.wavelengths_before],
            "wavelengths_after": None if self.wavelengths_after is None else [float(x) for x in self.wavelengths_after],
            "attention_factor": self.attention_factor,
            "after": self.label_after,
            "lines": list(self.lines),
        }


def _count_long(wl: np.ndarray, n: int) -> int:
    return int(np.sum(wl > n))


def plot_rope(
    inv_freq: np.ndarray,
    *,
    original_context: int,
    target_context: int,
    scaled_inv_freq: np.ndarray | None = None,
    attention_factor: float = 1.0,
    out_png: str | os.PathLike,
    title: str | None = None,
    label_after: str | None = None,
) -> PlotResult:
    """Draw the three panels for ``inv_freq`` (and ``scaled_inv_freq`` when given) into ``out_png``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    inv = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
    k = inv.size
    dim = 2 * k
    L, T = int(original_context), int(target_context)
    wl = wavelengths(inv)
    after = None if scaled_inv_freq is None else np.asarray(scaled_inv_freq, dtype=np.float64).reshape(-1)
    wl_after = None if after is None else wavelengths(after)
    label_after = label_after or "after rewrite"

    fig, axes = plt.subplots(3, 1, figsize=(9, 12), constrained_layout=True)
    fig.suptitle(title or f"RoPE, rotary dim {dim}: training context {L:,}, target context {T:,}", fontsize=13)

    # 1: wavelengths
    ax = axes[0]
    idx = np.arange(k)
    ax.semilogy(idx, wl, "o-", ms=4, label="before (original model)", color="tab:blue")
    if wl_after is not None:
        ax.semilogy(idx, wl_after, "s-", ms=4, label=label_after, color="tab:orange")
    ax.axhline(L, color="tab:green", ls="--", lw=1.2, label=f"training context {L:,}")
    if T != L:
        ax.axhline(T, color="tab:red", ls=":", lw=1.5, label=f"target context {T:,}")
    ax.set_xlabel("frequency pair i (0 = fastest)")
    ax.set_ylabel("wavelength 2\u03c0/\u03b8\u1d62 (tokens)")
    ax.set_title(
        "1. Wavelength of each rotary pair. Above the green line a pair never made a full turn in "
        "training;\nbetween green and red it would see angles beyond the trained range at the target length",
        fontsize=9.5,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper left")

    # 2: long-term decay
    ax = axes[1]
    n = int(math.ceil(max(T, L) * 1.25))
    m = _distances(n)
    ax.plot(m, decay_curve(inv, m), lw=0.8, label="before", color="tab:blue")
    if after is not None:
        ax.plot(
            m,
            decay_curve(after, m) * attention_factor**2,
            lw=0.8,
            alpha=0.85,
            color="tab:orange",
            label=label_after
            + (f" (\u00d7 attention factor\u00b2 = {attention_factor**2:.3f})" if attention_factor != 1.0 else ""),
        )
    ax.axvline(L, color="tab:green", ls="--", lw=1.2, label=f"training context {L:,}")
    if T != L:
        ax.axvline(T, color="tab:red", ls=":", lw=1.5, label=f"target context {T:,}")
    ax.set_xlabel("relative distance m (tokens)")
    ax.set_ylabel("relative upper bound of q\u00b7k")
    ax.set_title(
        "2. Long-term decay (Su et al. 2021): upper bound of |q\u00b7k| as the distance grows "
        "(1 = distance 0);\n"
        "RoPE lets far tokens weigh less. Interpolating rewrites stretch this curve toward the target length",
        fontsize=9.5,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper right")

    # 3: base-bound criterion
    ax = axes[2]
    b_before = base_bound.bound_curve(inv, n + 1)[m] / k
    ax.plot(m, b_before, lw=0.8, color="tab:blue", label="before")
    if after is not None:
        ax.plot(
            m, base_bound.bound_curve(after, n + 1)[m] / k, lw=0.8, alpha=0.85, color="tab:orange", label=label_after
        )
    ax.axhline(0, color="black", lw=1)
    ax.axvline(L, color="tab:green", ls="--", lw=1.2, label=f"training context {L:,}")
    if T != L:
        ax.axvline(T, color="tab:red", ls=":", lw=1.5, label=f"target context {T:,}")
    ax.set_xlabel("relative distance m (tokens)")
    ax.set_ylabel("B(m) / (d/2)")
    ax.set_title(
        "3. Base-bound criterion (Men et al. 2024): B(m) = \u03a3\u1d62 cos(m\u03b8\u1d62) must stay \u2265 0 "
        "up to the context length",
        fontsize=9.5,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper right")

    out = Path(out_png)
    _save_figure(fig, out)
    plt.close(fig)

    first_b = base_bound.first_negative(inv, n)
    lines = [
        f"wrote {out}",
        f"rotary dim {dim}: wavelengths {wl.min():.4g} .. {wl.max():.4g} tokens; {_count_long(wl, L)} of {k} pairs"
        f" exceed the training context {L:,}" + (f", {_count_long(wl, T)} the target {T:,}" if T != L else ""),
        "before: B(m) >= 0 up to m = " + (f"{n:,}+" if first_b is None else f"{first_b - 1:,}"),
    ]
    if after is not None:
        first_a = base_bound.first_negative(after, n)
        lines.append(
            f"{label_after}: wavelengths {wl_after.min():.4g} .. {wl_after.max():.4g} tokens; "
            f"{_count_long(wl_after, T)} of {k} pairs exceed the target {T:,}; "
            f"attention factor {attention_factor:.4g}; "
            "B(m) >= 0 up to m = " + (f"{n:,}+" if first_a is None else f"{first_a - 1:,}")
        )
    return PlotResult(
        str(out), dim, L, T, wl, wl_after, float(attention_factor), None if after is None else label_after, lines
    )


def _save_figure(fig, out: Path) -> None:
    """The output protocol of posrewrite.io for a picture: only a new path or a regular file is replaced, the
    folder must exist, the file is written beside and renamed into place, and a failure leaves nothing."""
    import tempfile

    from posrewrite.errors import OutputError
    from posrewrite.io.output import check_output_path, current_umask

    out = check_output_path(out)
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-", suffix=out.suffix or ".png")
        os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, out)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
        raise


def plot_model(
    path: str | os.PathLike,
    out_png: str | os.PathLike,
    rope_params: dict | None = None,
    *,
    original_context: int | None = None,
    target_context: int | None = None,
) -> PlotResult:
    """:func:`plot_rope` for the (first) RoPE of the ONNX model at ``path``.

    ``rope_params`` (HF ``rope_parameters``, e.g. ``{"rope_type": "yarn", "factor": 4,
    "original_max_position_embeddings": 128}``) is the planned rewrite drawn as "after".  The training length
    comes from ``original_context``, else the rope_params' ``original_max_position_embeddings``, else the
    model's cos/sin cache length; the target from ``target_context``, else factor x training length.
    """
    from posrewrite import api
    from posrewrite.math import rope as rope_math

    found = api.inspect(path)
    sites = [s for s in found.sites if getattr(s, "kind", None) == "rope" and getattr(s, "inv_freq", None) is not None]
    if not sites:
        from posrewrite import errors

        raise errors.NoEncodingError(f"{path}: no RoPE with readable frequencies found")
    site = sites[0]
    inv = np.asarray(site.inv_freq, dtype=np.float64)
    dim = int(site.rotary_dim)
    rp = dict(rope_params) if rope_params else None
    L = original_context or (rp or {}).get("original_max_position_embeddings") or site.max_positions
    assumed = ""
    if L is None:  # what an earlier posrewrite rescale recorded, else config.json beside the model
        from posrewrite import provenance
        from posrewrite.config import read_config_json

        recorded = provenance.last_rescale(found.rewrites) or {}
        L = recorded.get("original_max_position_embeddings") or (read_config_json(path) or {}).get(
            "max_position_embeddings")
    if L is None and not rp:  # frequencies alone: the context lines are drawn at an assumed length, and say so
        L, assumed = 4096, " (assumed: pass --original-max-positions)"
    if L is None:
        from posrewrite import errors

        raise errors.UsageError(
            f"{path}: the training context length is not in the graph; pass --original-max-positions"
        )
    L = int(L)
    scaled, att, label = None, 1.0, None
    factor = 1.0
    if rp:
        rp.setdefault("original_max_position_embeddings", L)
        params = rope_math.RopeParameters.from_hf(rp)
        factor = params.effective_factor()
        T = int(target_context or params.target_length() or round(factor * L))
        scaled, att = rope_math.scaled_inv_freq(
            params, inv_freq=inv.astype(np.float32), base=site.base, dim=dim, seq_len=T
        )
        label = rewrite_label(params, T)
    else:
        T = int(target_context or L)
    base = "not geometric" if site.base is None else f"base {site.base:g}"
    title = (f"{Path(path).name}: RoPE {base}, rotary dim {dim}; training context {L:,}{assumed} \u2192 "
             f"target {T:,}")
    res = plot_rope(
        inv,
        original_context=L,
        target_context=T,
        scaled_inv_freq=scaled,
        attention_factor=att,
        out_png=out_png,
        title=title,
        label_after=label,
    )
    return res


def rewrite_label(params, runtime_length: int | None = None) -> str:
    """'after yarn x4', 'after base 5e+05', 'after dynamic x4 (at runtime length 512)'."""
    t = params.rope_type
    if t == "default":
        return "after base " + ("unchanged" if params.rope_theta is None else f"{params.rope_theta:g}")
    label = f"after {t} x{params.effective_factor():g}"
    if params.rope_theta is not None:
        label += f", base {params.rope_theta:g}"
    if t == "dynamic" and runtime_length is not None:
        label += f" (at runtime length {runtime_length:,})"
    return label


def plot(path: str | os.PathLike, out_png: str | os.PathLike, opts=None) -> PlotResult:
    """The CLI's entry: ``opts`` is a :class:`posrewrite.options.RewriteOptions` (the rope flags), an HF
    ``rope_parameters`` dict, or None (the model as it is)."""
    rope_params = None
    original = None
    if isinstance(opts, dict):
        rope_params = dict(opts)
    elif opts is not None:
        from posrewrite.config import read_config_json
        from posrewrite.plan import requested_rope_parameters

        rope_params = requested_rope_parameters(opts, read_config_json(path))
        original = getattr(opts, "original_max_positions", None)
    return plot_model(path, out_png, rope_params or None, original_context=original)
