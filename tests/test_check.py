"""`posrewrite check MODEL [--max-length N] [--json]`: the precision lint and its exit status.

Exit 0 when every site is safe at N, 7 (UnsafeModelError) when one is not.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures.modules import build_fp16_legacy_rope  # noqa: E402
from fixtures.precision_models import bf16_variant  # noqa: E402
from posrewrite.cli import main  # noqa: E402
from posrewrite.errors import UnsafeModelError  # noqa: E402
from posrewrite.math.precision import colliding_positions, exact_position_count  # noqa: E402

REQUIRED = {"kind", "position_dtype", "angle_dtype", "exact_position_fraction", "max_angle_error", "safe"}


@pytest.fixture(scope="module")
def fp16_legacy():
    return build_fp16_legacy_rope()[0]


def _check_json(capsys, *args):
    code = main(["check", *map(str, args), "--json"])
    payload = json.loads(capsys.readouterr().out)
    return code, payload


def test_fp16_legacy_at_4096(capsys, fp16_legacy):
    code, payload = _check_json(capsys, fp16_legacy, "--max-length", 4096)
    assert code == UnsafeModelError.exit_code == 7
    assert payload["safe"] is False and payload["max_length"] == 4096
    (site,) = payload["sites"]
    assert REQUIRED <= set(site)
    assert site["kind"] == "rope" and site["position_dtype"] == "float16" and site["angle_dtype"] == "float16"
    assert site["exact_position_fraction"] == 0.75 and site["exact_positions"] == 3072
    assert site["colliding_positions"] == colliding_positions(4096, "float16")
    assert site["max_angle_error"] >= 1.0 and site["safe"] is False


def test_fp16_legacy_is_safe_up_to_2048_positions_but_not_its_angles(capsys, fp16_legacy):
    code, payload = _check_json(capsys, fp16_legacy, "--max-length", 2048)
    (site,) = payload["sites"]
    assert site["exact_position_fraction"] == 1.0  # 0..2047 are fp16 integers
    assert site["max_angle_error"] > 1e-3 and code == 7  # the fp16 product still rounds


def test_bf16_variant_at_8192_matches_the_analytic_count(capsys, fp16_legacy):
    code, payload = _check_json(capsys, bf16_variant(fp16_legacy), "--max-length", 8192)
    (site,) = payload["sites"]
    assert site["position_dtype"] == "bfloat16"
    assert site["exact_positions"] == exact_position_count(8192, "bfloat16") == 896
    assert site["exact_position_fraction"] == 896 / 8192
    assert code == 7 and site["safe"] is False


def test_modern_hf_export_is_safe(capsys, llama_onnx):
    code, payload = _check_json(capsys, llama_onnx, "--max-length", 8192)
    (site,) = payload["sites"]
    assert site["position_dtype"] == "float32" and site["angle_dtype"] == "float32"
    assert site["exact_position_fraction"] == 1.0 and site["safe"] is True
    assert code == 0 and payload["safe"] is True


@pytest.mark.slow
def test_modern_hf_fp16_export_is_safe(capsys, hf_onnx):
    import torch

    code, payload = _check_json(capsys, hf_onnx("llama", dtype=torch.float16), "--max-length", 8192)
    assert code == 0 and all(s["safe"] for s in payload["sites"])  # HF computes angles in fp32 then casts


def test_human_table(capsys, fp16_legacy):
    code = main(["check", str(fp16_legacy), "--max-length", "4096"])
    out = capsys.readouterr().out
    assert code == 7
    assert "float16" in out and "75%" in out and "unsafe" in out  # the exact fraction 0.75, as a percentage


def test_rewritten_model_checks_safe(capsys, fp16_legacy, tmp_path):
    out = tmp_path / "fp32.onnx"
    assert main([str(fp16_legacy), "--fp32-positions", "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    code, payload = _check_json(capsys, out, "--max-length", 4096)
    assert code == 0 and payload["sites"][0]["safe"] is True


def test_max_length_help_states_the_default_check_uses(capsys, fp16_legacy):
    # the help's "default: N" is the length a check without --max-length really analyses
    import re

    assert main(["check", "--help"]) == 0
    match = re.search(r"default: (\d+)\)", " ".join(capsys.readouterr().out.split()))
    assert match, "check --help does not state the --max-length default"
    code, payload = _check_json(capsys, fp16_legacy)
    assert payload["max_length"] == int(match.group(1))
    (site,) = payload["sites"]
    assert site["colliding_positions"] == colliding_positions(int(match.group(1)), "float16")
