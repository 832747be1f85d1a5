"""Custom torch ops of posrewrite (registered on import as ``torch.ops.posrewrite.*``).

`posrewrite.ops.rope`: fused rotary embedding (plain-torch CPU reference, Triton on CUDA, fake
implementations for export, autograd); `posrewrite.ops.rope_onnx`: their ONNX translations for
``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.
"""

from posrewrite.ops.rope import rope, rope_freqs, rope_qk, rope_qk_freqs, rotate_reference

__all__ = ["rope", "rope_qk", "rope_freqs", "rope_qk_freqs", "rotate_reference"]
