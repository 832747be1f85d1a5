"""Shared pytest fixtures: cached ONNX exports of tiny RoPE models (see ``fixtures/``).

Exports are cached on disk (``$POSREWRITE_FIXTURE_CACHE`` or ``<repo>/.cache/fixtures``), so only the
first run pays the ~5 s per model. Fixtures needing torch skip when it is not installed.

Model fixtures (session scope):
    llama_onnx, neox_onnx, llama_pos_onnx (input_ids + position_ids), hf_onnx (factory: hf_onnx(arch, **kw))
    interleaved_meta_onnx, interleaved_gptj_onnx, legacy_gather_onnx, legacy_index_onnx,
    legacy_slice_onnx, fp16_rope_onnx, three_d_rope_onnx      -> (path, info)
    module_onnx (factory: module_onnx(kind, **kw) -> (path, info))
Other: tmp_out (a fresh output directory per test), rng (numpy Generator, seed 0).

Set POSREWRITE_SLOW=1 to run tests marked ``slow`` (e.g. exporting every arch in fixtures.hf_models.ARCHS).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (set POSREWRITE_SLOW=1 to run)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("POSREWRITE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set POSREWRITE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _need_torch():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


@pytest.fixture
def tmp_out(tmp_path) -> Path:
    """A fresh, empty output directory for one test."""
    out = tmp_path / "out"
    out.mkdir()
    return out


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---------------------------------------------------------------- HF models


@pytest.fixture(scope="session")
def hf_onnx():
    """Factory: ``hf_onnx(arch, **export_hf_onnx_kwargs) -> Path`` (cached)."""
    _need_torch()
    from fixtures.hf_models import export_hf_onnx

    return export_hf_onnx


@pytest.fixture(scope="session")
def llama_onnx(hf_onnx) -> Path:
    """Tiny LlamaForCausalLM (GQA 4/2 heads, head_dim 16, base 1e4, max_pos 64): input_ids -> logits."""
    return hf_onnx("llama")


@pytest.fixture(scope="session")
def llama_pos_onnx(hf_onnx) -> Path:
    """Tiny Llama with inputs input_ids and position_ids."""
    return hf_onnx("llama", with_position_ids=True)


@pytest.fixture(scope="session")
def neox_onnx(hf_onnx) -> Path:
    """Tiny GPTNeoXForCausalLM, partial rotary (8 of 16 channels)."""
    return hf_onnx("gpt_neox")


# ---------------------------------------------------------------- hand-written modules


@pytest.fixture(scope="session")
def module_onnx():
    """Factory: ``module_onnx(kind, **kw) -> (path, info)`` (see fixtures.modules.build)."""
    _need_torch()
    from fixtures.modules import build

    return build


@pytest.fixture(scope="session")
def interleaved_meta_onnx(module_onnx):
    return module_onnx("interleaved_rope_attention", variant="meta")


@pytest.fixture(scope="session")
def interleaved_gptj_onnx(module_onnx):
    return module_onnx("interleaved_rope_attention", variant="gptj")


@pytest.fixture(scope="session")
def legacy_gather_onnx(module_onnx):
    return module_onnx("legacy_cached_rope", variant="gather")


@pytest.fixture(scope="session")
def legacy_index_onnx(module_onnx):
    return module_onnx("legacy_cached_rope", variant="index")


@pytest.fixture(scope="session")
def legacy_slice_onnx(module_onnx):
    return module_onnx("legacy_cached_rope", variant="slice")


@pytest.fixture(scope="session")
def fp16_rope_onnx(module_onnx):
    return module_onnx("fp16_legacy_rope")


@pytest.fixture(scope="session")
def three_d_rope_onnx(module_onnx):
    return module_onnx("three_d_rope")
