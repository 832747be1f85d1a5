"""The decode contract of a run-time RoPE method (dynamic, longrope) on a KV-cache export, written into the model.

``dynamic`` and ``longrope`` choose their frequencies from the total length T; past L a decode step's frequencies
differ from those its cached keys (and, beyond the first layer, its cached values) were computed with. The
graph computes what HF's cached model computes (``--runtime-decode hf`` and ``exact`` write the same graph);
what differs is the generation loop: ``exact`` records in ``metadata_props["posrewrite.decode"]``
(`posrewrite.provenance.decode_contract`) when the loop must run the whole sequence so far from an empty past
instead of a cached step, so that every step equals the whole sequence at once. ``posrewrite.decode`` is the loop
that reads it; other loops (Optimum, onnxruntime-genai) ignore it and decode as HF's cached model does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import onnx_ir as ir

from posrewrite.errors import UsageError
from posrewrite.passes.onnx._graph import has_past_inputs
from posrewrite.passes.onnx._infra import PipelineContext, ReportingPass
from posrewrite.provenance import DECODE_KEY, decode_contract

__all__ = ["DecodeContractPass"]


class DecodeContractPass(ReportingPass):
    """Records the decode contract (``mode``: hf, exact or rerotate) of a KV-cache export rewritten with the
    run-time method ``method`` switching at ``original_max_positions``. ``asked``: the mode was given by name
    (not the default). ``exact`` asked for on a model without a KV cache is a usage error, as ``rerotate`` is (it
    computes every position at once already); otherwise such a model is left as it is. Runs last: it changes
    metadata only."""

    def __init__(self, *, mode: str, method: str, original_max_positions: int, asked: bool = False,
                 context: PipelineContext | None = None, preface: Sequence[str] = ()) -> None:
        super().__init__(context=context, preface=preface)
        self.contract = decode_contract(mode, method, original_max_positions)
        self.asked = asked

    def run(self, model: ir.Model) -> ir.passes.PassResult:
        mode = self.contract["mode"]
        if not has_past_inputs(model):
            if self.asked and mode == "exact":
                raise UsageError(f"--runtime-decode {mode} applies to KV-cache exports (past_key_values inputs); "
                                 "this model computes every position at once already")
            return ir.passes.PassResult(model, False)
        text = json.dumps(self.contract, sort_keys=True)
        if model.metadata_props.get(DECODE_KEY) == text:
            return ir.passes.PassResult(model, False)
        model.metadata_props[DECODE_KEY] = text
        L = self.contract["original_max_position_embeddings"]
        if mode == "exact":
            when = ("at the first step whose total length exceeds" if self.contract["reprefill"] == "first_past_L"
                    else "at every step whose total length exceeds")
            self.notes.append(f"decode contract (metadata {DECODE_KEY}): exact: a generation loop re-runs the whole "
                              f"sequence from an empty past {when} {L} (posrewrite.decode does)")
        elif mode == "hf" and not self.asked:  # the default: say what the recommended mode would do
            self.notes.append(f"decode: past {L} tokens a cached step differs from the whole sequence at once, as "
                              "HF's cached model does (--runtime-decode hf, recorded in the metadata); "
                              "--runtime-decode exact (recommended) records when a generation loop must re-prefill "
                              "so that every step equals the whole sequence at once (posrewrite.decode does)")
        return ir.passes.PassResult(model, True)
