"""Every path of the command line on 7B-, 13B- and 70B-shaped Llama exports, with the default flags
(validation on): time and peak RSS of each, in a fresh process, beside the goal (peak RSS under 2 GB plus the
largest layer's weights; under 60 s at 7B apart from the byte copy of the data file, reported on its own row).

The graphs are built directly with onnx (no torch; fixtures.llama_graph.build_llama): Optimum's KV-cache layout
(input_ids, attention_mask, position_ids, past_key_values.{i}.key/value -> logits, present.*), fp16 weights in
one *sparse* external data file (the values are zeros: apparent size of the real model, almost nothing on disk),
RoPE computed HF-style. The weights being zeros, the numbers say nothing about correctness (the tests do); they
measure what each path costs in time, memory and disk.

    python benchmarks/large_model.py --shapes 7b [--what inspect,check,yarn,...] [--dir /tmp/posrewrite-large]
    python benchmarks/large_model.py --shapes "" --optimum [--optimum-model model.onnx] [--baseline /work/main]
    # the 623 MB Optimum export (weights inline): every path, before (the baseline checkout) and after

Each path runs as ``python -m posrewrite ...`` in a child process; its peak RSS is the child's ru_maxrss
(os.wait4), its disk the blocks its outputs allocate (du), and the outputs are deleted after each path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fixtures.llama_graph import build_llama  # noqa: E402

SHAPES = {  # layers, hidden, heads, kv heads, intermediate, vocab
    "tiny": (2, 256, 4, 2, 512, 512),  # a smoke test of the script
    "7b": (32, 4096, 32, 8, 11008, 32000),
    "13b": (40, 5120, 40, 40, 13824, 32000),
    "70b": (80, 8192, 64, 8, 28672, 32000),
}
L = 4096
YARN = ["--rope-scale", "4", "--rope-method", "yarn", "--original-max-positions", str(L)]


def _longrope(half: int) -> str:
    return json.dumps({"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": L,
                       "short_factor": [1.0 + 0.01 * i for i in range(half)],
                       "long_factor": [1.0 + 0.1 * i for i in range(half)]})


LLAMA3 = json.dumps({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": L})


def paths(src: Path, out: Path, half: int, genai: Path, kept: Path) -> dict[str, list[str]]:
    o = ["-o", str(out)]
    return {
        "inspect": ["inspect", str(src)],
        "check": ["check", str(src)],
        "linear": [str(src), "--rope-scale", "4", *o],
        "ntk": [str(src), "--rope-scale", "4", "--rope-method", "ntk", "--original-max-positions", str(L), *o],
        "dynamic": [str(src), "--rope-scale", "4", "--rope-method", "dynamic", "--original-max-positions", str(L),
                    *o],
        "yarn": [str(src), *YARN, *o],
        "llama3": [str(src), "--rope-params", LLAMA3, *o],
        "longrope": [str(src), "--rope-params", _longrope(half), *o],
        "fp32-positions": [str(src), "--fp32-positions", *o],
        "fuse-ort": [str(src), "--fuse", "ort", *o],
        "fuse-onnx": [str(src), "--fuse", "onnx", *o],
        "extend": [str(src), "--extend", "self-extend", "--window", "1024", "--group-size", "4", *o],
        "max-positions": [str(src), "--max-positions", "16384", *o],
        "genai-folder": [str(genai), *YARN, "-o", str(out.with_suffix(""))],
        "validate": ["validate", str(src), str(kept), *YARN],
    }


def run(args: list[str]) -> tuple[float, float, int, str]:
    """(seconds, peak RSS MB, exit code, last stderr line) of `python -m posrewrite args` in a fresh process."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "posrewrite", *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    lines = [x for x in err.splitlines() if x.strip()]
    return time.perf_counter() - t, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), (lines or [""])[-1]


def byte_copy(src: Path, out: Path) -> tuple[float, float, int]:
    """The data file's copy alone (load, save with nothing changed): seconds, peak RSS MB, exit code."""
    code = ("import sys; from posrewrite import io; "
            "io.save_model(io.load_model(sys.argv[1]), sys.argv[2])")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, str(src), str(out)], env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def allocated(paths_: list[Path]) -> int:
    total = 0
    for p in paths_:
        if p.is_dir():
            total += allocated(list(p.rglob("*")))
        elif p.exists():
            total += p.stat().st_blocks * 512
    return total


def outputs_of(folder: Path, keep: set[str]) -> list[Path]:
    return [p for p in folder.iterdir() if p.name not in keep]


def genai_folder(folder: Path, shape: tuple) -> Path:
    layers, hidden, heads, kv, inter, vocab = shape
    build_llama(folder / "model.onnx", layers=layers, hidden=hidden, heads=heads, kv_heads=kv, intermediate=inter,
                vocab=vocab)
    config = {"model": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "type": "llama",
                        "vocab_size": vocab, "context_length": L,
                        "decoder": {"filename": "model.onnx", "head_size": hidden // heads, "hidden_size": hidden,
                                    "num_attention_heads": heads, "num_key_value_heads": kv,
                                    "num_hidden_layers": layers, "session_options": {"provider_options": []},
                                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                               "position_ids": "position_ids",
                                               "past_key_names": "past_key_values.%d.key",
                                               "past_value_names": "past_key_values.%d.value"},
                                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                                "present_value_names": "present.%d.value"}}},
              "search": {"max_length": L}}
    (folder / "genai_config.json").write_text(json.dumps(config, indent=1))
    return folder


def bench_shape(name: str, base: Path, what: list[str] | None) -> None:
    shape = SHAPES[name]
    layers, hidden, heads, kv, inter, vocab = shape
    folder = base / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    src = build_llama(folder / "model.onnx", layers=layers, hidden=hidden, heads=heads, kv_heads=kv,
                      intermediate=inter, vocab=vocab)
    data = src.with_name(src.name + ".data")
    d = hidden // heads
    layer_bytes = 2 * (hidden * d * (heads + 2 * kv) + heads * d * hidden + 3 * hidden * inter)
    goal_mb = 2048 + layer_bytes / 2**20
    genai = genai_folder(base / f"{name}-genai", shape)
    kept = folder / "kept.onnx"
    rc = run([str(src), *YARN, "-o", str(kept), "--no-validate"])[2]
    assert rc == 0, "the output for `validate` could not be written"
    keep = {"model.onnx", "model.onnx.data", "kept.onnx", "kept.onnx.data"}
    print(f"\n{name}: {layers} layers, hidden {hidden}, {heads}/{kv} heads, intermediate {inter}, vocab {vocab}; "
          f"fp16 data {data.stat().st_size / 2**30:.1f} GB apparent, {allocated([data]) / 2**20:.0f} MB on disk; "
          f"largest layer {layer_bytes / 2**20:.0f} MB; goal: peak RSS < {goal_mb:.0f} MB"
          + (", < 60 s" if name == "7b" else ""))
    print(f"{'path':16s} {'seconds':>8s} {'peak RSS MB':>12s} {'RSS/goal':>9s} {'new disk MB':>12s} exit  note")
    for label, args in paths(src, folder / "out.onnx", d // 2, genai, kept).items():
        if what and label not in what:
            continue
        seconds, rss, code, last = run(args)
        made = outputs_of(folder, keep)
        disk = allocated(made) / 2**20
        for p in made:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        note = last[:110] if code else ""
        print(f"{label:16s} {seconds:8.1f} {rss:12.0f} {rss / goal_mb:9.2f} {disk:12.1f} {code:4d}  {note}",
              flush=True)
    seconds, rss, code = byte_copy(src, folder / "copy.onnx")
    disk = allocated(outputs_of(folder, keep)) / 2**20
    print(f"{'byte copy':16s} {seconds:8.1f} {rss:12.0f} {rss / goal_mb:9.2f} {disk:12.1f} {code:4d}  "
          "(load + save, nothing changed: the data file's copy alone)")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(genai, ignore_errors=True)


def layer_weights(src: Path) -> tuple[dict[int, int], int]:
    """Bytes of the initializers of each decoder layer (by the layer index in its name or in the names of the
    nodes that read it: `layers.N`), and of those outside any layer (embedding, final norm, lm_head); read from
    the model's shapes only."""
    import math
    import re

    import onnx_ir as ir

    from posrewrite import io

    proto = io.read_proto(src)  # the file's protobuf without its inline payloads
    readers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    per_layer: dict[int, int] = {}
    outside = 0
    for t in proto.graph.initializer:
        nbytes = math.ceil(math.prod(t.dims) * ir.DataType(t.data_type).itemsize)
        found = {int(m) for text in [t.name, *readers.get(t.name, [])] for m in re.findall(r"layers\.(\d+)", text)}
        if len(found) == 1:
            layer = found.pop()
            per_layer[layer] = per_layer.get(layer, 0) + nbytes
        else:
            outside += nbytes
    return per_layer, outside


def optimum_paths(src: Path, out: Path, half: int, kept: Path) -> dict[str, list[str]]:
    """The command line's paths on an Optimum export (original length 4096), every one with its default flags."""
    o = ["-o", str(out)]
    every = paths(src, out, half, src.parent, kept)
    every.pop("genai-folder")
    rows = {"inspect": every.pop("inspect"), "check": every.pop("check")}
    for scale in ("2", "4"):
        rows[f"yarn x{scale}"] = [str(src), "--rope-scale", scale, "--rope-method", "yarn",
                                  "--original-max-positions", str(L), *o]
    every.pop("yarn")
    rows.update(every)
    rows["yarn x2 --validate full"] = [*rows["yarn x2"], "--validate", "full"]
    return rows


def run_with(repo: Path, args: list[str]) -> tuple[float, float, int, str]:
    """`run` with the posrewrite of another checkout (the baseline)."""
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "posrewrite", *args], env=env, cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    lines = [x for x in err.splitlines() if x.strip()]
    return time.perf_counter() - t, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status), (lines or [""])[-1]


def bench_optimum(base: Path, model: str | None, baseline: Path | None, what: list[str] | None) -> None:
    """The issue's 623 MB Optimum export (`optimum-cli export onnx --task text-generation-with-past`, Llama 8
    layers, hidden 1024, 16/4 heads, fp32, weights inline) when `model` names it; else the same shape exported
    by fixtures.hf_models.export_optimum_layout (Optimum's layout without optimum-cli). Every path in a fresh
    process; with `baseline` (another checkout, e.g. main) each path runs there first, then here."""
    folder = base / "optimum"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if model:
        src = folder / "model.onnx"
        shutil.copyfile(model, src)  # the input is never modified; a copy of our own all the same
    else:
        from fixtures.hf_models import export_optimum_layout

        src = export_optimum_layout(num_layers=8, hidden=1024, heads=16, kv_heads=4, vocab=32000,
                                    intermediate=2816, max_position_embeddings=4096)
    per_layer, outside = layer_weights(src)
    largest = max(per_layer.values(), default=0)
    goal_mb = 2048 + largest / 2**20
    load = os.getloadavg()
    print(f"\noptimum export: {src} ({src.stat().st_size / 2**20:.0f} MB, weights inline); {len(per_layer)} layers, "
          f"largest layer {largest} bytes ({largest / 2**20:.1f} MB), outside the layers {outside / 2**20:.0f} MB; "
          f"goal: peak RSS < 2048 MB + largest layer = {goal_mb:.0f} MB; load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    sides = [("before", baseline), ("after", REPO)] if baseline else [("after", REPO)]
    head = "".join(f" {side + ' s':>9s} {side + ' MB':>10s} {'exit':>4s}" for side, _ in sides)
    print(f"{'path':26s}{head} {'after/goal':>10s}" + (f" {'MB after/before':>15s}" if baseline else "") + "  note")
    kept = {side: folder / f"kept-{side}.onnx" for side, _ in sides}
    for side, repo in sides:  # the rewritten model `validate` compares with, written by that side's code
        rc = run_with(repo, [str(src), *YARN, "-o", str(kept[side]), "--no-validate"])[2]
        assert rc == 0, f"the output for `validate` could not be written ({side})"
    keep = {src.name, *(p.name for p in kept.values())}
    labels = optimum_paths(src, folder / "out.onnx", 32, kept["after"])
    for label in labels:
        if what and label not in what:
            continue
        cells, results = "", {}
        for side, repo in sides:
            args = optimum_paths(src, folder / "out.onnx", 32, kept[side])[label]
            seconds, rss, code, last = run_with(repo, args)
            results[side] = (seconds, rss, code, last)
            for p in outputs_of(folder, keep):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            cells += f" {seconds:9.1f} {rss:10.0f} {code:4d}"
        after = results["after"]
        ratio = f" {after[1] / results['before'][1]:15.2f}" if baseline else ""
        notes = "; ".join(f"{side}: {r[3][:80]}" for side, r in results.items() if r[2])
        print(f"{label:26s}{cells} {after[1] / goal_mb:10.2f}{ratio}  {notes}", flush=True)
    seconds, rss, code = byte_copy(src, folder / "copy.onnx")
    print(f"{'byte copy (load + save)':26s} {seconds:9.1f} {rss:10.0f} {code:4d}  (after only: nothing changed)")
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="7b", help="comma-separated: 7b,13b,70b")
    parser.add_argument("--what", default="", help="comma-separated path labels (default: all)")
    parser.add_argument("--dir", default="/tmp/posrewrite-large")
    parser.add_argument("--optimum", action="store_true", help="also the Optimum-layout export")
    parser.add_argument("--optimum-model", help="a real optimum-cli export to use for --optimum (copied)")
    parser.add_argument("--baseline", help="another checkout (e.g. /work/main): --optimum runs each path there "
                        "too, side by side")
    args = parser.parse_args()
    base = Path(args.dir)
    what = [w for w in args.what.split(",") if w] or None
    for name in [s for s in args.shapes.split(",") if s]:
        bench_shape(name, base, what)
    if args.optimum:
        bench_optimum(base, args.optimum_model, Path(args.baseline) if args.baseline else None, what)


if __name__ == "__main__":
    main()
