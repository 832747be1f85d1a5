"""Real-size models: validation whose memory does not grow with the model, the memory estimate
before onnxruntime sessions, sparse data kept sparse, leftovers of a killed run removed, and the last four
hostile-input holes."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from fixtures.hostile import external_tensor, rope_proto, run_cli, save
from posrewrite import api, cli, errors, io

REPO = Path(__file__).resolve().parents[1]
L = 128
YARN = dict(rope_scale=4.0, rope_method="yarn", original_max_positions=L)


def _env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _one_line_error(run, code: int, *fragments: str) -> None:
    lines = run.stderr.splitlines()
    assert run.code == code, (run.code, run.stderr)
    assert len(lines) == 1 and lines[0].startswith("posrewrite: error: "), run.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _small_llama(folder: Path, layers: int = 2) -> Path:
    """The benchmark's Llama graph (Optimum layout, fp16, sparse external data) at a small size."""
    from fixtures.llama_graph import build_llama

    return build_llama(folder / "model.onnx", layers=layers, hidden=256, heads=4, kv_heads=2, intermediate=512,
                       vocab=512)


# --------------------------------------------------------------------------------- bounded validation


def test_default_validation_is_bounded_and_full_runs_whole_models(tmp_path):
    from fixtures.direct_rope import build_direct_rope

    src = build_direct_rope("rotate_half")
    bounded = api.rewrite(src, output=tmp_path / "b.onnx", **YARN).validation
    assert bounded.ok and bounded.scope == "bounded", bounded.to_dict()
    far = [r for r in bounded.rows if r.site == "model"]
    assert far and all("cut" in r.message for r in far), bounded.rows
    full = api.rewrite(src, output=tmp_path / "f.onnx", validate_scope="full", **YARN).validation
    assert full.ok and full.scope == "full", full.to_dict()
    assert any("whole model ran" in (r.message or "") for r in full.rows), full.rows


def test_the_cut_catches_what_only_outputs_show(hf_onnx, tmp_path, monkeypatch):
    """GroupQueryAttention reading the wrong kv heads: no rotation differs, only the outputs do. The default
    (bounded) validation refuses it, and the failing row is the cut's comparison."""
    from tests.test_validation import _fault_in_rewrite, swap_kv_heads

    src = hf_onnx("llama")
    good = api.rewrite(src, output=tmp_path / "good.onnx", fuse="ort").validation
    assert good.ok and good.scope == "bounded"
    _fault_in_rewrite(monkeypatch, swap_kv_heads)
    with pytest.raises(errors.ValidationError, match="cut"):
        api.rewrite(src, output=tmp_path / "bad.onnx", fuse="ort")
    assert not (tmp_path / "bad.onnx").exists()


def test_later_layers_weights_are_not_read_by_the_bounded_check(tmp_path, monkeypatch):
    """The cut of a 4-layer model holds the first layer's weights only: every ExternalTensor read by the
    validation (onnx_ir reads through .numpy()/.tobytes()) or handed to onnxruntime belongs to layer 0 or the
    embedding. Counted by wrapping onnxruntime's session constructor on the serialized sub-models."""
    import onnxruntime as ort

    src = _small_llama(tmp_path / "m", layers=4)
    seen: list[set[str]] = []
    real = ort.InferenceSession

    def spy(model, *args, **kwargs):
        if isinstance(model, bytes):
            proto = onnx.load_from_string(model)
            seen.append({t.name for t in proto.graph.initializer})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    result = api.rewrite(src, output=tmp_path / "o.onnx", **dict(YARN, original_max_positions=4096))
    assert result.validation.ok and result.validation.scope == "bounded", result.validation.to_dict()
    names = set().union(*seen)
    assert any("layers.0." in n for n in names), sorted(names)[:20]
    assert not any(f"layers.{k}." in n for n in names for k in (2, 3)), sorted(n for n in names if "layers" in n)


# ----------------------------------------------------------------------------------- memory estimate


def test_a_run_that_would_not_fit_is_refused_with_the_estimate_and_the_way_out(tmp_path, monkeypatch):
    from fixtures.direct_rope import build_direct_rope

    src = build_direct_rope("rotate_half")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("POSREWRITE_MEMORY_LIMIT", "64M")
    run = run_cli([str(src), "--rope-scale", "4", "--rope-method", "yarn", "--original-max-positions", str(L),
                   "-o", str(out / "o.onnx")])
    _one_line_error(run, 2, "would need about", "64 MB available", "POSREWRITE_MEMORY_LIMIT", "--no-validate")
    assert list(out.iterdir()) == []
    monkeypatch.setenv("POSREWRITE_MEMORY_LIMIT", "64G")
    run = run_cli([str(src), "--rope-scale", "4", "--rope-method", "yarn", "--original-max-positions", str(L),
                   "-o", str(out / "o.onnx")])
    assert run.code == 0, run.stderr


def test_validate_full_over_the_limit_falls_back_to_the_cut_and_says_so(tmp_path, monkeypatch):
    """A KV-cache model: the whole model at 4096 tokens needs far more than its cut at 16 new tokens; with a
    limit between the two estimates `--validate full` checks the cut and says why."""
    from posrewrite import memory
    from posrewrite.cut import estimate, find_cut, sub_model
    from posrewrite.validate import MAX_VALIDATION_LENGTH
    from posrewrite.validation.bounded import seed_groups

    src = _small_llama(tmp_path / "m")
    model = io.load_model(src)
    whole = memory.session_estimate(model, MAX_VALIDATION_LENGTH // 2, MAX_VALIDATION_LENGTH)["total"]
    found = api.detect(model)
    cut = find_cut(model, model, seed_groups(model, found.rope_sites))
    part = estimate(sub_model(model, cut.outputs), MAX_VALIDATION_LENGTH)["total"]
    assert part < whole
    monkeypatch.setenv("POSREWRITE_MEMORY_LIMIT", str((part + whole) // 2))
    result = api.rewrite(src, output=tmp_path / "o.onnx", validate_scope="full", **dict(YARN,
                                                                                      original_max_positions=2048))
    assert result.validation.ok, result.validation.to_dict()
    assert any("checked on the bounded cut instead" in n for n in result.validation.notes), result.validation.notes


# ---------------------------------------------------------------------------------------------- disk


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_sparse_input_stays_sparse_and_its_values_are_copied(tmp_path):
    src = _small_llama(tmp_path / "m")
    data = src.with_name(src.name + ".data")
    model = io.load_model(src)
    # two tensors get real values (data extents), the rest stay holes
    rng = np.random.default_rng(0)
    written = {}
    with open(data, "r+b") as f:
        big = [v for v in model.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes >= 4096]
        for value in (big[len(big) // 3], big[-1]):
            t = value.const_value
            arr = rng.standard_normal(t.shape.numpy()).astype(t.dtype.numpy())
            f.seek(t.offset)
            f.write(arr.tobytes())
            written[value.name] = arr
    assert len(written) == 2
    assert _allocated(data) < data.stat().st_size // 4  # the input is sparse
    out = tmp_path / "out.onnx"
    result = api.rewrite(src, output=out, **dict(YARN, original_max_positions=2048))
    assert any("of new disk" in n for n in result.notes), result.notes
    out_data = out.with_name(out.name + ".data")
    assert out_data.stat().st_size >= data.stat().st_size * 0.99
    # holes stay holes: what the output allocates is what the input allocates, give or take a page per tensor
    assert _allocated(out_data) <= _allocated(data) + 64 * 4096, (_allocated(out_data), _allocated(data))
    again = ir.load(out)
    for name, arr in written.items():
        np.testing.assert_array_equal(again.graph.initializers[name].const_value.numpy(), arr)
    zero = next(v for n, v in again.graph.initializers.items() if n not in written and v.const_value.nbytes > 4096
                and isinstance(v.const_value, ir.ExternalTensor))
    assert not np.any(zero.const_value.numpy())


# ------------------------------------------------------------------------------------- killed runs


def _staged(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in ("model.onnx", "model.onnx.data"))


def test_leftovers_of_a_sigkilled_rewrite_are_removed_by_the_next_run(tmp_path):
    folder = tmp_path / "m"
    src = _small_llama(folder, layers=4)
    args = [sys.executable, "-m", "posrewrite", str(src), "--rope-scale", "4", "--rope-method", "yarn",
            "--original-max-positions", "4096"]
    proc = subprocess.Popen([*args, "-o", str(folder / "out.onnx")], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # the staged model is written (and the data before it): kill now
            staged = [p for p in folder.glob(".out.onnx.tmp-*.onnx") if p.stat().st_size > 0]
            if staged and (folder / "out.onnx.data").exists():
                break
            assert proc.poll() is None, "the rewrite ended before it could be killed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = _staged(folder)
    assert any(n.startswith(".out.onnx.tmp-") for n in left) and "out.onnx.data" in left, left
    assert "out.onnx" not in left
    # what an older posrewrite (onnx_ir's writer) left when killed: a staging folder beside the output
    old = folder / ".out.onnx.3f9a0c1b2d4e.data.k2j4h5g6"
    old.mkdir()
    (old / "out.onnx.3f9a0c1b2d4e.data").write_bytes(b"\0" * 100)
    # a run on another output in the folder removes the staged models and staging folders of killed runs
    res = subprocess.run([*args, "-o", str(folder / "other.onnx"), "--no-validate"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    left = _staged(folder)
    assert not any(".tmp-" in n for n in left) and not old.exists(), left
    # the next run on the same output removes the data file nobody reads
    res = subprocess.run([*args, "-o", str(folder / "out.onnx"), "--no-validate"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    left = _staged(folder)
    assert left == ["other.onnx", "other.onnx.data", "out.onnx", "out.onnx.data"], left
    proto = onnx.load(folder / "out.onnx", load_external_data=False)
    assert "out.onnx.data" in {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def test_a_live_runs_staged_files_are_not_removed(tmp_path):
    """A staged file held by a live run (its lock) survives another run's cleanup."""
    folder = tmp_path / "m"
    src = save(rope_proto(weight_elems=4096), (folder.mkdir() or folder) / "model.onnx", external=True)
    model = io.load_model(src)
    with io.stage_model(model, folder / "a.onnx") as staged:
        assert io.remove_leftovers(folder / "a.onnx") == []
        assert staged.path.exists() and staged.data is not None and staged.data.exists()
        staged.commit()
    assert (folder / "a.onnx").exists()


# ------------------------------------------------------------------------------ hostile-input holes


def test_a_static_length_of_2_28_is_exit_2_not_an_internal_error(tmp_path):
    """The declared input fits the old per-input budget (2 GiB) but not what feeding it costs (before: exit 1
    or 6, or killed). Run in a subprocess with a 3 GB address-space limit: a posrewrite that feeds the declared
    length would be stopped there rather than take the machine's memory."""
    folder = tmp_path / "m"
    folder.mkdir()
    model = save(rope_proto(seq=2**28, heads=1, dim=2), folder / "model.onnx")  # q: 2^29 floats, 2 GiB

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    res = subprocess.run([sys.executable, "-m", "posrewrite", str(model), "--rope-scale", "2",
                          "--original-max-positions", "64", "-o", str(folder / "o.onnx")], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert res.returncode == 2, res.stderr[-500:]
    assert res.stderr.startswith("posrewrite: error: ") and res.stderr.count("\n") == 1
    assert "268435456" in res.stderr and "--no-validate" in res.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]


def test_declared_external_length_past_the_end_of_its_file_is_exit_3_at_load(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    proto = rope_proto(weight_elems=16)
    for k, t in enumerate(proto.graph.initializer):
        if t.name == "W":
            proto.graph.initializer[k].CopyFrom(external_tensor("W", [16], "w.bin", length=128))  # 64 needed
    (folder / "w.bin").write_bytes(b"\0" * 64)
    model = save(proto, folder / "model.onnx")
    out = tmp_path / "out"
    out.mkdir()
    _one_line_error(run_cli([str(model), "--rope-scale", "2", "--original-max-positions", "64", "--no-validate",
                             "-o", str(out / "o.onnx")]), 3, "truncated", "up to 128")
    assert list(out.iterdir()) == []


def test_a_model_onnxruntime_refuses_is_exit_3_even_where_the_cut_does_not_reach(tmp_path):
    """An op onnxruntime does not know after the logits: the cut (first layer) never contains it, the
    whole-graph load check (weights as inputs, none read) does."""
    from fixtures.direct_rope import build_direct_rope

    proto = onnx.load(build_direct_rope("rotate_half"))
    out_name = proto.graph.output[0].name
    for node in proto.graph.node:
        for k, name in enumerate(node.output):
            if name == out_name:
                node.output[k] = out_name + "_pre"
    proto.graph.node.append(helper.make_node("Mystery", [out_name + "_pre"], [out_name], domain="nowhere.custom"))
    proto.opset_import.append(helper.make_opsetid("nowhere.custom", 1))
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(proto, folder / "model.onnx")
    run = run_cli([str(folder / "model.onnx"), "--rope-scale", "4", "--rope-method", "yarn",
                   "--original-max-positions", str(L), "-o", str(folder / "o.onnx")])
    _one_line_error(run, 3, "onnxruntime cannot load")
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]


def test_validate_command_takes_the_scope(tmp_path, capsys):
    from fixtures.direct_rope import build_direct_rope

    src = build_direct_rope("rotate_half")
    out = tmp_path / "o.onnx"
    api.rewrite(src, output=out, validate=False, **YARN)
    flags = ["--rope-scale", "4", "--rope-method", "yarn", "--original-max-positions", str(L)]
    for scope in ("bounded", "full"):
        assert cli.main(["validate", str(src), str(out), *flags, "--validate", scope, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["validation"]["scope"] == scope


def test_share_weights_reads_untouched_weights_from_the_input(tmp_path):
    folder = tmp_path / "m"
    src = _small_llama(folder)
    data = src.with_name(src.name + ".data")
    model = io.load_model(src)
    big = [v for v in model.graph.initializers.values()
           if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes >= 4096]
    t = big[-1].const_value
    arr = np.random.default_rng(1).standard_normal(t.shape.numpy()).astype(t.dtype.numpy())
    with open(data, "r+b") as f:
        f.seek(t.offset)
        f.write(arr.tobytes())
    before = data.stat()
    out = folder / "shared.onnx"
    result = api.rewrite(src, output=out, share_weights=True, **dict(YARN, original_max_positions=2048))
    assert result.validation.ok and any("--share-weights" in n for n in result.notes), result.notes
    proto = onnx.load(out, load_external_data=False)
    locations = {e.value for x in proto.graph.initializer for e in x.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}, locations  # nothing changed past the threshold: no data file of its own
    assert not out.with_name(out.name + ".data").exists()
    assert data.stat().st_size == before.st_size and data.stat().st_mtime_ns == before.st_mtime_ns
    np.testing.assert_array_equal(ir.load(out).graph.initializers[big[-1].name].const_value.numpy(), arr)
    other = tmp_path / "elsewhere"
    other.mkdir()
    run = run_cli([str(src), "--rope-scale", "4", "--share-weights", "-o", str(other / "o.onnx")])
    _one_line_error(run, 2, "--share-weights")
    assert list(other.iterdir()) == []


def test_a_genai_folder_with_sparse_data_stays_sparse(tmp_path):
    from benchmarks.large_model import genai_folder

    src = genai_folder(tmp_path / "in", (2, 256, 4, 2, 512, 512))
    data = src / "model.onnx.data"
    with open(data, "r+b") as f:  # one data extent in the middle of holes
        f.seek(data.stat().st_size // 2 // 4096 * 4096)
        f.write(b"\1" * 8192)
    assert _allocated(data) < data.stat().st_size // 4
    out = tmp_path / "out"
    result = api.rewrite(src, output=out, **dict(YARN, original_max_positions=2048))
    assert result.validation is None or result.validation.ok
    copied = out / "model.onnx.data"
    assert copied.stat().st_size == data.stat().st_size
    assert _allocated(copied) <= _allocated(data) + 64 * 4096, (_allocated(copied), _allocated(data))
    assert copied.read_bytes() == data.read_bytes()
