"""Fuses the decomposed attention around fused RotaryEmbedding nodes (work in progress)."""

from __future__ import annotations

import onnx_ir as ir


class FuseAttentionPass(ir.passes.InPlacePass):
    def __init__(self, rotary_nodes=()) -> None:
        super().__init__()
        self.rotary_nodes = list(rotary_nodes)
        self.changes: list[str] = []
        self.notes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)
