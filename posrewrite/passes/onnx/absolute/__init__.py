"""Absolute position encodings, learned and sinusoidal: detection of tables read by position and of computed
sinusoids (`detect.py`), extension past the training length (`extend.py`)."""

from posrewrite.passes.onnx.absolute.detect import detect_computed_sinusoids, detect_position_tables
from posrewrite.passes.onnx.absolute.extend import extend_learned, extend_sinusoidal

__all__ = ["detect_position_tables", "detect_computed_sinusoids", "extend_learned", "extend_sinusoidal"]
