"""Score biases classified by value (`detect.py`: families of `math.bias`) and rewritten from the fitted
formula (`rewrite.py`: --max-positions, --bias-scale, --fp32-positions)."""

from posrewrite.passes.onnx.bias.detect import score_bias_sites

__all__ = ["score_bias_sites"]
