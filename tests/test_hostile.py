"""Hostile and broken inputs: one test per family of failures, the reported bad inputs, and a
hypothesis fuzz test of the command line's contract over mutated models and argument lists.

Every command runs in-process through ``fixtures.hostile.run_cli``, which captures file descriptors 1 and 2, so
output written by native code (onnxruntime's log) counts too. Tests that could hang or exhaust memory on a
posrewrite without the bounds run in a subprocess with a timeout and a memory limit.
"""

from __future__ import annotations

import os
import resource
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from fixtures import hostile
from fixtures.hostile import external_tensor, rope_proto, run_cli, save, tree_digest, with_function_constant

REPO = Path(__file__).resolve().parents[1]
SECRET = b"TOP-SECRET-" * 8


def assert_error(run: hostile.Run, code: int, *fragments: str) -> None:
    lines = run.stderr.splitlines()
    assert run.code == code, (run.code, run.stderr)
    assert len(lines) == 1 and lines[0].startswith("posrewrite: error: "), run.stderr
    assert "Traceback" not in run.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    return d


@pytest.fixture
def out_dir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def rescale_args(model: Path, out: Path, *extra: str) -> list[str]:
    return [str(model), "--rope-scale", "2", "--original-max-positions", "64", "-o", str(out), *extra]


# ------------------------------------------------------------------------------- 1. file exfiltration


@pytest.mark.parametrize("where", ["function", "subgraph"])
def test_external_data_outside_the_folder_in_functions_and_subgraphs_is_refused(tmp_path, model_dir, out_dir, where):
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "SECRET.bin").write_bytes(SECRET)
    leak = external_tensor("leak", [4], "../secret/SECRET.bin", length=16)
    if where == "function":
        proto = with_function_constant(rope_proto(), leak)
    else:
        proto = rope_proto()
        then_g = helper.make_graph([helper.make_node("Constant", [], ["t"], value=leak)], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])])
        else_g = helper.make_graph([helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(
            np.zeros(4, np.float32)))], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])])
        proto.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
        proto.graph.node.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=then_g,
                                                 else_branch=else_g, name="if"))
        proto.graph.output.append(helper.make_tensor_value_info("if_out", TensorProto.FLOAT, [4]))
    model = save(proto, model_dir / "model.onnx")
    fuse = [str(model), "--fuse", "ort", "--no-validate", "-o", str(out_dir / "o.onnx")]
    for argv in (["inspect", str(model)], fuse):
        assert_error(run_cli(argv), 3, "outside")
    assert list(out_dir.iterdir()) == []


def test_function_external_data_is_read_from_the_models_folder_not_the_cwd(tmp_path, model_dir, out_dir, monkeypatch):
    inside = np.arange(4, dtype=np.float32)
    (model_dir / "w.bin").write_bytes(inside.tobytes())
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "w.bin").write_bytes(SECRET[:16])  # what a cwd-relative read would copy
    model = save(with_function_constant(rope_proto(), external_tensor("w", [4], "w.bin", length=16)),
                 model_dir / "model.onnx")
    monkeypatch.chdir(elsewhere)
    run = run_cli(rescale_args(model, out_dir / "o.onnx", "--no-validate"))
    assert run.code == 0, run.stderr
    written = onnx.load(out_dir / "o.onnx")  # external data loaded from beside it
    const = written.functions[0].node[0].attribute[0].t
    np.testing.assert_array_equal(numpy_helper.to_array(const), inside)
    assert all(SECRET[:16] not in p.read_bytes() for p in out_dir.iterdir())


# ----------------------------------------------------------------------- 2. output left after a failure


def test_validation_runs_before_the_output_exists_and_a_crash_there_leaves_nothing(model_dir, out_dir, monkeypatch):
    import posrewrite.validate as validate

    model = save(rope_proto(weight_elems=1024), model_dir / "model.onnx", external=True)
    out = out_dir / "o.onnx"
    seen = {}
    real = validate.validate_rewrite

    def watching(*args, **kwargs):
        seen["output existed during validation"] = out.exists()
        return real(*args, **kwargs)

    monkeypatch.setattr(validate, "validate_rewrite", watching)
    assert run_cli(rescale_args(model, out)).code == 0
    assert seen == {"output existed during validation": False}
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.onnx", "o.onnx.data"]

    def crashing(*args, **kwargs):
        raise RuntimeError("validation crashed")

    monkeypatch.setattr(validate, "validate_rewrite", crashing)
    out2 = out_dir / "o2.onnx"
    run = run_cli(rescale_args(model, out2))
    assert run.code == 1 and len(run.stderr.splitlines()) == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["o.onnx", "o.onnx.data"]


@pytest.mark.parametrize("flags", [["--rope-scale", "1e308"], ["--rope-scale", "2", "--original-max-positions",
                                                                   "1000000000000000"]])
def test_out_of_range_flags_exit_2_and_write_nothing(model_dir, out_dir, flags):
    model = save(rope_proto(weight_elems=1024), model_dir / "model.onnx", external=True)
    run = run_cli([str(model), *flags, "-o", str(out_dir / "o.onnx")])
    assert_error(run, 2, "over the limit")
    assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------- 3. model and data switched together


def _ort_output(path: Path) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"q": np.ones((1, 2, 5, 8), np.float32)})[0]


def test_an_interrupt_at_the_switch_keeps_the_previous_model_and_its_data(model_dir, out_dir, monkeypatch):
    model = save(rope_proto(weight_elems=1024), model_dir / "model.onnx", external=True)
    out = out_dir / "o.onnx"
    assert run_cli(rescale_args(model, out, "--no-validate")).code == 0
    before, expected = tree_digest(out_dir), _ort_output(out)
    real_replace = os.replace

    def interrupted(src, dst, *args, **kwargs):
        if Path(dst) == out:
            raise KeyboardInterrupt
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", interrupted)
    run = run_cli([str(model), "--rope-scale", "4", "--original-max-positions", "64", "--no-validate", "-o", str(out)])
    assert run.code == 130 and len(run.stderr.splitlines()) == 1
    assert tree_digest(out_dir) == before  # the old pair, whole; nothing else
    np.testing.assert_array_equal(_ort_output(out), expected)


def test_rewriting_over_an_output_switches_model_and_data_and_removes_the_old_data(model_dir, out_dir):
    model = save(rope_proto(weight_elems=1024), model_dir / "model.onnx", external=True)
    out = out_dir / "o.onnx"
    assert run_cli(rescale_args(model, out, "--no-validate")).code == 0
    first = _ort_output(out)
    run = run_cli([str(model), "--rope-scale", "4", "--original-max-positions", "64", "--no-validate", "-o", str(out)])
    assert run.code == 0, run.stderr
    names = sorted(p.name for p in out_dir.iterdir())
    # the new data went to a fresh name (the old o.onnx.data was never written to), the old one is gone
    assert len(names) == 2 and names[0] == "o.onnx" and names[1] != "o.onnx.data"
    assert names[1].startswith("o.onnx.") and names[1].endswith(".data")
    locations = {e.value for t in onnx.load(out, load_external_data=False).graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {names[1]}
    assert not np.array_equal(_ort_output(out), first)  # the new model, with its own data


_SIGTERM_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import posrewrite.validate as validate
    from posrewrite.cli import main

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    validate.validate_rewrite = killed
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_during_validation_leaves_nothing(model_dir, out_dir):
    model = save(rope_proto(weight_elems=1024), model_dir / "model.onnx", external=True)
    res = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT, *rescale_args(model, out_dir / "o.onnx")],
                         capture_output=True, text=True, cwd=REPO, timeout=120, env=_env())
    assert res.returncode == 143, (res.returncode, res.stderr[-500:])
    assert res.stderr.count("\n") == 1 and "terminated" in res.stderr
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------ 4. -o onto something not a file


def test_output_onto_a_fifo_or_device_or_into_a_missing_folder_is_exit_8(tmp_path, model_dir, out_dir):
    model = save(rope_proto(), model_dir / "model.onnx")
    fifo = out_dir / "fifo.onnx"
    os.mkfifo(fifo)
    targets = [fifo]
    if os.geteuid() == 0:  # a character device of our own (like /dev/null, which a failing run would replace)
        device = out_dir / "null.onnx"
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        targets.append(device)
    for target in targets:
        kind = stat.S_IFMT(os.lstat(target).st_mode)
        assert_error(run_cli(rescale_args(model, target, "--no-validate")), 8, "not a regular file")
        assert stat.S_IFMT(os.lstat(target).st_mode) == kind
    missing = tmp_path / "nowhere" / "o.onnx"
    assert_error(run_cli(rescale_args(model, missing, "--no-validate")), 8, "does not exist")
    assert not missing.parent.exists()
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in targets if p.parent == out_dir)


def test_plot_into_a_missing_folder_is_exit_8_and_creates_nothing(tmp_path, model_dir):
    pytest.importorskip("matplotlib")
    model = save(rope_proto(), model_dir / "model.onnx")
    missing = tmp_path / "nowhere" / "plot.png"
    run = run_cli(["plot", str(model), "--original-max-positions", "64", "-o", str(missing)])
    assert_error(run, 8, "does not exist")
    assert not missing.parent.exists()


# ------------------------------------------------------------------------------- 5. non-UTF-8 strings


@pytest.mark.parametrize("field", ["doc_string", "metadata", "node_name"])
def test_a_non_utf8_string_is_exit_3(model_dir, out_dir, field):
    proto = rope_proto()
    marker = "MARKER-Z"
    if field == "doc_string":
        proto.doc_string = marker
    elif field == "metadata":
        proto.metadata_props.add(key="k", value=marker)
    else:
        proto.graph.node[0].name = marker
    path = model_dir / "model.onnx"
    path.write_bytes(proto.SerializeToString().replace(marker.encode(), b"MARKER-\xff"))
    assert_error(run_cli(rescale_args(path, out_dir / "o.onnx", "--no-validate")), 3, "UTF-8")
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------------------- 6. bounds


def test_a_huge_static_length_is_not_materialised(model_dir, out_dir):
    model = save(rope_proto(seq=2**40), model_dir / "model.onnx")
    run = run_cli(["inspect", str(model), "--json"])
    assert run.code == 0, run.stderr
    assert '"kind": "rope"' in run.stdout
    assert_error(run_cli(rescale_args(model, out_dir / "o.onnx")), 2, "memory budget", "--no-validate")
    assert list(out_dir.iterdir()) == []


def _bounded_cli(args: list[str], *, timeout: float = 60, memory: int = 3 << 30) -> subprocess.CompletedProcess:
    """The command in a subprocess that cannot hang or take the machine's memory (limits that a posrewrite
    without bounds would hit)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "posrewrite", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=_env(), preexec_fn=limit)


def test_check_max_length_and_max_positions_past_the_cap_are_exit_2(model_dir):
    model = save(rope_proto(), model_dir / "model.onnx")
    for args, flag in ((["check", str(model), "--max-length", "1000000000000"], "--max-length"),
                       ([str(model), "--max-positions", "10000000", "-o", str(model_dir / "o.onnx")],
                        "--max-positions")):
        res = _bounded_cli(args)
        assert res.returncode == 2, res.stderr[-300:]
        assert res.stderr.startswith("posrewrite: error: ") and res.stderr.count("\n") == 1 and flag in res.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "huge_number"])
def test_config_json_is_read_only_when_a_small_regular_file_with_sane_numbers(model_dir, out_dir, kind):
    model = save(rope_proto(), model_dir / "model.onnx")
    config = model_dir / "config.json"
    if kind == "fifo":
        os.mkfifo(config)
    elif kind == "dev_zero":
        config.symlink_to("/dev/zero")
    else:
        config.write_text('{"max_position_embeddings": 1e300, "rope_theta": 10000}')
    res = _bounded_cli([str(model), "--rope-scale", "2", "--rope-method", "yarn", "-o", str(out_dir / "o.onnx")])
    assert res.returncode == (2 if kind == "huge_number" else 3), res.stderr[-300:]
    assert res.stderr.startswith("posrewrite: error: ") and res.stderr.count("\n") == 1
    assert list(out_dir.iterdir()) == []


# ----------------------------------------------------------------- 7. broken inputs silently "fixed"


def test_external_data_shorter_than_its_shape_is_refused_not_zero_filled(model_dir, out_dir):
    proto = rope_proto()
    proto.graph.initializer.append(external_tensor("W", [16], "w.bin", length=8))  # 64 bytes needed
    (model_dir / "w.bin").write_bytes(b"\x01" * 64)
    path = save(proto, model_dir / "model.onnx")
    assert_error(run_cli(rescale_args(path, out_dir / "o.onnx", "--no-validate")), 3, "declares 8 bytes")
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("what", ["sparse_initializer", "training_info"])
def test_what_would_be_dropped_is_refused(model_dir, out_dir, what):
    proto = rope_proto()
    if what == "sparse_initializer":
        sp = proto.graph.sparse_initializer.add()
        sp.values.CopyFrom(numpy_helper.from_array(np.ones(2, np.float32), "sv"))
        sp.indices.CopyFrom(numpy_helper.from_array(np.array([0, 3], np.int64), "si"))
        sp.dims.extend([4])
    else:
        proto.training_info.add()
    path = save(proto, model_dir / "model.onnx")
    assert_error(run_cli(rescale_args(path, out_dir / "o.onnx", "--no-validate")), 3, what.split("_")[0])
    assert list(out_dir.iterdir()) == []


def test_a_model_onnxruntime_cannot_load_is_exit_3_not_skipped(model_dir, out_dir):
    proto = rope_proto()
    for node in proto.graph.node:
        if node.output[0] == "y":
            node.output[0] = "y_pre"
    proto.graph.node.append(helper.make_node("Mystery", ["y_pre"], ["y"], domain="nowhere.custom", name="mystery"))
    proto.opset_import.append(helper.make_opsetid("nowhere.custom", 1))
    path = save(proto, model_dir / "model.onnx")
    assert_error(run_cli(rescale_args(path, out_dir / "o.onnx")), 3, "onnxruntime cannot load")
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------- 8. bad inputs: exit 2 or 3, not 1


def _empty_input_name(p):
    p.graph.input[0].name = ""


def _cos_without_inputs(p):
    next(n for n in p.graph.node if n.op_type == "Cos").ClearField("input")


def _dtype_undefined(p):
    p.graph.initializer[0].data_type = TensorProto.UNDEFINED


def _raw_data_short(p):
    t = p.graph.initializer[0]
    t.raw_data = t.raw_data[:-2]


def _string_inv_freq(p):
    t = p.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_type = TensorProto.STRING
    t.string_data.extend([b"a", b"b", b"c", b"d"])


def _nul_in_location(p):
    p.graph.initializer.append(external_tensor("W", [4], "w.bin\x00../../etc/passwd", length=16))


def _negative_dim(p):
    p.graph.initializer[0].dims[0] = -1


def _offset_not_a_number(p):
    p.graph.initializer.append(external_tensor("W", [4], "w.bin", length=16))
    p.graph.initializer[-1].external_data[1].value = "ten"


def _duplicate_attribute(p):
    node = next(n for n in p.graph.node if n.op_type == "Concat")
    node.attribute.append(helper.make_attribute("axis", 0))


def _untyped_attribute(p):
    node = next(n for n in p.graph.node if n.op_type == "Concat")
    node.attribute[0].type = onnx.AttributeProto.UNDEFINED


def _huge_opset(p):
    p.opset_import[0].version = 10**9


def _rotary_without_caches(p):
    p.graph.node.append(helper.make_node("RotaryEmbedding", ["q"], ["r"], domain="com.microsoft", name="rot"))
    p.opset_import.append(helper.make_opsetid("com.microsoft", 1))


_BAD_MODELS = [_empty_input_name, _cos_without_inputs, _dtype_undefined, _raw_data_short, _string_inv_freq,
               _nul_in_location, _negative_dim, _offset_not_a_number, _duplicate_attribute, _untyped_attribute,
               _huge_opset]


@pytest.mark.parametrize("mutation", _BAD_MODELS, ids=lambda f: f.__name__.strip("_"))
def test_bad_models_are_exit_3_with_one_line(model_dir, out_dir, mutation):
    proto = rope_proto()
    mutation(proto)
    (model_dir / "w.bin").write_bytes(b"\x00" * 16)
    path = model_dir / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    before = tree_digest(model_dir)
    for argv in (["inspect", str(path)], rescale_args(path, out_dir / "o.onnx", "--no-validate")):
        assert_error(run_cli(argv), 3)
    assert tree_digest(model_dir) == before and list(out_dir.iterdir()) == []


def test_a_rotary_node_without_caches_is_not_an_internal_error(model_dir):
    proto = rope_proto()
    _rotary_without_caches(proto)
    path = model_dir / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    run = run_cli(["inspect", str(path)])
    assert run.code == 0 and run.stderr == "", run.stderr


_BAD_FLAGS = [
    (["-o", ""], "output"),
    (["--rope-params", "[" * 100000 + "]" * 100000], "rope-params"),
    (["--rope-params", '{"a":' * 5000 + "1" + "}" * 5000], "nested"),
    (["--rope-params", '{"factor": 1' + "0" * 400 + "}"], "factor"),
    (["--rope-params", '{"factor": 2, "beta_fast": "abc"}'], "beta_fast"),
]


@pytest.mark.parametrize("flags,fragment", _BAD_FLAGS, ids=["empty-o", "deep-list", "deep-object", "400-digits",
                                                             "string-beta"])
def test_bad_flags_are_exit_2_with_one_line(model_dir, flags, fragment):
    model = save(rope_proto(), model_dir / "model.onnx")
    argv = [str(model), "--rope-scale", "2", "--original-max-positions", "64", *flags]
    if "-o" not in flags:
        argv += ["-o", str(model_dir / "o.onnx")]
    assert_error(run_cli(argv), 2, fragment)


@pytest.mark.parametrize("config", ['{"max_position_embeddings": [4096], "rope_theta": 10000}',
                                    '{"max_position_embeddings": 4096, "rope_theta": "abc"}'],
                         ids=["list-length", "string-theta"])
def test_bad_config_values_are_exit_2(model_dir, out_dir, config):
    model = save(rope_proto(), model_dir / "model.onnx")
    (model_dir / "config.json").write_text(config)
    run = run_cli([str(model), "--rope-scale", "2", "--rope-method", "yarn", "-o", str(out_dir / "o.onnx")])
    assert_error(run, 2, "config.json")
    assert list(out_dir.iterdir()) == []


# --------------------------------------------------------------------------- 9. stderr and terminals


def test_terminal_escapes_from_the_model_are_not_printed_raw(model_dir):
    proto = rope_proto()
    evil = "\x1b]0;pwned\x07\x1b[2Jcos"
    for node in proto.graph.node:
        node.output[:] = [evil if o == "cos" else o for o in node.output]
        node.input[:] = [evil if i == "cos" else i for i in node.input]
    path = save(proto, model_dir / "model.onnx")
    run = run_cli(["inspect", str(path)])
    assert run.code == 0, run.stderr
    assert "\x1b" not in run.stdout and "\x07" not in run.stdout
    assert "\\x1b]0;pwned\\x07" in run.stdout  # shown, escaped


def test_library_logs_stay_off_stderr_unless_debug(model_dir, out_dir):
    proto = rope_proto()
    proto.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 7  # onnx_ir's shape inference logs a traceback
    proto.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "unused"))
    path = save(proto, model_dir / "model.onnx")
    # a subprocess: under pytest, logging goes to pytest's handler instead of stderr
    res = _bounded_cli(rescale_args(path, out_dir / "o.onnx"))
    assert res.returncode == 0 and res.stderr == "", res.stderr[-500:]
    debug = _bounded_cli(rescale_args(path, out_dir / "o2.onnx", "--debug"))
    assert debug.returncode == 0 and "Shape inference failed" in debug.stderr


def test_check_says_why_it_exits_7(model_dir):
    path = save(rope_proto(dtype=TensorProto.FLOAT16), model_dir / "model.onnx")
    run = run_cli(["check", str(path), "--max-length", "65536"])
    assert_error(run, 7, "unsafe", "--fp32-positions")


# ------------------------------------------------------------------------------------------ fuzzing


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


_extra_flags = st.lists(st.tuples(st.sampled_from(sorted(hostile.FLAG_VALUES)), st.integers(0, 20)), max_size=2)


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 3), which=st.integers(0, len(hostile.ARG_LISTS) - 1),
       extra=st.one_of(st.just([]), _extra_flags))
def test_fuzz_the_command_line_contract(tmp_path_factory, seed, rounds, which, extra):
    root = tmp_path_factory.mktemp("fuzz")
    model_dir, out_dir = root / "model", root / "out"
    out_dir.mkdir()
    base = save(rope_proto(weight_elems=1024), model_dir / "model.onnx", external=True)
    (root / "secret.bin").write_bytes(SECRET)
    base.write_bytes(hostile.mutate(base.read_bytes(), seed, rounds=rounds))
    args = hostile.ARG_LISTS[which]
    if args[0] == "{model}":  # a rewrite: hostile flag values too
        args = args + hostile.fill_extra(extra)
    argv = hostile.fill_args(args, model=base, out=out_dir / "out.onnx", missing=root / "nowhere" / "out.onnx")
    before = tree_digest(model_dir)
    run = run_cli(argv)
    written = sorted(p.name for p in out_dir.iterdir())
    problems = hostile.contract_violations(run, before=before, after=tree_digest(model_dir), out_files=written)
    assert not problems, (seed, rounds, argv[1:], problems, run.stderr[-400:])
    assert all(SECRET not in p.read_bytes() for p in out_dir.iterdir())
    assert not (root / "nowhere").exists()
