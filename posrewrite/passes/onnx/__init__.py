"""posrewrite's ONNX passes, public: onnx_ir in-place passes to compose in an `onnx_ir.passes.PassManager`.

    import onnx_ir as ir
    from posrewrite.math.rope import RopeParameters
    from posrewrite.passes.onnx import FuseRotaryPass, RescaleRopePass, cleanup_passes

    ir.passes.PassManager([RescaleRopePass(params=RopeParameters(rope_type="yarn", factor=4.0,
                                                                 original_max_position_embeddings=4096)),
                           FuseRotaryPass(target="ort"), *cleanup_passes()])(model)

Every pass takes keyword arguments only and is correct on its own: it detects the sites it needs on the model
as it finds it (or takes them as ``sites=`` / ``plans=``) and refuses with a `posrewrite.errors` error when it
cannot act. No pass runs another one: the cleanup (`cleanup_passes`: unused nodes, topological order, value
types nobody can write) is the caller's, after the rewrites. Passes given one `PipelineContext` (``context=``)
write one `RewriteReport` and share one cached detection, dropped by any modification of the model.

The names are imported on first use (PEP 562): importing a detector or a graph helper of this package does not
import every pass.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # the passes
    "RescaleRopePass": "posrewrite.passes.onnx.rope.rescale",
    "Fp32PositionsPass": "posrewrite.passes.onnx.rope.fp32",
    "FuseRotaryPass": "posrewrite.passes.onnx.rope.fuse",
    "FuseAttentionPass": "posrewrite.passes.onnx.attention.fuse",
    "AttentionExtendPass": "posrewrite.passes.onnx.attention.extend",
    "RerotatePastKeysPass": "posrewrite.passes.onnx.attention.extend",
    "SoftmaxGuardPass": "posrewrite.passes.onnx.attention.softmax_guard",
    "DecodeContractPass": "posrewrite.passes.onnx.rope.decode_contract",
    "ExtendTablesPass": "posrewrite.passes.onnx.extend_tables",
    "ExtendSquareMasksPass": "posrewrite.passes.onnx.masks",
    "Fp32AlibiPass": "posrewrite.passes.onnx.alibi.fp32",
    "Fp32ScoreBiasPass": "posrewrite.passes.onnx.bias.rewrite",
    "DropUntypedValueInfoPass": "posrewrite.passes.onnx._infra",
    "cleanup_passes": "posrewrite.passes.onnx._infra",
    # what they share and report
    "ReportingPass": "posrewrite.passes.onnx._infra",
    "PipelineContext": "posrewrite.passes.onnx._infra",
    "RewriteReport": "posrewrite.passes.onnx._infra",
    "PassRecord": "posrewrite.passes.onnx._infra",
    # what detection found (`posrewrite.passes.onnx.detect.detect(model)`: the module shares the function's name)
    # and RoPE plans made from its sites (RescaleRopePass(plans=...))
    "Detection": "posrewrite.passes.onnx.detect",
    "SitePlan": "posrewrite.passes.onnx.rope.rescale",
    "plan_site": "posrewrite.passes.onnx.rope.rescale",
}

__all__ = [
    "AttentionExtendPass",
    "DecodeContractPass",
    "Detection",
    "DropUntypedValueInfoPass",
    "ExtendSquareMasksPass",
    "ExtendTablesPass",
    "Fp32AlibiPass",
    "Fp32PositionsPass",
    "Fp32ScoreBiasPass",
    "FuseAttentionPass",
    "FuseRotaryPass",
    "PassRecord",
    "PipelineContext",
    "ReportingPass",
    "RerotatePastKeysPass",
    "RescaleRopePass",
    "RewriteReport",
    "SitePlan",
    "SoftmaxGuardPass",
    "cleanup_passes",
    "plan_site",
]

if TYPE_CHECKING:
    from posrewrite.passes.onnx._infra import (
        DropUntypedValueInfoPass,
        PassRecord,
        PipelineContext,
        ReportingPass,
        RewriteReport,
        cleanup_passes,
    )
    from posrewrite.passes.onnx.alibi.fp32 import Fp32AlibiPass
    from posrewrite.passes.onnx.attention.extend import AttentionExtendPass, RerotatePastKeysPass
    from posrewrite.passes.onnx.attention.fuse import FuseAttentionPass
    from posrewrite.passes.onnx.attention.softmax_guard import SoftmaxGuardPass
    from posrewrite.passes.onnx.bias.rewrite import Fp32ScoreBiasPass
    from posrewrite.passes.onnx.detect import Detection
    from posrewrite.passes.onnx.extend_tables import ExtendTablesPass
    from posrewrite.passes.onnx.masks import ExtendSquareMasksPass
    from posrewrite.passes.onnx.rope.decode_contract import DecodeContractPass
    from posrewrite.passes.onnx.rope.fp32 import Fp32PositionsPass
    from posrewrite.passes.onnx.rope.fuse import FuseRotaryPass
    from posrewrite.passes.onnx.rope.rescale import RescaleRopePass, SitePlan, plan_site


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
