"""One frozen plan per rewrite (posrewrite.plan), read by the pipeline and by validation alike.

References are independent of the code under test: config.json reads are counted where the operating system is
asked to open the file (``os.open`` / ``open``), whichever module asks; lengths come from the config written
here; budgets from the table's own shape."""

from __future__ import annotations

import builtins
import dataclasses
import io as stdio
import json
import os
import shutil
from pathlib import Path

import pytest

from posrewrite import api, errors, io
from posrewrite import config as config_module
from posrewrite import plan as plan_module
from posrewrite.options import RewriteOptions
from posrewrite.plan import make_plan


def _beside_config(src: Path, folder: Path, config: dict) -> Path:
    """A copy of the model at ``src`` in ``folder``, with ``config`` as the config.json beside it."""
    folder.mkdir()
    path = folder / "model.onnx"
    shutil.copyfile(src, path)
    (folder / "config.json").write_text(json.dumps(config))
    return path


def _count_config_opens(monkeypatch) -> list[str]:
    """Every opening of a file named config.json from here on, by any module (os.open, open, io.open)."""
    opened: list[str] = []

    def named(file) -> bool:
        return isinstance(file, str | bytes | os.PathLike) and Path(os.fsdecode(file)).name == "config.json"

    def wrap(real):
        def opener(file, *args, **kwargs):
            if named(file):
                opened.append(os.fsdecode(file))
            return real(file, *args, **kwargs)
        return opener

    monkeypatch.setattr(os, "open", wrap(os.open))
    monkeypatch.setattr(builtins, "open", wrap(builtins.open))
    monkeypatch.setattr(stdio, "open", wrap(stdio.open))
    return opened


def _count_reader_calls(monkeypatch) -> list[object]:
    calls: list[object] = []
    real = config_module.read_config_json

    def reader(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(config_module, "read_config_json", reader)
    return calls


def test_a_rescale_with_fusion_and_validation_reads_config_json_once(llama_onnx, tmp_path, monkeypatch):
    """YaRN needs the trained length (config.json's max_position_embeddings) and the fused caches their rows
    (the same key): one reading of the file serves the plan, the passes and the validation."""
    path = _beside_config(llama_onnx, tmp_path / "m", {"model_type": "llama", "max_position_embeddings": 64,
                                                       "rope_theta": 10000.0})
    opened = _count_config_opens(monkeypatch)
    calls = _count_reader_calls(monkeypatch)
    result = api.rewrite(path, rope_scale=2.0, rope_method="yarn", fuse="ort", output=tmp_path / "out.onnx")
    assert result.validation is not None and result.validation.ok
    assert result.rope_parameters[0]["original_max_position_embeddings"] == 64  # taken from the config
    assert result.context_length == 128  # the fused caches' rows: 2 x 64
    assert len(opened) == 1 and Path(opened[0]) == tmp_path / "m" / "config.json"
    assert len(calls) == 1


def test_logn_scaling_reads_its_length_from_config_json_once(llama_onnx, tmp_path, monkeypatch):
    """--logn-scaling takes L from config.json's seq_length (Qwen-1); the pass and the validation step (which
    compares the models below L) read it from the plan, not from the file again."""
    path = _beside_config(llama_onnx, tmp_path / "m", {"model_type": "llama", "seq_length": 32,
                                                       "max_position_embeddings": 64})
    found = api.detect(io.load_model(path))
    opened = _count_config_opens(monkeypatch)
    plan = make_plan(RewriteOptions(logn_scaling=True), path, found)
    assert plan.logn_length == 32 and len(opened) == 1
    opened.clear()
    result = api.rewrite(path, logn_scaling=True, output=tmp_path / "out.onnx")
    assert result.validation is not None and result.validation.ok
    assert any(row.get("site") == "model inside the window" for row in result.validation.to_dict()["rows"])
    assert len(opened) == 1


def test_a_request_that_needs_no_config_does_not_read_it(llama_onnx, tmp_path, monkeypatch):
    """--fp32-positions and --max-positions take nothing from config.json, which is never opened (a config.json
    that would be refused when read does not matter); a rescale reads it."""
    path = _beside_config(llama_onnx, tmp_path / "m", {"max_position_embeddings": -1})
    with pytest.raises(errors.UsageError, match="max_position_embeddings must be greater than 0"):
        config_module.read_config_json(path)
    opened = _count_config_opens(monkeypatch)
    found = api.detect(io.load_model(path))
    plan = make_plan(RewriteOptions(fp32_positions=True, max_positions=128), path, found)
    assert opened == [] and plan.config is None and plan.fp32_positions and plan.site_plans == ()
    with pytest.raises(errors.UsageError, match="max_position_embeddings must be greater than 0"):
        make_plan(RewriteOptions(rope_base=5e5, original_max_positions=64), path, found)
    assert len(opened) == 1


def test_the_plan_is_frozen_and_holds_the_implied_fp32(fp16_rope_onnx):
    """A rescale of half-precision positions implies --fp32-positions: the plan says so, the request (what the
    output's provenance records) is unchanged."""
    path, _ = fp16_rope_onnx
    options = RewriteOptions(rope_scale=2.0, original_max_positions=64)
    plan = make_plan(options, path, api.detect(io.load_model(path)))
    assert plan.fp32_positions and plan.fp32_implied and not plan.options.fp32_positions
    assert plan.options is options and plan.rope_parameters["factor"] == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.fp32_positions = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.rope_parameters["factor"] = 3.0  # type: ignore[index]
    asked = make_plan(dataclasses.replace(options, fp32_positions=True), path, api.detect(io.load_model(path)))
    assert asked.fp32_positions and not asked.fp32_implied


def test_validate_refuses_what_a_rewrite_refuses(hf_onnx, tmp_path, monkeypatch):
    """`validate ORIGINAL REWRITTEN` makes the rewrite's plan, with its checks: a --max-positions whose tables
    would pass the memory budget is refused by both (exit 2), not only by the rewrite. GPT-J's cos/sin tables
    are [64, 8]: 128 rows of 8 at 24 bytes per element is 24,576 bytes, 64 rows 12,288."""
    path = hf_onnx("gptj")
    monkeypatch.setattr(plan_module, "MEMORY_BUDGET_BYTES", 20_000)
    for call in (lambda: api.rewrite(path, max_positions=128, output=tmp_path / "o.onnx"),
                 lambda: api.validate(path, path, max_positions=128)):
        with pytest.raises(errors.UsageError, match="--max-positions 128: .* over the memory budget"):
            call()
    assert not (tmp_path / "o.onnx").exists()
    plan = make_plan(RewriteOptions(max_positions=64), path, api.detect(io.load_model(path)))
    assert plan.site_plans == ()  # 64 rows: nothing to extend, and within the budget
