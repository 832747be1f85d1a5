"""Rescaling hand-written RoPE modules (interleaved, cached tables, 3-D q/k) against independent references.

Expected logits: fixtures.modules.reference_logits (a float64 numpy forward pass from the module's weights)
fed with the inverse frequencies and attention factor that Hugging Face's own ROPE_INIT_FUNCTIONS give for
the same rope_parameters.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures import modules as M
from posrewrite import api

L = 64


def _hf_inv_freq(method: str, info: dict) -> tuple[np.ndarray, float]:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rotary, heads = info["rotary_dim"], info["num_heads"]
    params = {"rope_type": method, "factor": 4.0, "rope_theta": info["base"]}
    if method != "linear":
        params["original_max_position_embeddings"] = L
    config = LlamaConfig(hidden_size=rotary * heads, num_attention_heads=heads, head_dim=rotary,
                         max_position_embeddings=L, rope_parameters=params)
    inv, factor = ROPE_INIT_FUNCTIONS[method](config, "cpu")
    return inv.double().numpy(), float(factor)


CASES = {
    "meta_interleaved": lambda: M.build_interleaved_rope_attention(variant="meta"),
    "gptj_interleaved_partial": lambda: M.build_interleaved_rope_attention(variant="gptj"),
    "legacy_gather": lambda: M.build_legacy_cached_rope(variant="gather"),
    "legacy_gathernd": lambda: M.build_legacy_cached_rope(variant="index"),
    "legacy_slice": lambda: M.build_legacy_cached_rope(variant="slice"),
    "three_d": lambda: M.build_three_d_rope(),
}


@pytest.mark.parametrize("method", ["linear", "yarn"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_module_rescale(case, method, tmp_path):
    path, info = CASES[case]()
    out = tmp_path / "out.onnx"
    result = api.rewrite(path, output=out, rope_scale=4.0, rope_method=method, original_max_positions=L)
    assert result.validation.ok, result.to_dict()["validation"]
    inv, factor = _hf_inv_freq(method, info)
    rng = np.random.default_rng(1)
    for n in (L // 2, 3 * L):
        ids = rng.integers(0, 100, size=(1, n))
        ref = M.reference_logits(info, ids, inv_freq=inv, attention_factor=factor)
        got = M.ort_run(out, ids)
        assert float(np.max(np.abs(ref - got))) <= 1e-4, f"{case} {method} at {n}"
