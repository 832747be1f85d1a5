"""Detection of ALiBi / learned / sinusoidal / T5 sites on real HF exports (dynamo) and hand-written
modules. Expected values come from the configs and from the paper's slope formula, not from the graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import onnx_ir as ir  # noqa: E402

from fixtures.other_models import export_module_onnx, export_other_onnx  # noqa: E402
from posrewrite.passes.onnx.detect import detect_other_encodings  # noqa: E402
from tests.test_other_math import paper_slopes  # noqa: E402


def detect(path):
    sites, refusals = detect_other_encodings(ir.load(path))
    for s in sites:
        json.dumps(s.to_dict())  # JSON-ready
    return sites, refusals


def only(sites, kind):
    found = [s for s in sites if s.kind == kind]
    assert found, f"no {kind} in {[s.kind for s in sites]}"
    return found


@pytest.mark.parametrize(
    "arch,heads,source",
    [
        ("bloom", 4, "computed"),  # fixture: slopes initializer x mask cumsum
        ("bloom6", 6, "computed"),  # non-power-of-two heads
        ("mpt", 4, "constant"),  # bias baked as [H, 1, L]
        ("mpt12", 12, "constant"),  # non-power-of-two, baked
        ("falcon", 4, "computed"),  # alibi=True: formed in bfloat16
    ],
)
def test_alibi(arch, heads, source):
    path, _ = export_other_onnx(arch)
    sites, refusals = detect(path)
    (site,) = only(sites, "alibi")
    d = site.to_dict()
    assert d["num_heads"] == heads and d["source"] == source
    np.testing.assert_allclose(d["slopes"], paper_slopes(heads), rtol=1e-5)
    assert d["standard_slopes"]
    assert len(sites) == 1 and not refusals
    if source == "constant":
        assert d["max_positions"] == 32 and d["form"] == "anchored"
    else:
        assert d["distances"] == "mask_cumsum" and d["form"] == "absolute"
    if arch == "falcon":
        assert d["position_dtype"] == "bfloat16" and d["compute_dtype"] == "bfloat16"


def test_alibi_fp16_variant():
    path, _ = export_other_onnx("bloom", dtype="float16")
    (site,) = only(detect(path)[0], "alibi")
    assert (site.dtype, site.compute_dtype, site.form) == ("float16", "float32", "absolute")


@pytest.mark.parametrize(
    "arch,offset,positions",
    [
        ("gpt2", 0, "range"),  # fixture
        ("opt", 2, "mask_cumsum"),  # OPT's +2
        ("roberta", 2, "mask_cumsum"),  # padding_idx + 1
    ],
)
def test_learned(arch, offset, positions):
    path, _ = export_other_onnx(arch)
    sites, refusals = detect(path)
    (site,) = only(sites, "learned_absolute")
    d = site.to_dict()
    assert (d["max_positions"], d["dim"], d["offset"], d["rows"]) == (32, 64, offset, 32 + offset)
    assert d["positions"] == positions
    assert [s.kind for s in sites] == ["learned_absolute"]
    assert not refusals  # token embeddings and RoBERTa's token types (read by zeros) are not positions


def test_sinusoidal_m2m100_table_with_offset():
    path, _ = export_other_onnx("m2m100")
    sites = only(detect(path)[0], "sinusoidal")
    assert len(sites) == 2  # encoder and decoder tables
    d = sites[0].to_dict()
    assert (d["max_positions"], d["dim"], d["base"], d["offset"]) == (32, 64, 10000.0, 2)
    assert (d["layout"], d["frequency_rule"], d["source"]) == ("concat", "fairseq", "constant")


@pytest.mark.parametrize("mode,layout", [("table", "interleaved"), ("computed", "interleaved"), ("computed", "concat")])
def test_sinusoidal_module(mode, layout):
    path, _ = export_module_onnx("sinusoidal", mode=mode, layout=layout)
    sites, refusals = detect(path)
    (site,) = sites
    d = site.to_dict()
    assert d["kind"] == "sinusoidal" and (d["dim"], d["base"], d["layout"]) == (64, 10000.0, layout)
    assert d["source"] == ("constant" if mode == "table" else "computed")
    assert d["max_positions"] == (32 if mode == "table" else None)
    assert not refusals


@pytest.mark.parametrize("kw", [{}, {"bidirectional": False, "max_distance": 64}])
def test_t5_bias(kw):
    path, _ = export_module_onnx("t5_bias", **kw)
    sites, refusals = detect(path)
    (site,) = sites
    d = site.to_dict()
    assert d["kind"] == "t5_relative_bias"
    assert (d["num_buckets"], d["num_heads"]) == (32, 4)
    assert (d["bidirectional"], d["max_distance"]) == (kw.get("bidirectional", True), kw.get("max_distance", 128))
