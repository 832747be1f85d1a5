"""posrewrite.io: lazy loading, one-line load errors, atomic saves that never touch the input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from posrewrite import io as pio
from posrewrite.errors import ModelLoadError, OutputError, UsageError

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- helpers


def default_weight() -> np.ndarray:
    return (np.arange(3 * 256, dtype=np.float32) / 100).reshape(3, 256)  # 3 KiB: big enough to go external


def make_proto(opset: int = 17, weight: np.ndarray | None = None) -> onnx.ModelProto:
    """y = x @ W + b with W [3, 256] (or ``weight``)."""
    w = default_weight() if weight is None else weight
    b = np.full((w.shape[1],), 0.5, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, w.shape[1]])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="test")
    proto.ir_version = 8
    return proto


def write_inline(path: Path, **kw) -> Path:
    onnx.save(make_proto(**kw), path)
    return path


def write_external(path: Path, **kw) -> Path:
    """The model with every tensor in ``<name>.data`` beside it."""
    onnx.save_model(
        make_proto(**kw),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_ort(path: Path) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.ones((2, 3), dtype=np.float32)
    return sess.run(None, {"x": x})[0]


EXPECTED = np.ones((2, 3), dtype=np.float32) @ default_weight() + 0.5


# ---------------------------------------------------------------------------------------------------- load


def test_load_inline_model(tmp_path):
    path = write_inline(tmp_path / "m.onnx")
    model = pio.load_model(path)
    assert isinstance(model, ir.Model)
    assert [n.op_type for n in model.graph] == ["MatMul", "Add"]
    assert pio.source_path(model) == path.resolve()


def test_load_external_model_is_lazy_and_checked(tmp_path):
    path = write_external(tmp_path / "m.onnx")
    model = pio.load_model(path)
    w = model.graph.initializers["W"].const_value
    assert isinstance(w, ir.ExternalTensor)
    assert w.raw is None  # nothing mapped or read yet
    np.testing.assert_array_equal(w.numpy(), default_weight())
    assert pio.external_data_files(model) == [(tmp_path / "m.onnx.data").resolve()]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "empty file"),
        (b"hello, I am not a model\n", "not an ONNX model"),
        (b"\x08\x08", "not an ONNX model"),  # parses as a bare ir_version: no graph
        (json.dumps({"model_type": "llama"}).encode(), "not an ONNX model"),
    ],
)
def test_load_rejects_non_onnx(tmp_path, content, fragment):
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=fragment) as info:
        pio.load_model(path)
    assert info.value.exit_code == 3
    assert "\n" not in str(info.value)


def test_load_rejects_every_truncation(tmp_path):
    data = make_proto(weight=np.ones((3, 4), dtype=np.float32)).SerializeToString()
    path = tmp_path / "m.onnx"
    for cut in range(1, len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            pio.load_model(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        pio.load_model(tmp_path / "absent.onnx")


def test_load_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        pio.load_model(tmp_path)


def test_load_missing_external_data(tmp_path):
    path = write_external(tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match=r"external data file 'm\.onnx\.data' .* is missing"):
        pio.load_model(path)


def test_load_truncated_external_data(tmp_path):
    path = write_external(tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:20])
    with pytest.raises(ModelLoadError, match="truncated"):
        pio.load_model(path)


def test_load_rejects_old_opset(tmp_path):
    path = write_inline(tmp_path / "m.onnx", opset=6)
    with pytest.raises(ModelLoadError, match="opset 6 is older than 7"):
        pio.load_model(path)


def test_load_rejects_opset_newer_than_onnxruntime(tmp_path):
    opset = pio.max_supported_opset() + 1
    path = write_inline(tmp_path / "m.onnx", opset=opset)
    with pytest.raises(ModelLoadError, match=f"opset {opset} is newer than onnxruntime"):
        pio.load_model(path)


def test_max_supported_opset_is_runnable():
    import onnxruntime as ort

    top = pio.max_supported_opset()
    assert top >= 21
    proto = make_proto(opset=top)
    ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import onnx_ir as ir
    from posrewrite import io as pio

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    before = rss()
    model = pio.load_model(sys.argv[1])
    after_load = rss()
    w = model.graph.initializers["W"].const_value
    out = {"load_growth": after_load - before, "external": isinstance(w, ir.ExternalTensor),
           "unread": w.raw is None}
    if len(sys.argv) > 2:
        pio.save_model(model, sys.argv[2])
        out["save_growth"] = rss() - after_load
    print(json.dumps(out))
    """
)


def _big_external_model(tmp_path: Path, nbytes: int) -> Path:
    """A model whose W lives in a sparse external file of ``nbytes`` (no disk blocks, no memory to build)."""
    rows = nbytes // (4 * 1024)
    proto = make_proto(weight=np.zeros((1, 1), dtype=np.float32))
    w = proto.graph.initializer[0]
    del w.dims[:]
    w.dims.extend([rows, 1024])
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.onnx.data"), ("offset", "0"), ("length", str(rows * 1024 * 4))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    path = tmp_path / "big.onnx"
    onnx.save(proto, path)
    with open(tmp_path / "big.onnx.data", "wb") as f:
        f.truncate(rows * 1024 * 4)
    return path


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read RSS")
def test_load_does_not_read_weights(tmp_path):
    path = _big_external_model(tmp_path, 200 * 2**20)
    res = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True, cwd=REPO, check=True, env=_env()
    )
    info = json.loads(res.stdout)
    assert info["external"] and info["unread"]
    assert info["load_growth"] < 40 * 2**20, info


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read RSS")
def test_save_streams_untouched_external_tensors(tmp_path):
    path = _big_external_model(tmp_path, 128 * 2**20)
    out = tmp_path / "out" / "copy.onnx"
    out.parent.mkdir()
    res = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(path), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
        env=_env(),
    )
    info = json.loads(res.stdout)
    assert info["save_growth"] < 48 * 2**20, info
    assert (out.parent / "copy.onnx.data").stat().st_size == 128 * 2**20


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


# ---------------------------------------------------------------------------------------------------- save


def test_default_output_path():
    assert pio.default_output_path(Path("/m/model.onnx"), "yarn4") == Path("/m/model.yarn4.onnx")
    assert pio.default_output_path(Path("model.onnx"), ".fp32pos") == Path("model.fp32pos.onnx")
    assert pio.default_output_path(Path("/m/model"), "x") == Path("/m/model.x.onnx")
    with pytest.raises(UsageError):
        pio.default_output_path(Path("model.onnx"), "")


def test_save_inline_round_trip_leaves_input_untouched(tmp_path):
    src = write_inline(tmp_path / "m.onnx")
    before = digest(src)
    model = pio.load_model(src)
    out = pio.save_model(model, tmp_path / "m.new.onnx")
    assert out == (tmp_path / "m.new.onnx").resolve()
    assert digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.new.onnx", "m.onnx"]
    np.testing.assert_allclose(run_ort(out), EXPECTED)


def test_save_external_round_trip(tmp_path):
    (tmp_path / "in").mkdir()
    src = write_external(tmp_path / "in" / "m.onnx")
    before = {p.name: digest(p) for p in src.parent.iterdir()}
    model = pio.load_model(src)
    (tmp_path / "out").mkdir()  # the output folder is never created: a missing one is an error
    out = pio.save_model(model, tmp_path / "out" / "r.onnx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.onnx", "r.onnx.data"]
    locations = {
        e.value
        for t in onnx.load(out, load_external_data=False).graph.initializer
        for e in t.external_data
        if e.key == "location"
    }
    assert locations == {"r.onnx.data"}
    assert {p.name: digest(p) for p in src.parent.iterdir()} == before
    np.testing.assert_allclose(run_ort(out), EXPECTED)
    # the saved model loads lazily again, and the in-memory model is still usable
    again = pio.load_model(out)
    assert isinstance(again.graph.initializers["W"].const_value, ir.ExternalTensor)
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), default_weight())


def test_save_changed_tensor_with_external_data(tmp_path):
    src = write_external(tmp_path / "m.onnx")
    model = pio.load_model(src)
    model.graph.initializers["b"].const_value = ir.tensor(np.full((256,), 2.0, dtype=np.float32), name="b")
    out = pio.save_model(model, tmp_path / "m2.onnx")
    np.testing.assert_allclose(run_ort(out), EXPECTED + 1.5)


def test_save_auto_goes_external_when_large(tmp_path, monkeypatch):
    model = pio.load_model(write_inline(tmp_path / "m.onnx"))
    monkeypatch.setattr(pio.output, "INLINE_LIMIT_BYTES", 16)
    out = pio.save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    np.testing.assert_allclose(run_ort(out), EXPECTED)


def test_save_inline_on_request(tmp_path):
    model = pio.load_model(write_external(tmp_path / "m.onnx"))
    out = pio.save_model(model, tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    np.testing.assert_allclose(run_ort(out), EXPECTED)
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)  # model left as it was


def test_save_replaces_an_existing_output(tmp_path):
    model = pio.load_model(write_inline(tmp_path / "m.onnx"))
    target = tmp_path / "o.onnx"
    target.write_bytes(b"old")
    pio.save_model(model, target)
    np.testing.assert_allclose(run_ort(target), EXPECTED)


def test_save_refuses_the_input(tmp_path):
    src = write_external(tmp_path / "m.onnx")
    before = digest(src), digest(tmp_path / "m.onnx.data")
    model = pio.load_model(src)
    with pytest.raises(UsageError, match="is the input model"):
        pio.save_model(model, src)
    with pytest.raises(UsageError, match="is the input model"):
        pio.save_model(model, tmp_path / "." / "m.onnx")
    # an output whose data file would be the input's data file
    with pytest.raises(UsageError, match="external data"):
        pio.save_model(model, tmp_path / "m.onnx.data")
    assert (digest(src), digest(tmp_path / "m.onnx.data")) == before


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    src = write_external(tmp_path / "m.onnx")
    model = pio.load_model(src)
    real_save = pio.output._write_model

    def failing_save(m, path, **kw):
        real_save(m, path, **kw)  # everything written beside the output ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(pio.output, "_write_model", failing_save)
    with pytest.raises(OutputError, match="No space left on device"):
        pio.save_model(model, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_failed_save_keeps_previous_output(tmp_path, monkeypatch):
    model = pio.load_model(write_inline(tmp_path / "m.onnx"))
    target = tmp_path / "o.onnx"
    target.write_bytes(b"previous")

    def failing_save(m, path, **kw):
        Path(path).write_bytes(b"half")
        raise RuntimeError("boom")

    monkeypatch.setattr(pio.output, "_write_model", failing_save)
    with pytest.raises(RuntimeError):
        pio.save_model(model, target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx"]


def test_save_to_a_directory_fails_cleanly(tmp_path):
    model = pio.load_model(write_inline(tmp_path / "m.onnx"))
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(OutputError, match="directory"):
        pio.save_model(model, tmp_path / "d.onnx")


def test_save_under_a_file_fails_cleanly(tmp_path):
    model = pio.load_model(write_inline(tmp_path / "m.onnx"))
    (tmp_path / "f").write_text("a file")
    with pytest.raises(OutputError) as info:
        pio.save_model(model, tmp_path / "f" / "o.onnx")
    assert info.value.exit_code == 8


def test_loading_keeps_no_state_between_calls(tmp_path):
    path = write_inline(tmp_path / "m.onnx")
    first = pio.load_model(path)
    assert pio.load_model(path) is not first
    assert not [name for name, value in vars(pio.load).items() if isinstance(value, dict) and name != "__builtins__"]
