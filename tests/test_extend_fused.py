"""--extend (SelfExtend, ReRoPE, Dual Chunk) and --logn-scaling together with --fuse ort / --fuse onnx, against the
references written from the papers in tests/test_attention_extend.py (each pair scored as (R(rel(i, j)) q_i) . k_j
with the model's own rotation, float64): the rotations of both position systems are fused RotaryEmbedding nodes
(the second one reads the mapped positions), attention stays unfused for the extensions (a fused attention op
computes one score matrix) and is fused for log-n (a per-query factor, applied to q before its rotation)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from tests.test_attention_extend import (  # noqa: E402
    CASES,
    TOL,
    _cli,
    hf_reference,
    module_reference,
    optimum_steps,
    qwen_logn,
    rel_dual_chunk,
    rel_rerope,
    rel_selfextend,
)

# method -> (flags on the tiny models trained on 64 positions, the paper's relative position, log-n,
#            extra q/k rotations per attention the method needs: a second q and k (SelfExtend, ReRoPE), two more
#            queries and one key (Dual Chunk: successive- and inter-chunk queries, keys at j mod s))
PREFILL = {
    "self-extend": (["--extend", "self-extend", "--group-size", "4", "--window", "8"],
                    lambda i, j: rel_selfextend(i, j, 8, 4), False, 2),
    "rerope": (["--extend", "rerope", "--window", "8"], lambda i, j: rel_rerope(i, j, 8), False, 2),
    "dual-chunk": (["--extend", "dual-chunk", "--chunk-size", "24", "--local-size", "8"],
                   lambda i, j: rel_dual_chunk(i, j, 24, 8), False, 3),
    "logn": (["--logn-scaling", "--original-max-positions", "64"], lambda i, j: (i - j).astype(np.float64), True,
             0),
    "rerope+logn": (["--extend", "rerope", "--window", "8", "--logn-scaling", "--original-max-positions", "64"],
                    lambda i, j: rel_rerope(i, j, 8), True, 2),
}
DECODE = {
    "self-extend": (["--extend", "self-extend", "--group-size", "3", "--window", "5"],
                    lambda i, j: rel_selfextend(i, j, 5, 3), False, 2),
    "rerope": (["--extend", "rerope", "--window", "5"], lambda i, j: rel_rerope(i, j, 5), False, 2),
    "dual-chunk": (["--extend", "dual-chunk", "--chunk-size", "7", "--local-size", "2"],
                   lambda i, j: rel_dual_chunk(i, j, 7, 2), False, 3),
    "logn": (["--logn-scaling", "--original-max-positions", "8"], lambda i, j: (i - j).astype(np.float64), True, 0),
}
ROTARY_DOMAIN = {"ort": "com.microsoft", "onnx": ""}


def _op_counts(path) -> dict[tuple[str, str], int]:
    ops: dict[tuple[str, str], int] = {}
    for node in onnx.load(str(path)).graph.node:
        ops[(node.domain, node.op_type)] = ops.get((node.domain, node.op_type), 0) + 1
    return ops


def _check_ops(path, src, fuse: str, layers: int, extra: int, tmp_path, capsys) -> None:
    """Both position systems rotate in fused RotaryEmbedding nodes (none written out: no Cos/Sin left); attention
    is unfused for the extensions; for log-n alone the model has the fused ops ``--fuse`` alone writes (fused
    attention included), plus the scaling."""
    ops = _op_counts(path)
    assert not ops.get(("", "Cos")) and not ops.get(("", "Sin")), ops
    rotary = ops.get((ROTARY_DOMAIN[fuse], "RotaryEmbedding"), 0)
    if extra:
        assert rotary == layers * (2 + extra), ops
        assert ops.get(("", "Softmax"), 0) >= layers, ops  # unfused: one per band of query rows (extend.py)
        assert not any(op in ("GroupQueryAttention", "MultiHeadAttention", "Attention") for _, op in ops), ops
        return
    plain = tmp_path / "fused-only.onnx"
    assert _cli(capsys, src, "--fuse", fuse, "--no-validate", "-o", plain).returncode == 0
    fused_ops = {k: n for k, n in _op_counts(plain).items() if k[0] == "com.microsoft" or k[1] in (
        "RotaryEmbedding", "Attention", "Softmax")}
    assert {k: ops.get(k, 0) for k in fused_ops} == fused_ops


@pytest.mark.parametrize("fuse", ["ort", "onnx"])
@pytest.mark.parametrize("case", sorted(PREFILL))
def test_dynamo_prefill_fused_matches_paper_reference(case, fuse, tmp_path, capsys):
    from fixtures.hf_models import export_hf_onnx, ort_logits

    flags, rel_fn, logn, extra = PREFILL[case]
    src = export_hf_onnx("llama", exporter="dynamo")
    out = tmp_path / "out.onnx"
    res = _cli(capsys, src, *flags, "--fuse", fuse, "-o", out)  # validated (no --no-validate)
    assert res.returncode == 0, res.stderr
    if extra:
        assert "attention left unfused" in res.stdout
    _check_ops(out, src, fuse, 2, extra, tmp_path, capsys)
    s = 96  # past the 64 trained positions
    ids = np.random.default_rng(3).integers(3, 128, size=(1, s)).astype(np.int64)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    ref = hf_reference("llama", ids, rel_fn(i, j), qwen_logn(s, 64) if logn else None)
    got = ort_logits(out, ids)
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()
    assert np.abs(ort_logits(src, ids) - ref).max() > 10 * TOL  # the rewrite changed what the model computes


@pytest.mark.parametrize("fuse", ["ort", "onnx"])
@pytest.mark.parametrize("case", sorted(DECODE))
def test_optimum_layout_fused_prefill_and_decode(case, fuse, tmp_path, capsys):
    """Optimum's layout (TorchScript, opset 14, KV cache): prefill of 9 tokens from an empty cache, then 15
    single-token steps fed the presents of the step before by name, batch 2, equal the paper reference."""
    from fixtures.hf_models import export_optimum_layout, optimum_layout_hf_model, ort_session

    flags, rel_fn, logn, extra = DECODE[case]
    src = export_optimum_layout()
    out = tmp_path / "out.onnx"
    res = _cli(capsys, src, *flags, "--fuse", fuse, "-o", out)
    assert res.returncode == 0, res.stderr
    _check_ops(out, src, fuse, 2, extra, tmp_path, capsys)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    sess = ort_session(out)
    s, batch = 24, 2
    ids = np.random.default_rng(7).integers(3, 128, size=(batch, s)).astype(np.int64)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    model = optimum_layout_hf_model()
    ref = hf_reference("llama", ids, rel_fn(i, j), qwen_logn(s, 8) if logn else None, model=model)
    for t, n, logits in optimum_steps(sess, model, ids, [9] + [1] * 15):
        err = np.abs(logits - ref[:, t:t + n]).max() / np.abs(ref[:, t:t + n]).max()
        assert err <= TOL, (t, n, err)


@pytest.mark.parametrize("kind,params,case,fuse", [
    ("interleaved_rope_attention", dict(variant="meta"), "self-extend", "ort"),  # interleaved pairs
    ("interleaved_rope_attention", dict(variant="gptj"), "rerope", "onnx"),  # [B, S, H, D], partial rotary
    ("legacy_cached_rope", dict(variant="gather"), "dual-chunk-small", "ort"),  # a gathered cos/sin table
    ("three_d_rope", {}, "rerope+logn32", "ort"),  # 3-D q/k
    ("interleaved_rope_attention", dict(variant="gptj"), "logn", "ort"),
])
def test_hand_written_modules_fused_match_paper_reference(module_onnx, kind, params, case, fuse, tmp_path, capsys):
    """Modules not written by HF (tests/test_attention_extend.py's): other layouts, partial rotary, a cached
    table and 3-D q/k, rotated by fused nodes in both position systems."""
    from fixtures.modules import ort_run

    path, info = module_onnx(kind, **params)
    flags, rel_fn, logn = CASES[case]
    out = tmp_path / "out.onnx"
    res = _cli(capsys, path, *flags, "--fuse", fuse, "-o", out)
    assert res.returncode == 0, res.stderr
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "Cos" not in ops and "Sin" not in ops
    extra = 3 if "dual-chunk" in case else 2 if "--extend" in flags else 0
    if extra:  # per attention of the module (a Softmax each before the rewrite, which runs one per band of rows)
        attentions = [n.op_type for n in onnx.load(str(path)).graph.node].count("Softmax")
        assert ops.count("RotaryEmbedding") == (2 + extra) * attentions > 0 and ops.count("Softmax") >= attentions
    else:  # log-n alone: attention fused around the scaled query
        assert {"GroupQueryAttention", "MultiHeadAttention"} & set(ops) and "Softmax" not in ops
    s = 60  # the cached-table module holds 64 rows
    ids = np.random.default_rng(5).integers(3, 128, size=(1, s)).astype(np.int64)
    i, j = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    ref = module_reference(info, ids, rel_fn(i, j), qwen_logn(s, 64 if logn is True else logn) if logn else None)
    assert np.abs(ort_run(out, ids) - ref).max() <= TOL * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("fuse", ["ort", "onnx"])
def test_leaky_rerope_with_fuse_refused(llama_onnx, fuse, tmp_path, capsys):
    res = _cli(capsys, llama_onnx, "--extend", "rerope", "--window", "8", "--leaky", "4", "--fuse", fuse,
               "-o", tmp_path / "o.onnx")
    assert res.returncode == 2
    assert res.stderr.startswith("posrewrite: error: ") and res.stderr.count("\n") == 1
    assert "Leaky" in res.stderr and "--fuse" in res.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_mapped_positions_past_the_fused_caches_refused(llama_onnx, tmp_path, capsys):
    """Dual Chunk puts inter-chunk queries at C: with C past the rows of the fused caches (4096 by default) the
    second RotaryEmbedding would read outside them for every token, so the rewrite is refused (exit 2)."""
    res = _cli(capsys, llama_onnx, "--extend", "dual-chunk", "--chunk-size", "5000", "--local-size", "8",
               "--fuse", "ort", "-o", tmp_path / "o.onnx")
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("posrewrite: error: ") and res.stderr.count("\n") == 1
    assert "5000" in res.stderr and "--max-positions" in res.stderr
    assert not (tmp_path / "o.onnx").exists()
