"""What the angles of a RoPE read from the position inputs, as fitted by probing (IR-free, shared by ONNX and fx).

- `PositionRows`: the positions are a multi-row input (M-RoPE: Qwen2-VL / Qwen2.5-VL / Qwen3-VL ``position_ids``
  of shape [3, batch, seq]); each rotated frequency reads one row. ``row_of_channel`` holds that row per
  frequency (rotary_dim / 2 entries); ``sections`` are the counts per row (HF's ``mrope_section``) and
  ``interleaved`` says whether the rows alternate channel by channel (Qwen3-VL) instead of forming contiguous
  sections (Qwen2-VL).
- `GridAxes`: the positions are the row and column of a patch grid made from the input's shape (2-D RoPE of
  ViTs). Each angle channel is a·row + b·column (+ an offset): *axial* when every channel reads one axis
  (timm ``RotaryEmbeddingCat``, rotary-embedding-torch ``get_axial_freqs``), *mixed* when channels read both
  (RoPE-Mixed). ``normalised``: the coordinates are divided by the grid size (DINOv3's [-1, 1] coordinates,
  EVA-02's ``ref_feat_shape``, rotary-embedding-torch ``freqs_for='pixel'``): the model already adapts to
  resolution and there is nothing to rescale.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class PositionRows:
    """M-RoPE: which row of a multi-row position input each rotated frequency reads."""

    rows: int  # rows of the position input (3 for Qwen2-VL)
    row_of_channel: tuple[int, ...]  # per frequency (rotary_dim / 2 entries)

    @property
    def sections(self) -> tuple[int, ...]:
        """Frequencies per row, HF's ``mrope_section`` (for contiguous sections: their lengths in row order)."""
        return tuple(self.row_of_channel.count(r) for r in range(self.rows))

    @property
    def interleaved(self) -> bool:
        """True when the rows alternate (Qwen3-VL's interleaved M-RoPE) rather than forming one run each."""
        runs = [r for k, r in enumerate(self.row_of_channel) if k == 0 or self.row_of_channel[k - 1] != r]
        return len(runs) != len(set(runs))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "rows", "rows": self.rows, "sections": list(self.sections),
                "interleaved": self.interleaved, "row_of_channel": list(self.row_of_channel)}


@dataclasses.dataclass(frozen=True)
class GridAxes:
    """2-D RoPE over a patch grid: per angle channel the slopes along the grid's rows and columns."""

    row_slope: np.ndarray  # float64 [channels]: d angle / d row, at the probed grid
    col_slope: np.ndarray  # float64 [channels]: d angle / d column
    normalised: bool  # the slopes shrink as the grid grows (coordinates divided by the grid size)
    probe_grid: tuple[int, int]  # (rows, columns) the slopes were read at

    @property
    def axis_of_channel(self) -> tuple[int, ...]:
        """0 (rows), 1 (columns), -1 (both: mixed) or -2 (neither: a channel that does not rotate)."""
        scale = max(float(np.max(np.abs(self.row_slope), initial=0.0)),
                    float(np.max(np.abs(self.col_slope), initial=0.0)), 1e-30)
        out = []
        for a, b in zip(np.abs(self.row_slope), np.abs(self.col_slope), strict=True):
            ra, rb = a > 1e-6 * scale, b > 1e-6 * scale
            out.append(-1 if ra and rb else 0 if ra else 1 if rb else -2)
        return tuple(out)

    @property
    def mixed(self) -> bool:
        return -1 in self.axis_of_channel

    def channels_per_axis(self) -> tuple[int, int]:
        axes = self.axis_of_channel
        return axes.count(0), axes.count(1)

    def to_dict(self) -> dict[str, Any]:
        rows, cols = self.channels_per_axis()
        return {"kind": "grid", "mixed": self.mixed, "normalised": self.normalised,
                "channels_per_axis": [rows, cols], "mixed_channels": self.axis_of_channel.count(-1),
                "probe_grid": list(self.probe_grid)}


__all__ = ["GridAxes", "PositionRows"]
