"""Pure-numpy math behind posrewrite (no torch, no onnx): RoPE methods and precision analysis here;
ALiBi, absolute tables and the base bound in sibling modules."""

from posrewrite.math import precision, rope

__all__ = ["precision", "rope"]
