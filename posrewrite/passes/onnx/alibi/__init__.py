"""ALiBi: detection (`detect.py`, reading what the score-bias classifier found), extension past the training
length (`extend.py`) and the fp32-safe rewrite with its precision analysis (`fp32.py`)."""

from posrewrite.passes.onnx.alibi.detect import alibi_site
from posrewrite.passes.onnx.alibi.extend import extend_alibi
from posrewrite.passes.onnx.alibi.fp32 import NEAR_WINDOW, Fp32AlibiPass, alibi_precision, is_fp32_safe

__all__ = ["alibi_site", "extend_alibi", "Fp32AlibiPass", "alibi_precision", "is_fp32_safe", "NEAR_WINDOW"]
