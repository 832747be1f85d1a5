"""The ONNX and fx sides rescale the same model to the same numbers, for every RoPE scaling method.

One tiny HF Llama (weights fixed by the seed) is exported twice: to ONNX (rewritten by ``posrewrite.api.rewrite``,
run in onnxruntime) and with ``torch.export`` (rewritten by ``posrewrite.torch.rewrite``, run in torch). Both are
rescaled with the same options; their logits are compared below and past the training length (dynamic and
LongRoPE switch there). tests/test_runtime_formulas.py checks the run-time inv_freq formula of the two sides
in isolation; this checks the whole rewrites, static and run-time methods alike.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import posrewrite.torch as pt  # noqa: E402
from fixtures.hf_models import ARCHS, LogitsOnlyWithPositions, build_hf_model, export_hf_onnx, ort_logits  # noqa: E402
from posrewrite import api  # noqa: E402

ARCH = "llama"
SPEC = ARCHS[ARCH]
L = SPEC.max_position_embeddings
D = SPEC.rotary_dim

#: method -> rewrite options (the same keywords for api.rewrite and posrewrite.torch.rewrite)
METHODS = {
    "linear": dict(rope_scale=4.0, rope_method="linear"),
    "ntk": dict(rope_scale=4.0, rope_method="ntk"),
    "dynamic": dict(rope_scale=4.0, rope_method="dynamic", original_max_positions=L),
    "yarn": dict(rope_scale=4.0, rope_method="yarn", original_max_positions=L),
    "llama3": dict(rope_scale=4.0, rope_method="llama3", original_max_positions=L // 4,
                   rope_params={"low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "longrope": dict(rope_scale=4.0, rope_method="longrope", original_max_positions=L,
                     rope_params={"short_factor": [1.0 + 0.05 * i for i in range(D // 2)],
                                  "long_factor": [1.5 + 0.4 * i for i in range(D // 2)]}),
    "base": dict(rope_base=50000.0),
}


@functools.cache
def _fx_program() -> torch.export.ExportedProgram:
    model = build_hf_model(ARCH)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8)[None].contiguous()
    s = torch.export.Dim("seq", max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(LogitsOnlyWithPositions(model), (ids, pos),
                                   dynamic_shapes=({1: s}, {1: s}))


def _ids(n: int) -> np.ndarray:
    vocab = SPEC.config_kwargs.get("vocab_size", 128)
    return np.random.default_rng(n).integers(3, vocab, size=(1, n))


def _fx_logits(program: torch.export.ExportedProgram, ids: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(ids)
    with torch.no_grad():
        return program.module()(t, torch.arange(t.shape[1])[None]).numpy()


@pytest.mark.parametrize("method", list(METHODS))
def test_onnx_and_fx_rescales_agree(method, tmp_path):
    options = METHODS[method]
    src = export_hf_onnx(ARCH)
    out = tmp_path / f"{method}.onnx"
    result = api.rewrite(src, output=out, **options)
    assert result.modified
    new = pt.rewrite(_fx_program(), **options)
    for n in (L // 2, 3 * L):
        ids = _ids(n)
        onnx_logits = ort_logits(out, ids)
        fx_logits = _fx_logits(new, ids)
        # float32 end to end on both sides: the same numbers up to operation-order round-off, a few tens of
        # float32 eps of the logits' magnitude (a different method or a wrong factor moves them by ~1e-2)
        bound = 64 * np.finfo(np.float32).eps * float(np.max(np.abs(fx_logits)))
        err = float(np.max(np.abs(onnx_logits - fx_logits)))
        assert err <= bound, f"{method} at {n} tokens: ONNX vs fx max |diff| {err:.3g} > {bound:.3g}"
    # both really rescaled: past the training length the rescaled model differs from the original
    ids = _ids(3 * L)
    assert np.max(np.abs(ort_logits(src, ids) - ort_logits(out, ids))) > 1e-4
