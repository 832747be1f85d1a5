"""ALiBi past the training length (`rewrite --max-positions`, `--alibi-scale`); called per site by
`ExtendTablesPass`.

Computed from the runtime sequence, ALiBi extrapolates as is; a bias baked as a table of L keys is
regenerated for N keys (original columns kept) and the Slice bounds computed from L are moved to N.
--alibi-scale S divides distances (slopes / S, arXiv 2310.13017).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from posrewrite.passes.onnx._build import divide_input, replace_initializer, retarget_length
from posrewrite.sites.alibi import AlibiSite

__all__ = ["extend_alibi"]


def extend_alibi(
    graph: ir.Graph, site: AlibiSite, *, max_positions: int | None, alibi_scale: float | None
) -> tuple[list[str], list[str]]:
    """(changes, notes): what was rewritten, and what was left as is and why; the site was rewritten
    exactly when a change is reported."""
    scale = 1.0 if alibi_scale is None else float(alibi_scale)
    if site.source == "computed":
        notes = ["ALiBi is built from the runtime sequence: it extrapolates past the training length as is"]
        if scale == 1.0:
            return [], notes
        divide_input(graph, site.product, site.slopes_value, scale, "alibi_scale")
        return [f"ALiBi slopes divided by {scale:g} (distances / {scale:g})"], notes
    L = site.max_positions
    n = max(L, max_positions or L)
    if n == L and scale == 1.0:
        return [], [f"ALiBi table {site.table.name}: baked for {L} keys; pass --max-positions to extend"]
    old = site.table.const_value.numpy()
    axis = site.table_axis
    m32 = (site.slopes / scale).astype(np.float32)
    j = np.arange(n, dtype=np.float32)
    d = j - np.float32(n - 1) if site.form == "anchored" else j
    lead = [s for s in old.shape[:axis]] + list(old.shape[axis + 1 :])
    values = (m32[:, None] * d[None, :]).astype(old.dtype)  # float32 product as the exporters compute it
    new = values.reshape(tuple(lead) + (n,)) if axis == len(old.shape) - 1 else None
    if new is None:
        return [], [f"ALiBi table {site.table.name}: key axis is not the last one, not extended"]
    if scale == 1.0:  # keep the original columns bit for bit
        if site.form == "anchored":
            new[..., n - L :] = old
        else:
            new[..., :L] = old
    replace_initializer(graph, site.table, new)
    moved = sum(retarget_length(graph, s, L, n) for s in site.slices)
    change = (
        f"ALiBi table {site.table.name}: {L} -> {n} keys"
        + (f", slopes / {scale:g}" if scale != 1.0 else "")
        + (f"; {moved} Slice bound(s) computed from {L} now use {n}" if moved else "")
    )
    return [change], []
