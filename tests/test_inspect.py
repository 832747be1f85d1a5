"""`inspect` reports layout, rotary_dim, head_dim, base, angle source for every fixture.

Expected values come from the HF configs the fixtures were built from (fixtures.hf_models.arch_info),
not from posrewrite.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fixtures.hf_models import ARCHS, arch_info, export_hf_onnx
from posrewrite import api


def _expected_bases(info: dict) -> list[float]:
    rp = info["rope_parameters"]
    if rp and all(isinstance(v, dict) for v in rp.values()):  # per layer type (Gemma 3: sliding / full)
        return sorted({float(v["rope_theta"]) for v in rp.values()})
    return [info["base"]]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_inspect_hf_exports(arch):
    info = arch_info(arch)
    result = api.inspect(export_hf_onnx(arch))
    rope = [s.to_dict() for s in result.sites if s.kind == "rope"]
    bases = _expected_bases(info)
    assert len(rope) == len(bases), result.to_dict()
    assert sorted(s["base"] for s in rope) == pytest.approx(bases, rel=1e-4)
    assert sum(s["rotations"] for s in rope) == 2 * info["num_layers"]  # q and k in every layer
    for site in rope:
        assert site["layout"] == info["layout"]
        assert site["rotary_dim"] == info["rotary_dim"]
        assert site["head_dim"] == info["head_dim"]
        if info["angle_source"] == "table":
            assert site["angles"] == "cached" and site["max_positions"] == info["max_positions"]
        else:
            assert site["angles"] == "computed" and site["max_positions"] is None
            assert site["position_dtype"] == "float32"
    assert not result.refusals


def test_inspect_json_cli():
    path = export_hf_onnx("gpt_neox")
    proc = subprocess.run([sys.executable, "-m", "posrewrite", "inspect", str(path), "--json"],
                          capture_output=True, text=True, check=True)
    data = json.loads(proc.stdout)
    (enc,) = data["encodings"]
    for key in ("kind", "layout", "head_dim", "rotary_dim", "base", "angles", "max_positions", "position_dtype",
                "rotations"):
        assert key in enc
    assert enc["kind"] == "rope" and enc["rotary_dim"] == 8 and enc["head_dim"] == 16


def test_torchscript_exporter():
    """The older TorchScript exporter (dynamo=False) gives another graph shape; detection must not care."""
    spec = [a for a, s in ARCHS.items() if s.torchscript_ok and a in ("llama", "gpt_neox")]
    for arch in spec:
        info = arch_info(arch)
        path = export_hf_onnx(arch, exporter="torchscript")  # a failed export is a failure, not a skip
        (site,) = [s for s in api.inspect(path).sites if s.kind == "rope"]
        assert site.rotary_dim == info["rotary_dim"] and site.layout.value == info["layout"]


def test_refusal_names_the_failure_that_matched_most():
    # "closest pattern failed: ..." is the reason of the failed match that got furthest (onnxscript's
    # MatchingTracer keeps each rule's best tries; MatchInfo.score counts the pattern nodes matched)
    import onnx_ir as ir
    from onnxscript.rewriter import MatchingTracer, MatchResult, MatchStatus

    from posrewrite.passes.onnx.rope.detect import _best_failure

    x = ir.Value(name="x")
    nodes = [ir.Node("", "Neg", [x]) for _ in range(3)]
    graph = ir.Graph([x], [nodes[0].outputs[0]], nodes=nodes)
    tracer = MatchingTracer()
    for rule, matched, reason in (("far", 3, "sin is not the same angle"), ("near", 1, "no Cos"),
                                  ("late", 2, "wrong slice")):
        result = MatchResult()
        for node in nodes[:matched]:
            result.add_node(node)
        result.fail(reason)
        tracer.log(rule, graph, nodes[0], result, MatchStatus.CONDITION_FAILED)
    assert _best_failure(tracer) == "sin is not the same angle"
    assert _best_failure(MatchingTracer()) is None
