"""Inline weights (an .onnx file that holds its weights, as optimum-cli writes them) are never held in memory:
load_model leaves every raw_data payload of 1 KiB or more in the file (posrewrite.io.protowire), save_model copies
it file to file into the output, and the output is what onnx_ir's own load and save write (the writer used
before), byte for byte. Checked with onnx's full parse and onnxruntime, never with posrewrite's reader."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from posrewrite import api, errors
from posrewrite import io as pio

L = 128
YARN = dict(rope_scale=4.0, rope_method="yarn", original_max_positions=L)


def _inline_llama(folder: Path, hidden: int = 512, intermediate: int = 2048, vocab: int = 4096) -> Path:
    """The benchmark's Llama graph (Optimum layout) with random fp16 weights written inline in one file."""
    from fixtures.llama_graph import build_llama

    ext = build_llama(folder / "ext" / "model.onnx", layers=2, hidden=hidden, heads=8, kv_heads=2,
                      intermediate=intermediate, vocab=vocab)
    proto = onnx.load(os.fspath(ext))  # external data read: the fixture's weights are zeros
    rng = np.random.default_rng(0)
    for k, t in enumerate(proto.graph.initializer):
        if t.data_location == TensorProto.EXTERNAL or len(t.raw_data) >= 1024:
            values = numpy_helper.to_array(t)
            noise = (0.02 * rng.standard_normal(values.shape)).astype(values.dtype)
            proto.graph.initializer[k].CopyFrom(numpy_helper.from_array(noise, t.name))
    path = folder / "model.onnx"
    onnx.save(proto, os.fspath(path))
    return path


def _payload_bytes(path: Path) -> int:
    return sum(len(t.raw_data) for t in onnx.load(os.fspath(path)).graph.initializer if len(t.raw_data) >= 1024)


def _run(path: Path, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _llama_feeds(path: Path, n: int = 5) -> dict:
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feeds = {}
    rng = np.random.default_rng(1)
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(10, 1000, size=(1, n)).astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, n + 3), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(3, 3 + n, dtype=np.int64)[None]
        else:  # past key / value: [1, kv heads, 3, head size]
            shape = [1 if not isinstance(d, int) else d for d in i.shape]
            shape[2] = 3
            feeds[i.name] = rng.standard_normal(shape).astype(np.float16)
    return feeds


@pytest.fixture(scope="module")
def inline_llama(tmp_path_factory) -> Path:
    return _inline_llama(tmp_path_factory.mktemp("inline"))


def test_untouched_inline_weights_are_never_held_by_load_rewrite_or_save(inline_llama, tmp_path):
    weights = _payload_bytes(inline_llama)
    assert weights > 20 << 20
    api.rewrite(inline_llama, output=tmp_path / "warm.onnx", validate=False, **YARN)  # imports, caches
    tracemalloc.start()
    try:
        api.rewrite(inline_llama, output=tmp_path / "out.onnx", validate=False, **YARN)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the previous load (protobuf's parse of the file's bytes) and save (a new proto, then its bytes) held the
    # weights two to four times over
    assert peak < weights / 4, (peak, weights)
    src = {t.name: t.raw_data for t in onnx.load(os.fspath(inline_llama)).graph.initializer}
    out = onnx.load(os.fspath(tmp_path / "out.onnx"))
    assert not any(t.data_location == TensorProto.EXTERNAL for t in out.graph.initializer)
    assert not list(tmp_path.glob("out.onnx*.data"))
    big = [t for t in out.graph.initializer if len(t.raw_data) >= 1024 and t.name in src]
    assert len(big) >= 14 and all(t.raw_data == src[t.name] for t in big)


def test_the_rewritten_inline_model_runs_like_the_one_written_from_memory(inline_llama, tmp_path):
    """The rewrite of the lazily loaded model and the rewrite of the same model with its weights in memory (as
    the previous loader held them) write the same tensors, and onnxruntime gives the same outputs."""
    api.rewrite(inline_llama, output=tmp_path / "lazy.onnx", validate=False, **YARN)
    # the same rewrite, with every tensor read into memory at load (the previous loader)
    eager = pio.load_model(inline_llama)
    for value in eager.graph.initializers.values():
        t = value.const_value
        if isinstance(t, pio.InlineTensor):
            value.const_value = ir.Tensor(np.array(t.numpy()), name=t.name)
    api.rewrite(inline_llama, output=tmp_path / "eager.onnx", validate=False, loaded=eager, **YARN)
    # the same tensors in the same order (names of new values carry a per-process counter), the same outputs
    a, b = (onnx.load(os.fspath(tmp_path / f"{n}.onnx")) for n in ("lazy", "eager"))
    assert [(t.dims, t.data_type, t.raw_data) for t in a.graph.initializer] == [
        (t.dims, t.data_type, t.raw_data) for t in b.graph.initializer]
    assert len(a.graph.node) == len(b.graph.node)
    feeds = _llama_feeds(inline_llama)
    got, want = _run(tmp_path / "lazy.onnx", feeds), _run(tmp_path / "eager.onnx", feeds)
    assert all(np.isfinite(g.astype(np.float32)).all() for g in got)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))


def test_inline_output_is_what_onnx_ir_writes_byte_for_byte(inline_llama, tmp_path):
    ref = tmp_path / "ref.onnx"
    ir.save(ir.load(os.fspath(inline_llama)), ref)  # onnx_ir's eager load and save: the previous writer
    out = pio.save_model(pio.load_model(inline_llama), tmp_path / "out.onnx")
    assert out.read_bytes() == ref.read_bytes()


def test_weights_are_read_from_the_file_when_written_not_at_load(inline_llama, tmp_path):
    """Poison: after load_model, the bytes of one weight change in the file (same size, same times). The
    output holds the new bytes: nothing had read them at load. A file changed visibly is refused at save."""
    src = tmp_path / "model.onnx"
    src.write_bytes(inline_llama.read_bytes())
    proto = onnx.load(os.fspath(src))
    victim = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    data = src.read_bytes()
    at = data.find(victim.raw_data)
    assert at > 0 and data.count(victim.raw_data[:4096]) == 1
    model = pio.load_model(src)
    st = src.stat()
    poison = bytes(reversed(victim.raw_data))
    with open(src, "r+b") as f:
        f.seek(at)
        f.write(poison)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = pio.save_model(model, tmp_path / "out.onnx")
    written = {t.name: t.raw_data for t in onnx.load(os.fspath(out)).graph.initializer}
    assert written[victim.name] == poison
    # a visible change (new times): refused, nothing written
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(errors.OutputError, match="changed on disk"):
        pio.save_model(model, tmp_path / "again.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # the model object is intact: saved again, the same
    assert pio.save_model(model, tmp_path / "again.onnx").read_bytes() == out.read_bytes()


def _every_kind(path: Path) -> Path:
    """Large inline tensors in every place a TensorProto lives: a main-graph initializer, a Constant node's
    attribute, an If branch's initializers (a subgraph), beside a float_data tensor, a string tensor and a
    doc_string; all of them at least 1 KiB."""
    rng = np.random.default_rng(2)
    n = 256

    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    w = numpy_helper.from_array(arr(n, n), "W")
    w.doc_string = "a weight with a doc string"
    f = helper.make_tensor("F", TensorProto.FLOAT, [n], arr(n).tolist())  # float_data, not raw_data
    s = helper.make_tensor("S", TensorProto.STRING, [2], [b"a", b"b"])
    const = helper.make_node("Constant", [], ["C"], value=numpy_helper.from_array(arr(n), "c"))
    then_g = helper.make_graph([helper.make_node("Add", ["h3", "T1"], ["r"])], "then", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, n])],
                               initializer=[numpy_helper.from_array(arr(n), "T1")])
    else_g = helper.make_graph([helper.make_node("Sub", ["h3", "T2"], ["r2"])], "else", [],
                               [helper.make_tensor_value_info("r2", TensorProto.FLOAT, [1, n])],
                               initializer=[numpy_helper.from_array(arr(n), "T2")])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), const, helper.make_node("Add", ["h", "C"], ["h2"]),
             helper.make_node("Add", ["h2", "F"], ["h3"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Identity", ["S"], ["s"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n]),
                               helper.make_tensor_value_info("s", TensorProto.STRING, [2])],
                              initializer=[w, f, s])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, os.fspath(path))
    return path


def test_tensors_in_subgraphs_attributes_float_data_and_strings_round_trip(tmp_path):
    src = _every_kind(tmp_path / "m.onnx")
    model = pio.load_model(src)
    lazy = [t for t in pio.load.all_tensors(model) if isinstance(t, pio.InlineTensor)]
    # the main graph's initializers of 1 KiB or more (weights); a Constant's and the branches' tensors are parsed
    assert [t.name for t in lazy] == ["W"]
    out = pio.save_model(model, tmp_path / "o.onnx")
    ref = tmp_path / "ref.onnx"
    ir.save(ir.load(os.fspath(src)), ref)
    assert out.read_bytes() == ref.read_bytes()
    x = np.random.default_rng(3).standard_normal((1, 256)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        want, got = _run(src, feeds), _run(out, feeds)
        assert np.array_equal(want[0], got[0]) and list(want[1]) == list(got[1])
    # forced external: the weights go to the data file (copied file to file), the subgraphs' stay inline
    ext = pio.save_model(model, tmp_path / "e.onnx", external_data=True)
    assert (tmp_path / "e.onnx.data").exists()
    want, got = _run(src, {"x": x, "cond": np.array(True)}), _run(ext, {"x": x, "cond": np.array(True)})
    assert np.array_equal(want[0], got[0])


@pytest.mark.parametrize("damage", ["short raw_data", "long raw_data", "huge declared shape",
                                    "truncated in a payload", "truncated in a header"])
def test_lying_or_truncated_inline_tensors_are_exit_3(tmp_path, damage):
    src = _every_kind(tmp_path / "m.onnx")
    proto = onnx.load(os.fspath(src))
    if damage.endswith("raw_data"):
        w = proto.graph.initializer[0]
        w.raw_data = w.raw_data[:-4] if damage.startswith("short") else w.raw_data + b"\0" * 4
        onnx.save(proto, os.fspath(src))
    elif damage == "huge declared shape":  # 2^40 elements declared, 256 KiB of raw_data
        proto.graph.initializer[0].dims[:] = [2**20, 2**20]
        onnx.save(proto, os.fspath(src))
    else:
        data = src.read_bytes()
        at = data.find(proto.graph.initializer[0].raw_data)
        src.write_bytes(data[: at + 100] if "payload" in damage else data[: at - 3])
    with pytest.raises(errors.ModelLoadError) as exc:
        pio.load_model(src)
    assert "raw_data" in str(exc.value) or "truncated" in str(exc.value), str(exc.value)


def test_the_command_line_reads_the_model_once(inline_llama, tmp_path, monkeypatch, capsys):
    """The command line reads the model up front (a bad file fails fast) and hands it to the API: one load."""
    from posrewrite import cli

    calls = []
    real = pio.load_model
    monkeypatch.setattr(pio, "load_model", lambda path: calls.append(path) or real(path))
    assert cli.main(["inspect", str(inline_llama)]) == 0
    assert len(calls) == 1
    assert cli.main([str(inline_llama), "--rope-scale", "4", "--rope-method", "yarn", "--original-max-positions",
                     str(L), "--no-validate", "-o", str(tmp_path / "o.onnx")]) == 0
    assert len(calls) == 2


def test_a_hard_linked_model_file_reads_its_inline_weights(tmp_path):
    """onnx_ir refuses to map a hard-linked external data file; an inline weight lives in the model file itself,
    which the user gave (as before the weights stayed inline, a hard-linked .onnx is read)."""
    src = _every_kind(tmp_path / "m.onnx")
    os.link(src, tmp_path / "h.onnx")
    model = pio.load_model(tmp_path / "h.onnx")
    w = model.graph.initializers["W"].const_value
    assert isinstance(w, pio.InlineTensor)
    want = numpy_helper.to_array(next(t for t in onnx.load(os.fspath(src)).graph.initializer if t.name == "W"))
    assert np.array_equal(w.numpy(), want)
    out = pio.save_model(model, tmp_path / "o.onnx")
    assert out.read_bytes() == pio.save_model(pio.load_model(src), tmp_path / "p.onnx").read_bytes()
