"""Issue 25: what a new user hit in the first hour — output that read wrong, sizes that surprised, bugs, and the
things the tool knew but asked again. Each test failed on the code before the fix.

Counting words (one noun for one thing, in text and JSON): a *site* is one positional encoding found (one entry
of ``inspect --json``'s ``encodings``: one inv_freq / cos-sin source shared by its layers); a *rotation* is one q
or k tensor rotated by a RoPE site (``rotations``; a GroupQueryAttention node rotating inside rotates two).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import tomllib

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
L = 64  # the tiny Llama's max_position_embeddings (fixtures.hf_models)


def _cli(capsys, *args) -> subprocess.CompletedProcess:
    from posrewrite.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


@pytest.fixture(scope="module")
def yarn4(llama_onnx, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("yarn4") / "llama-yarn4.onnx"
    from posrewrite import api

    api.rewrite(llama_onnx, rope_scale=4, rope_method="yarn", original_max_positions=L, output=out)
    return out


# --------------------------------------------------------------------------------------- wrong-reading output


def test_inspect_text_and_json_count_the_same_things(llama_onnx, capsys):
    doc = json.loads(_cli(capsys, "inspect", llama_onnx, "--json").stdout)
    (enc,) = doc["encodings"]
    assert "sites" not in enc and enc["rotations"] == 4 == doc["rotations"]  # 2 layers x (q, k)
    text = _cli(capsys, "inspect", llama_onnx).stdout
    assert "1 positional encoding site, 4 q/k rotations" in text
    assert "uses" not in text.split("\n")[2]  # the column is named for what it counts
    assert re.search(r"rotations", text.split("\n")[2])


def test_genai_rotations_count_q_and_k_inside_group_query_attention(tmp_path, capsys):
    pytest.importorskip("onnxruntime_genai")
    from fixtures.genai_models import genai_folder

    src = genai_folder("llama")
    doc = json.loads(_cli(capsys, "inspect", src, "--json").stdout)
    assert doc["rotations"] == 4  # 2 GroupQueryAttention nodes, each rotating q and k
    res = _cli(capsys, src, "--rope-scale", 2, "--rope-method", "yarn", "-o", tmp_path / "out", "--json")
    assert res.returncode == 0, res.stderr
    (row,) = [r for r in json.loads(res.stdout)["validation"]["rows"] if r["site"] == "rotations"]
    assert "(4) vs in the original model (4)" in row["compared"]


def test_prior_scaling_reads_as_a_sentence(yarn4, capsys):
    doc = json.loads(_cli(capsys, "inspect", yarn4, "--json").stdout)
    prior = doc["encodings"][0]["prior_scaling"]
    assert prior["kind"] == "rewritten" and "unscaled_frequencies" not in prior
    text = _cli(capsys, "inspect", yarn4).stdout
    assert "kind=rewritten" not in text and "unscaled_frequencies" not in text
    assert "prior_scaling=rescaled by posrewrite (x4)" in text


def test_check_shows_the_exact_fraction_as_a_percentage(llama_onnx, capsys):
    text = _cli(capsys, "check", llama_onnx, "--max-length", 256).stdout
    row = next(line for line in text.splitlines() if "rope" in line)
    assert "100%" in row
    doc = json.loads(_cli(capsys, "check", llama_onnx, "--max-length", 256, "--json").stdout)
    assert doc["sites"][0]["exact_position_fraction"] == 1.0


def test_a_new_base_alone_reads_as_a_new_base(llama_onnx, tmp_path, capsys):
    res = _cli(capsys, llama_onnx, "--rope-freq-base", 500000, "-o", tmp_path / "b.onnx")
    assert res.returncode == 0, res.stderr
    assert "new base 500000 (no context scaling)" in res.stdout and "default x1" not in res.stdout


# ------------------------------------------------------------------------------------------ sizes that surprise


def test_fused_caches_of_a_rescale_hold_the_rescaled_length(llama_onnx, yarn4, tmp_path, capsys):
    res = _cli(capsys, llama_onnx, "--rope-scale", 4, "--rope-method", "yarn", "--original-max-positions", L,
               "--fuse", "ort", "-o", tmp_path / "f.onnx")
    assert res.returncode == 0, res.stderr
    assert "caches 256 rows" in res.stdout and "or a rescale" not in res.stdout
    # fusing the rescaled output later: the caches follow the length it records, not 4096
    res = _cli(capsys, yarn4, "--fuse", "ort", "-o", tmp_path / "g.onnx")
    assert res.returncode == 0, res.stderr
    assert "caches 256 rows" in res.stdout
    caches = [t for t in onnx.load(tmp_path / "g.onnx").graph.initializer if "cos_cache" in t.name]
    assert caches and all(t.dims[0] == 256 for t in caches)


# ------------------------------------------------------------------------------------------------------ bugs


def test_plot_without_matplotlib_says_what_to_install(llama_onnx, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    res = _cli(capsys, "plot", llama_onnx, "-o", tmp_path / "p.png")
    assert res.returncode == 2 and "posrewrite[plot]" in res.stderr and "internal error" not in res.stderr


def test_validate_prints_no_onnxruntime_log_lines(llama_onnx, tmp_path):
    """A check whose model run fails (caches of 256 rows asked to reach 4096): onnxruntime logged two ANSI-red
    error lines on stderr before posrewrite's own one line."""
    fused = tmp_path / "f.onnx"
    from posrewrite import api

    yarn = dict(rope_scale=4, rope_method="yarn", original_max_positions=L)
    api.rewrite(llama_onnx, fuse="ort", output=fused, **yarn)
    flags = ["--rope-scale", "4", "--rope-method", "yarn", "--original-max-positions", str(L)]
    for extra, code in (([], 0), (["--max-positions", "4096"], 6)):
        run = subprocess.run([sys.executable, "-m", "posrewrite", "validate", str(llama_onnx), str(fused), *flags,
                              *extra], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert run.returncode == code, run.stderr
        assert "\x1b" not in run.stderr and "onnxruntime:" not in run.stderr.replace("[ONNXRuntimeError]", "")
        assert len(run.stderr.splitlines()) == (1 if code else 0), run.stderr


def test_an_interrupt_after_the_output_is_written_says_so(llama_onnx, tmp_path, capsys, monkeypatch):
    from posrewrite import render

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "show_rewrite", interrupted)
    out = tmp_path / "r.onnx"
    res = _cli(capsys, llama_onnx, "--rope-scale", 2, "--original-max-positions", L, "-o", out)
    assert res.returncode == 0 and out.is_file()
    assert "output is complete" in res.stderr and "nothing was left behind" not in res.stderr


# ------------------------------------------------------------------------- things the tool knows but asks again


def test_second_rescale_and_validate_read_the_recorded_rewrite(llama_onnx, yarn4, tmp_path, capsys):
    second = tmp_path / "yarn8.onnx"
    res = _cli(capsys, yarn4, "--rope-scale", 8, "--rope-method", "yarn", "-o", second, "--json")
    assert res.returncode == 0, res.stderr  # no --original-max-positions asked again
    doc = json.loads(_cli(capsys, "inspect", second, "--json").stdout)
    last = doc["rewrites"][-1]
    assert last["rope_parameters"][0]["original_max_position_embeddings"] == L
    assert last["rope_parameters"][0]["factor"] == 8 and last["context_length"] == 8 * L
    # validate without flags checks the recorded rewrite (yarn x8 of the original, by the numpy oracle)
    res = _cli(capsys, "validate", llama_onnx, second, "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["validation"]["rows"]
    assert max(r["length"] or 0 for r in rows) == 8 * L
    # a record that lies is caught: the x4 model claiming to be x8
    forged = tmp_path / "forged.onnx"
    proto = onnx.load(yarn4)
    for p in proto.metadata_props:
        if p.key == "posrewrite.rewrites":
            p.value = p.value.replace('"factor": 4.0', '"factor": 8.0')
    onnx.save(proto, forged)
    res = _cli(capsys, "validate", llama_onnx, forged)
    assert res.returncode == 6


def test_validate_of_an_unrecorded_rescale_says_what_to_give(llama_onnx, yarn4, tmp_path, capsys):
    bare = tmp_path / "bare.onnx"
    proto = onnx.load(yarn4)
    del proto.metadata_props[:]
    onnx.save(proto, bare)
    res = _cli(capsys, "validate", llama_onnx, bare)
    assert res.returncode == 6 and "records no posrewrite rewrite" in res.stderr and "--rope-scale" in res.stderr


def test_plot_without_scaling_flags_needs_no_training_length(llama_onnx, yarn4, tmp_path, capsys):
    assert _cli(capsys, "plot", llama_onnx, "-o", tmp_path / "a.png").returncode == 0
    res = _cli(capsys, "plot", yarn4, "-o", tmp_path / "b.png")
    assert res.returncode == 0 and f"training context {L}" in res.stdout
    from posrewrite.cli import _DESCRIPTION

    example = next(line for line in _DESCRIPTION.splitlines() if "posrewrite plot" in line)
    argv = example.split()[1:]
    argv[argv.index("MODEL.onnx")] = str(llama_onnx)
    argv[argv.index("rope.png")] = str(tmp_path / "c.png")
    assert _cli(capsys, *argv).returncode == 0


# ------------------------------------------------------------------------------------------------------ smaller


def test_a_mistyped_command_is_named(capsys):
    res = _cli(capsys, "inpsect", "model.onnx")
    assert res.returncode == 2 and "unknown command 'inpsect'" in res.stderr and "'inspect'" in res.stderr


def test_nothing_to_do_lists_every_rewrite(llama_onnx, capsys):
    res = _cli(capsys, llama_onnx)
    assert res.returncode == 2
    for flag in ("--rope-scale", "--fuse", "--extend", "--logn-scaling", "--max-positions"):
        assert flag in res.stderr


def test_replacing_an_existing_file_is_said(llama_onnx, tmp_path, capsys):
    out = tmp_path / "r.onnx"
    first = _cli(capsys, llama_onnx, "--rope-scale", 2, "--original-max-positions", L, "-o", out)
    assert first.returncode == 0 and "replaced" not in first.stdout
    again = _cli(capsys, llama_onnx, "--rope-scale", 2, "--original-max-positions", L, "-o", out)
    assert again.returncode == 0 and "existed and was replaced" in again.stdout


# ------------------------------------------------------------------------------------------ version, provenance


def test_one_version_reported_everywhere(llama_onnx, tmp_path, capsys):
    import posrewrite

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "posrewrite.__version__"}
    assert _cli(capsys, "--version").stdout.split() == ["posrewrite", posrewrite.__version__]
    assert f"## {posrewrite.__version__}" in (ROOT / "CHANGELOG.md").read_text()
    out = tmp_path / "f.onnx"
    assert _cli(capsys, llama_onnx, "--fuse", "ort", "-o", out).returncode == 0
    meta = {p.key: p.value for p in onnx.load(out, load_external_data=False).metadata_props}
    (item,) = json.loads(meta["posrewrite.rewrites"])
    assert item["posrewrite_version"] == posrewrite.__version__ and item["options"] == {"fuse": "ort"}


def test_genai_folder_output_records_its_rewrite(tmp_path, capsys):
    pytest.importorskip("onnxruntime_genai")
    from fixtures.genai_models import genai_folder

    out = tmp_path / "g"
    assert _cli(capsys, genai_folder("llama"), "--rope-scale", 4, "--rope-method", "yarn", "-o", out).returncode == 0
    doc = json.loads(_cli(capsys, "inspect", out, "--json").stdout)
    (item,) = doc["rewrites"]
    assert item["rope_parameters"][0]["rope_type"] == "yarn" and item["context_length"] == 4 * 128
    # validate takes folders as inspect does, and checks the recorded rewrite without flags
    res = _cli(capsys, "validate", genai_folder("llama"), out, "--json")
    assert res.returncode == 0, res.stderr
    assert max(r["length"] or 0 for r in json.loads(res.stdout)["validation"]["rows"]) == 4 * 128
    shutil.rmtree(out)


@pytest.mark.parametrize("record", [
    '[{"rope_parameters": [{"rope_type": "yarn", "factor": 1e308, "original_max_position_embeddings": 64}]}]',
    '[{"rope_parameters": [{"rope_type": "no-such-method", "factor": 4}]}]',
    '[{"rope_parameters": [{"rope_type": "yarn", "factor": -4, "original_max_position_embeddings": 64}]}]',
    '[{"rope_parameters": "yarn", "options": {"max_positions": "x"}}, 7, null]',
    "{not json",
])
def test_a_forged_record_is_a_clean_error(llama_onnx, yarn4, tmp_path, capsys, record):
    """A record is input like any other: nonsense in it is one error line and a documented code, never exit 1."""
    forged = tmp_path / "forged.onnx"
    proto = onnx.load(yarn4)
    for p in proto.metadata_props:
        if p.key == "posrewrite.rewrites":
            p.value = record
    onnx.save(proto, forged)
    for argv in (["validate", llama_onnx, forged], ["inspect", forged], [forged, "--rope-scale", 2, "--rope-method",
                                                                          "yarn", "-o", tmp_path / "o.onnx"]):
        res = _cli(capsys, *argv)
        assert res.returncode in (0, 2, 3, 6), (argv, res.stderr)
        assert "internal error" not in res.stderr and "Traceback" not in res.stderr
