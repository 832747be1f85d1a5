"""The command line's error paths, exit codes and output discipline, and option parsing.

Everything here runs without the detection/rewrite machinery: bad files fail at load time, bad options before
any model is read. The last section drives the output formatting with a stand-in for ``posrewrite.api``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import posrewrite
from posrewrite.cli import main
from posrewrite.config import load_rope_params, read_config_json
from posrewrite.errors import (
    EXIT_CODES,
    ModelLoadError,
    NoEncodingError,
    OutputError,
    PartialMatchError,
    PosrewriteError,
    UnsafeModelError,
    UsageError,
    ValidationError,
)
from posrewrite.options import RewriteOptions
from posrewrite.plan import requested_rope_parameters

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------- helpers


def _proto() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((3, 300), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 300])],
        [w],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(_proto(), path)
    return path


@pytest.fixture
def external_model(tmp_path) -> Path:
    path = tmp_path / "e.onnx"
    onnx.save_model(_proto(), path, save_as_external_data=True, location="e.onnx.data", size_threshold=0)
    return path


def _snapshot(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "posrewrite", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def assert_one_error_line(stderr: str, fragment: str = "") -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("posrewrite: error: "), stderr
    assert fragment in lines[0], stderr
    assert "Traceback" not in stderr


# ---------------------------------------------------------------------------------------------- exceptions


def test_exit_codes_are_distinct_and_documented():
    classes = [
        UsageError,
        ModelLoadError,
        NoEncodingError,
        PartialMatchError,
        ValidationError,
        UnsafeModelError,
        OutputError,
    ]
    codes = [c.exit_code for c in classes]
    assert codes == [2, 3, 4, 5, 6, 7, 8]
    assert all(issubclass(c, PosrewriteError) for c in classes)
    assert sorted(EXIT_CODES) == list(range(9))


def test_error_messages_are_one_line():
    assert str(UsageError("a\n  b")) == "a b"


# ------------------------------------------------------------------------------ bad models, via subprocess


def test_not_onnx_subprocess(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n")
    res = run_cli("inspect", str(bad))
    assert res.returncode == 3
    assert_one_error_line(res.stderr, "not an ONNX model")
    assert res.stdout == ""


def test_truncated_protobuf_subprocess(tmp_path, model):
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    before = _snapshot(tmp_path)
    res = run_cli(str(model), "--rope-scale", "4")
    assert res.returncode == 3
    assert_one_error_line(res.stderr, "corrupt or truncated")
    assert _snapshot(tmp_path) == before


def test_missing_external_data_subprocess(tmp_path, external_model):
    (tmp_path / "e.onnx.data").unlink()
    res = run_cli(str(external_model), "--rope-scale", "2", "--rope-method", "yarn", "--original-max-positions", "64")
    assert res.returncode == 3
    assert_one_error_line(res.stderr, "e.onnx.data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.onnx"]


def test_missing_file_subprocess(tmp_path):
    res = run_cli("check", str(tmp_path / "absent.onnx"))
    assert res.returncode == 3
    assert_one_error_line(res.stderr, "no such file")


def test_python_dash_m_runs_the_cli(tmp_path, monkeypatch, capsys):
    """posrewrite/__main__.py, run as `python -m posrewrite` runs it (runpy, in this process): main's exit code
    and its one error line, as in the subprocess test above."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["posrewrite", "check", str(tmp_path / "absent.onnx")])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("posrewrite", run_name="__main__", alter_sys=True)
    assert exc.value.code == 3
    assert_one_error_line(capsys.readouterr().err, "no such file")


def test_json_error_is_one_object_subprocess(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01\x02garbage")
    res = run_cli(str(bad), "--rope-scale", "4", "--json")
    assert res.returncode == 3
    payload = json.loads(res.stdout)  # the whole of stdout is one JSON object
    assert payload["error"]["exit_code"] == 3
    assert payload["error"]["type"] == "ModelLoadError"
    assert_one_error_line(res.stderr)


def test_help_and_version_subprocess():
    res = run_cli("--help")
    assert res.returncode == 0 and "exit codes" in res.stdout and "inspect" in res.stdout
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("posrewrite ")


# ------------------------------------------------------------------------------------ bad models, via main


@pytest.mark.parametrize(
    "command", [["inspect"], ["check"], [], ["plot", "-o", "x.png"], ["advise", "--context", "64"]]
)
def test_every_command_reports_a_bad_model(tmp_path, capsys, command):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    extra = ["--rope-scale", "2"] if not command else []
    argv = [*command[:1], str(bad), *command[1:], *extra]
    assert main(argv) == 3
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, "not an ONNX model")
    assert captured.out == ""


def test_old_opset_is_a_load_error(tmp_path, capsys):
    proto = _proto()
    proto.opset_import[0].version = 5
    path = tmp_path / "old.onnx"
    onnx.save(proto, path)
    assert main(["inspect", str(path)]) == 3
    assert_one_error_line(capsys.readouterr().err, "opset 5")


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "absent.onnx"), "--debug"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("posrewrite: error:")


def test_internal_error_is_one_line_and_exit_1(model, capsys, monkeypatch):
    import posrewrite.io

    def broken(path):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(posrewrite.io, "load_model", broken)
    assert main(["inspect", str(model)]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err, "internal error: RuntimeError: something unexpected")
    assert main(["inspect", str(model), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_internal_error_with_json(model, capsys, monkeypatch):
    import posrewrite.io

    monkeypatch.setattr(posrewrite.io, "load_model", lambda path: 1 / 0)
    assert main(["check", str(model), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["exit_code"] == 1


# ------------------------------------------------------------------------------------ contradicting options


BAD_OPTIONS = [
    (["--rope-method", "yarn"], "needs --rope-scale"),
    (["--rope-method", "linear"], "needs --rope-scale"),
    (["--rope-scale", "0"], "--rope-scale must be greater than 0"),
    (["--rope-scale", "-2"], "--rope-scale must be greater than 0"),
    (["--rope-scale", "nan"], "--rope-scale must be greater than 0"),
    (["--rope-scale", "four"], "invalid float value"),
    (["--rope-scale", "0.5", "--rope-method", "yarn"], "below 1"),
    (["--rope-scale", "4", "--rope-method", "magic"], "--rope-method must be one of"),
    (["--rope-scale", "4", "--rope-params", '{"factor": 8}'], "disagrees with --rope-scale"),
    (["--rope-scale", "4", "--rope-method", "yarn", "--rope-params", '{"rope_type": "llama3"}'], "disagrees"),
    (["--rope-scale", "4", "--rope-params", "{not json"], "not valid JSON"),
    (["--rope-scale", "4", "--rope-params", "[1, 2]"], "must be a JSON object, not list"),
    (["--rope-scale", "4", "--rope-params", "missing.json"], "neither JSON text nor an existing file"),
    (["--rope-base", "0"], "--rope-base must be greater than 0"),
    (["--rope-freq-base", "-1"], "--rope-base must be greater than 0"),
    (["--rope-base", "1e4", "--rope-params", '{"rope_theta": 5e5}'], "disagrees with --rope-base"),
    (["--rope-scale", "2", "--fuse", "tensorrt"], "--fuse must be one of"),
    (["--max-positions", "0"], "--max-positions must be greater than 0"),
    (["--pos-scale", "-1"], "--pos-scale must be greater than 0"),
    (["--alibi-scale", "0"], "--alibi-scale must be greater than 0"),
    (["--rope-scale", "2", "--original-max-positions", "0"], "--original-max-positions must be greater than 0"),
    (["--rope-scale", "2", "--rope-freq-scale", "0.25"], "disagrees with --rope-scale"),
    (["--rope-freq-scale", "0"], "--rope-freq-scale must be greater than 0"),
    (["--rope-scaling", "none", "--rope-scale", "2"], "contradicts"),
    (["--rope-scale", "2", "--yarn-beta-fast", "16"], "applies only to --rope-method yarn"),
    (["--rope-scale", "2", "--rope-method", "yarn", "--yarn-beta-slow", "0"], "must be greater than 0"),
    (["--rope-scale", "2", "--original-max-positions", "64", "--yarn-orig-ctx", "128"], "disagrees"),
    ([], "nothing to do"),
    (["--rope-scale", "2", "--frobnicate"], "unrecognized arguments"),
]


@pytest.mark.parametrize(("flags", "fragment"), BAD_OPTIONS, ids=[" ".join(f) or "none" for f, _ in BAD_OPTIONS])
def test_contradicting_options(model, capsys, flags, fragment):
    before = _snapshot(model.parent)
    assert main([str(model), *flags]) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, fragment)
    assert captured.out == ""
    assert _snapshot(model.parent) == before  # input untouched, no output left behind


def test_options_are_checked_before_the_model(tmp_path, capsys):
    # a usage error wins over a missing model: nothing is read for a command that cannot run
    assert main([str(tmp_path / "absent.onnx"), "--rope-method", "yarn"]) == 2


def test_output_is_the_input(model, capsys):
    before = _snapshot(model.parent)
    assert main([str(model), "--rope-scale", "2", "-o", str(model)]) == 2
    assert_one_error_line(capsys.readouterr().err, "is the input model")
    assert main([str(model), "--rope-scale", "2", "-o", str(model.parent / "." / model.name)]) == 2
    assert _snapshot(model.parent) == before


def test_output_is_the_input_external_data(external_model, capsys, monkeypatch):
    # the CLI refuses before the API runs; io.save_model would refuse as well
    before = _snapshot(external_model.parent)
    code = main([str(external_model), "--rope-scale", "2", "-o", str(external_model.parent / "e.onnx.data")])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, "external data")
    assert _snapshot(external_model.parent) == before


def test_usage_errors_with_json(model, capsys):
    assert main([str(model), "--rope-method", "yarn", "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error"]["type"] == "UsageError"
    assert_one_error_line(captured.err, "needs --rope-scale")


def test_no_arguments(capsys):
    assert main([]) == 2
    assert "posrewrite: error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "m.onnx", "--max-length", "0"],
        ["advise", "--context", "0", "--head-dim", "64"],
        ["advise", "--context", "100", "--rope-scale", "4"],
        ["advise", "--context", "100", "--head-dim", "-4"],
        ["plot", "m.onnx"],
    ],
)
def test_subcommand_usage_errors(argv, capsys):
    assert main(argv) == 2
    assert_one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------ option parsing


def test_llama_cpp_aliases(model, monkeypatch):
    seen = {}
    _install_fake_api(
        monkeypatch, rewrite=lambda path, options, progress=None: seen.setdefault("o", options) and _rewrite_result()
    )
    argv = [
        str(model),
        "--rope-freq-scale",
        "0.25",
        "--rope-scaling",
        "yarn",
        "--yarn-orig-ctx",
        "64",
        "--rope-freq-base",
        "500000",
        "--yarn-beta-fast",
        "16",
        "--yarn-beta-slow",
        "2",
        "--yarn-attn-factor",
        "1",
        "--no-validate",
    ]
    assert main(argv) == 0
    opts = seen["o"]
    assert opts.rope_scale == pytest.approx(4.0)
    assert opts.rope_method == "yarn"
    assert opts.original_max_positions == 64
    assert opts.rope_base == 500000
    assert opts.validate is False
    assert opts.rope_params["beta_fast"] == 16 and opts.rope_params["beta_slow"] == 2
    assert opts.rope_params["attention_factor"] == pytest.approx(0.1 * np.log(4) + 1)


def test_yarn_orig_ctx_zero_means_from_the_model(model, monkeypatch):
    seen = {}
    _install_fake_api(
        monkeypatch, rewrite=lambda path, options, progress=None: seen.setdefault("o", options) and _rewrite_result()
    )
    assert main([str(model), "--rope-scale", "2", "--rope-method", "yarn", "--yarn-orig-ctx", "0"]) == 0
    assert seen["o"].original_max_positions is None


def test_rope_params_from_json_text():
    assert load_rope_params('{"rope_type": "yarn", "factor": 4, "beta_fast": 16}') == {
        "rope_type": "yarn",
        "factor": 4,
        "beta_fast": 16,
    }
    assert load_rope_params('{"type": "linear", "factor": 2}') == {"rope_type": "linear", "factor": 2}


def test_rope_params_from_hf5_config_file(tmp_path):
    cfg = {
        "model_type": "llama",
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    params = load_rope_params(str(path))
    assert params["rope_type"] == "llama3" and params["factor"] == 8.0
    assert params["original_max_position_embeddings"] == 8192 and params["rope_theta"] == 500000.0
    opts = RewriteOptions(rope_params=params)
    assert opts.rope_method == "llama3" and opts.effective_rope_scale == 8.0
    assert read_config_json(tmp_path / "model.onnx") == cfg
    assert read_config_json(tmp_path / "sub" / "model.onnx") is None


def test_rope_params_from_hf4_config_without_scaling(tmp_path):
    cfg = {"model_type": "llama", "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert load_rope_params(str(path)) == {"rope_theta": 10000.0, "original_max_position_embeddings": 4096}


def test_requested_rope_parameters():
    opts = RewriteOptions(rope_scale=4, rope_method="yarn", rope_params={"beta_fast": 16})
    config = {"max_position_embeddings": 64, "rope_theta": 10000.0}
    assert requested_rope_parameters(opts, config) == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "beta_fast": 16,
    }
    explicit = RewriteOptions(rope_scale=2, original_max_positions=128, rope_base=5e5)
    assert requested_rope_parameters(explicit, config) == {
        "rope_type": "linear",
        "factor": 2.0,
        "original_max_position_embeddings": 128,
        "rope_theta": 5e5,
    }
    base_only = RewriteOptions(rope_base=5e5)
    assert requested_rope_parameters(base_only, None) == {"rope_type": "default", "rope_theta": 5e5}


def test_options_output_suffix():
    assert RewriteOptions(rope_scale=4, rope_method="yarn").output_suffix() == "yarn4"
    assert RewriteOptions(fp32_positions=True, fuse="ort").output_suffix() == "fp32pos-fused-ort"
    assert not RewriteOptions().has_work()


# ------------------------------------------------------------------------- output formatting (stand-in API)


@dataclasses.dataclass
class _Validation:
    ok: bool
    rows: list
    notes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Result:
    payload: dict
    output_path: Path | None = None
    modified: bool = True
    changes: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    validation: _Validation | None = None
    sites: list = dataclasses.field(default_factory=list)
    refusals: list = dataclasses.field(default_factory=list)
    safe: bool = True
    lines: list = dataclasses.field(default_factory=list)

    def to_dict(self):
        return self.payload


def _rewrite_result(ok: bool = True) -> _Result:
    from posrewrite.validation.report import ModelCheck

    rows = [ModelCheck(site="rope0", length=256, max_abs_error=1e-6 if ok else 0.5, tolerance=1e-4, ok=ok)]
    return _Result(
        {"output": "x.onnx", "modified": True, "inf": float("inf"), "arr": np.arange(2)},
        output_path=Path("x.onnx"),
        changes=["rope0: yarn x4"],
        validation=_Validation(ok, rows),
    )


def _install_fake_api(monkeypatch, **functions):
    """A fake posrewrite.api; the model the command line read up front (`loaded=`) is not handed to the fakes."""
    fake = types.ModuleType("posrewrite.api")
    for name, fn in functions.items():
        setattr(fake, name, lambda *args, _fn=fn, loaded=None, **kwargs: _fn(*args, **kwargs))
    monkeypatch.setitem(sys.modules, "posrewrite.api", fake)
    monkeypatch.setattr(posrewrite, "api", fake, raising=False)
    return fake


def test_rewrite_json_is_clean(model, capsys, monkeypatch):
    def rewrite(path, options, progress=None):
        print("stray print from a library")
        return _rewrite_result()

    _install_fake_api(monkeypatch, rewrite=rewrite)
    assert main([str(model), "--rope-scale", "4", "--json"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["inf"] == "inf" and payload["arr"] == [0, 1]
    assert "stray print" in captured.err


def test_rewrite_human_output(model, capsys, monkeypatch):
    _install_fake_api(monkeypatch, rewrite=lambda path, options, progress=None: _rewrite_result())
    assert main([str(model), "--rope-scale", "4"]) == 0
    out = capsys.readouterr().out
    assert "rope0: yarn x4" in out and "validation" in out and "wrote" in out


def test_rewrite_validation_failure_exits_6(model, capsys, monkeypatch):
    _install_fake_api(monkeypatch, rewrite=lambda path, options, progress=None: _rewrite_result(ok=False))
    assert main([str(model), "--rope-scale", "4"]) == 6
    assert_one_error_line(capsys.readouterr().err, "validation failed")


@pytest.mark.parametrize("error", [NoEncodingError("no positional encoding found"), PartialMatchError("2 of 4 sites")])
def test_api_errors_map_to_exit_codes(model, capsys, monkeypatch, error):
    def rewrite(path, options, progress=None):
        raise error

    _install_fake_api(monkeypatch, rewrite=rewrite)
    assert main([str(model), "--rope-scale", "4"]) == error.exit_code
    assert_one_error_line(capsys.readouterr().err, str(error))


def test_inspect_output_and_exit_codes(model, capsys, monkeypatch):
    site = types.SimpleNamespace(kind="rope")
    found = _Result(
        {
            "model": str(model),
            "encodings": [{"kind": "rope", "layout": "rotate_half", "head_dim": 16}],
            "refusals": [{"kind": "rope", "where": "node_7", "reason": "[odd] axis"}],
        },
        sites=[site],
    )
    _install_fake_api(monkeypatch, inspect=lambda path: found)
    assert main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert "rotate_half" in out and "[odd] axis" in out
    assert main(["inspect", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["encodings"][0]["kind"] == "rope"

    empty = _Result({"model": str(model), "encodings": [], "refusals": []})
    _install_fake_api(monkeypatch, inspect=lambda path: empty)
    assert main(["inspect", str(model)]) == 4


def test_check_exit_7_when_unsafe(model, capsys, monkeypatch):
    site = {
        "kind": "rope",
        "position_dtype": "float16",
        "angle_dtype": "float16",
        "exact_position_fraction": 0.25,
        "colliding_positions": 1000,
        "max_angle_error": 3.0,
        "safe": False,
        "max_length": 8192,
    }
    seen = {}

    def check(path, max_length=None):
        seen["max_length"] = max_length
        return _Result(
            {"model": str(path), "max_length": max_length, "safe": False, "sites": [site]}, sites=[site], safe=False
        )

    _install_fake_api(monkeypatch, check=check)
    assert main(["check", str(model), "--max-length", "8192"]) == 7
    assert seen["max_length"] == 8192
    assert "unsafe" in capsys.readouterr().out
    assert main(["check", str(model), "--json"]) == 7
    assert json.loads(capsys.readouterr().out)["safe"] is False


# ---------------------------------------------------------------------------------------------------- progress


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_off_a_terminal():
    from posrewrite.progress import NullReporter, progress_reporter

    stream = io.StringIO()
    with progress_reporter(stream=stream) as reporter:
        assert isinstance(reporter, NullReporter)
        with reporter.stage("work", total=3) as stage:
            stage.advance()
            stage.update(completed=3, description="done")
        reporter.note("a notice")
    assert stream.getvalue() == ""


def test_progress_is_silent_when_disabled_on_a_terminal():
    from posrewrite.progress import NullReporter, progress_reporter

    with progress_reporter(enabled=False, stream=_FakeTerminal()) as reporter:
        assert isinstance(reporter, NullReporter)


def test_progress_bars_on_a_terminal():
    from posrewrite.progress import RichReporter, progress_reporter

    stream = _FakeTerminal()
    with progress_reporter(stream=stream) as reporter:
        assert isinstance(reporter, RichReporter)
        with reporter.stage("rescaling", total=2) as stage:
            stage.advance()
            stage.advance()
        reporter.note("3 sites rescaled")
    assert "3 sites rescaled" in stream.getvalue()


def test_advise_json_is_one_object(capsys):
    assert main(["advise", "--context", "4096", "--head-dim", "64", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["context"] == 4096
