"""T5 relative attention bias: detection (`detect.py`). It runs at any length as is (distances past
max_distance share the last bucket), so there is no extension to write."""

from posrewrite.passes.onnx.t5.detect import T5_PROBE_LENGTH, t5_site

__all__ = ["t5_site", "T5_PROBE_LENGTH"]
