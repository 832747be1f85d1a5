"""`--fuse ort` on an Optimum export (KV cache, position_ids, attention_mask): latency side by side.

The model is a random-weight Llama (default 8 layers, hidden 1024, 16 q / 4 kv heads, intermediate 2816, vocab
32000, 4096 positions) exported by optimum-cli itself (``--exporter optimum-cli``, the default:
``optimum-cli export onnx --task text-generation-with-past``, run from the side venv given by ``--optimum-venv``
or $POSREWRITE_OPTIMUM_VENV, default /work/venvs/optimum; see docs/goldens.md for its pins; the benchmark stops
with a message when that venv is absent), or by ``fixtures.hf_models.export_optimum_layout``
(``--exporter layout``: a reproduction of Optimum's layout with the TorchScript exporter at opset 14, no optimum
needed). It is rewritten with
``posrewrite --fuse ort --max-positions 4096`` and both models are run in one process, interleaved (original,
fused, original, ...), on the same feeds: prefill 512 and 2048 tokens (empty past) and one decode step at 2048
past. Medians, their ratio, and the largest difference of logits / presents are printed. A column for an
onnxruntime-genai builder model of the same weights is printed only when ``onnxruntime_genai`` is installed
(it is not in the project's environment: the column is skipped then).

Rewrite time: ``posrewrite --fuse ort`` against onnxscript's ``optimize_for_ort`` on the same file (the same
kind of work: fusions of the whole model, no validation), and posrewrite's rescale alone.

    python benchmarks/optimum_layout.py [--exporter optimum-cli|layout] [--optimum-venv DIR] [--layers 8]
                                        [--hidden 1024] [--threads 2] [--repeat 5] [--kernel-times 3]
                                        [--kernel-ops 12]

Summed kernel times (``--kernel-times``, and per op type with ``--kernel-ops``) move much less than wall time
when other processes share the CPU: compare those on a loaded machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _hf_folder(args, tmp: Path) -> Path:
    """The HF checkpoint of the benchmark's weights (fixtures.hf_models.optimum_layout_hf_model) with a
    one-word-per-id tokenizer (the genai builder and optimum-cli want one), written once under `tmp`."""
    hf = tmp / "hf"
    if (hf / "config.json").exists():
        return hf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fixtures.hf_models import optimum_layout_hf_model

    optimum_layout_hf_model(num_layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                            vocab=args.vocab, intermediate=args.intermediate,
                            max_position_embeddings=4096).save_pretrained(hf)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(args.vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(hf)
    return hf


def _optimum_cli_export(args, tmp: Path) -> Path:
    """``optimum-cli export onnx --task text-generation-with-past`` of the benchmark's HF checkpoint, run from
    the side venv (offline); cached (fixtures.cache) by model size and the venv's optimum/transformers/torch."""
    import json
    import subprocess

    from fixtures.cache import cached

    python = Path(args.optimum_venv) / "bin" / "python"
    code = ("import importlib.metadata as m, json; print(json.dumps({n: m.version(n) for n in "
            "('optimum', 'optimum-onnx', 'transformers', 'torch')}))")
    versions = json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                                         check=True).stdout)
    spec = dict(kind="optimum-cli-llama", layers=args.layers, hidden=args.hidden, heads=args.heads,
                kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab, versions=versions)

    def build(out: Path) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        cmd = [str(python.parent / "optimum-cli"), "export", "onnx", "--model", str(_hf_folder(args, tmp)),
               "--task", "text-generation-with-past", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not (out / "model.onnx").exists():
            raise SystemExit(f"optimum-cli export failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return {"command": cmd[1:], "versions": versions}

    path, _ = cached(spec, build)
    return path


def _genai_model(args, tmp: Path) -> Path | None:
    """onnxruntime-genai's builder model (``-p fp32 -e cpu``) of the same weights, or None when the builder is
    not installed."""
    import importlib.util
    import subprocess

    try:  # not imported here: importing the builder configures logging for the whole process
        if importlib.util.find_spec("onnxruntime_genai.models.builder") is None:
            return None
    except ImportError:
        return None

    hf = _hf_folder(args, tmp)
    out = tmp / "genai"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                    "-p", "fp32", "-e", "cpu", "-c", str(tmp / "genai-cache")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out / "model.onnx"


def _kernel_ms(models: list[tuple[Path, dict]], threads: int, runs: int) -> list[tuple[float, dict[str, float]]]:
    """Per model: the median over `runs` of the summed kernel times (onnxruntime's profiler) of one run, less
    sensitive than wall time to other processes competing for the CPU between kernels, and the mean per run by
    op type. The models run interleaved (one run of each in turn), so that they see the same load."""
    import json

    import onnxruntime as ort

    sessions = []
    for path, feeds in models:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / "posrewrite-kernel-times")
        sessions.append((ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), feeds))
    for _ in range(runs + 1):
        for sess, feeds in sessions:
            sess.run(None, feeds)
    results = []
    for sess, _ in sessions:
        trace = Path(sess.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink(missing_ok=True)
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
        per_run = [0.0] * len(spans)
        by_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                for k, (lo, hi) in enumerate(spans):
                    if lo <= e["ts"] <= hi:
                        per_run[k] += e["dur"] / 1e3
                        if k > 0 or len(spans) == 1:  # the first run warms up
                            op = e.get("args", {}).get("op_name", "?")
                            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3 / max(1, len(spans) - 1)
                        break
        results.append((statistics.median(per_run[1:] or per_run), by_op))
    return results


def _print_ops(columns: dict[str, dict[str, float]], top: int) -> None:
    """Summed kernel time per op type (ms per run), the `top` largest, one column per model."""
    ops = sorted({o for c in columns.values() for o in c}, key=lambda o: -max(c.get(o, 0.0) for c in columns.values()))
    print(f"    {'op type (kernel ms/run)':34s}" + "".join(f"{name:>12s}" for name in columns))
    for op in ops[:top]:
        print(f"    {op:34s}" + "".join(f"{c.get(op, 0.0):12.2f}" for c in columns.values()))


def _ops(path: Path) -> str:
    import onnx

    counts = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    keys = ("GroupQueryAttention", "MultiHeadAttention", "RotaryEmbedding", "Softmax",
            "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "Transpose")
    return ", ".join(f"{counts[k]} {k}" for k in keys if counts[k])


def _rewrite_times(src: Path, tmp: Path, repeat: int) -> None:
    import onnx_ir as ir
    from onnxscript.rewriter import ort_fusions

    from posrewrite import api

    def ours() -> None:
        api.rewrite(src, output=tmp / "ours.onnx", fuse="ort", max_positions=4096, validate=False)

    def rescale() -> None:
        api.rewrite(src, output=tmp / "rescaled.onnx", rope_scale=2.0, rope_method="yarn",
                    original_max_positions=4096, validate=False)

    def theirs() -> None:
        model = ir.load(src)
        model, _ = ort_fusions.optimize_for_ort(model)
        ir.save(model, tmp / "theirs.onnx")

    times: dict[str, list[float]] = {"posrewrite --fuse ort": [], "onnxscript optimize_for_ort": [],
                                     "posrewrite rescale (yarn x2)": []}
    for _ in range(repeat):
        for name, fn in zip(times, (ours, theirs, rescale), strict=True):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    print(f"\nrewrite time (same file, medians of {repeat}, interleaved):")
    for name, ts in times.items():
        print(f"  {name:30s} {statistics.median(ts):6.2f} s")
    print(f"  optimize_for_ort output: {_ops(tmp / 'theirs.onnx')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--decode-past", type=int, default=2048)
    parser.add_argument("--rewrite-repeat", type=int, default=3)
    parser.add_argument("--kernel-times", type=int, default=0, help="also sum kernel times over N profiled runs")
    parser.add_argument("--kernel-ops", type=int, default=0,
                        help="with --kernel-times: also print the N op types with the most kernel time, per model")
    parser.add_argument("--no-genai", dest="genai", action="store_false", help="skip the genai builder column")
    parser.add_argument("--exporter", choices=("optimum-cli", "layout"), default="optimum-cli",
                        help="(a) made by optimum-cli (side venv) or by fixtures.hf_models.export_optimum_layout")
    parser.add_argument("--optimum-venv", default=os.environ.get("POSREWRITE_OPTIMUM_VENV", "/work/venvs/optimum"),
                        help="the side venv with optimum-cli (docs/goldens.md)")
    args = parser.parse_args()

    from fixtures.hf_models import export_optimum_layout, optimum_feeds
    from posrewrite import api

    if args.exporter == "optimum-cli" and not (Path(args.optimum_venv) / "bin" / "optimum-cli").exists():
        print(f"skipped: no optimum-cli in the side venv {args.optimum_venv} (make one as docs/goldens.md says, "
              "pass --optimum-venv DIR, or --exporter layout for the reproduction of Optimum's layout)")
        return
    tmp = Path(tempfile.mkdtemp(prefix="posrewrite-optimum-"))
    t = time.perf_counter()
    if args.exporter == "optimum-cli":
        src = _optimum_cli_export(args, tmp)
        print(f"optimum-cli export (text-generation-with-past): {src} ({time.perf_counter() - t:.0f} s)")
    else:
        src = export_optimum_layout(num_layers=args.layers, hidden=args.hidden, heads=args.heads,
                                    kv_heads=args.kv_heads, intermediate=args.intermediate, vocab=args.vocab,
                                    max_position_embeddings=4096)
        print(f"Optimum-layout export: {src} ({time.perf_counter() - t:.0f} s)")
    fused = tmp / "fused.onnx"
    t = time.perf_counter()
    result = api.rewrite(src, output=fused, fuse="ort", max_positions=4096, validate=False)
    print(f"posrewrite --fuse ort --max-positions 4096: {time.perf_counter() - t:.1f} s")
    for line in result.changes + result.notes:
        print("  ", line)
    print(f"(a) original: {_ops(src)}")
    print(f"(b) fused:    {_ops(fused)}")
    genai = _genai_model(args, tmp) if args.genai else None
    if genai is None:
        print("(c) onnxruntime-genai builder model: skipped (onnxruntime_genai not installed, or --no-genai)")
    else:
        print(f"(c) genai:    {_ops(genai)}")

    a, b = _session(src, args.threads), _session(fused, args.threads)
    c = _session(genai, args.threads) if genai is not None else None
    c_inputs = {i.name for i in c.get_inputs()} if c is not None else set()
    cases = [(f"prefill {n}", dict(batch=1, past=0, seq=n)) for n in (int(x) for x in args.lengths.split(",") if x)]
    cases.append((f"decode, {args.decode_past} past", dict(batch=1, past=args.decode_past, seq=1)))
    print(f"\nlatency, onnxruntime CPU, {args.threads} threads, medians of {args.repeat} (interleaved):")
    head = f"  {'case':22s} {'(a) original':>13s} {'(b) fused':>11s} {'(a)/(b)':>8s}"
    if c is not None:
        head += f" {'(c) genai':>11s} {'(c)/(b)':>8s}"
    print(head + "  max |diff| logits/presents (b vs a; c vs a: logits)")
    for name, kw in cases:
        feeds = optimum_feeds(src, **kw)
        ra, rb = a.run(None, feeds), b.run(None, feeds)  # warm-up, and the outputs compared
        err = max(float(np.max(np.abs(x - y))) for x, y in zip(ra, rb, strict=True))
        scale = max(float(np.max(np.abs(x))) for x in ra)
        runs = [(a, feeds, []), (b, feeds, [])]
        if c is not None:
            c_feeds = {k: v for k, v in feeds.items() if k in c_inputs}
            err_c = float(np.max(np.abs(c.run(None, c_feeds)[0] - ra[0])))
            runs.append((c, c_feeds, []))
        for _ in range(args.repeat):
            for sess, f, times in runs:
                t = time.perf_counter()
                sess.run(None, f)
                times.append(time.perf_counter() - t)
        ma, mb = (statistics.median(r[2]) * 1e3 for r in runs[:2])
        line = f"  {name:22s} {ma:10.1f} ms {mb:8.1f} ms {ma / mb:7.2f}x"
        if c is not None:
            mc = statistics.median(runs[2][2]) * 1e3
            line += f" {mc:8.1f} ms {mc / mb:7.2f}x"
        tail = f"  {err:.2e} (outputs up to {scale:.2g})" + (f"; c: {err_c:.2e}" if c is not None else "")
        print(line + tail)
        if args.kernel_times:
            models = [(src, feeds), (fused, feeds)] + ([(genai, c_feeds)] if c is not None else [])
            kernel = _kernel_ms(models, args.threads, args.kernel_times)
            (ka, oa), (kb, ob) = kernel[:2]
            line = f"  {'  summed kernel time':22s} {ka:10.1f} ms {kb:8.1f} ms {ka / kb:7.2f}x"
            columns = {"(a)": oa, "(b)": ob}
            if c is not None:
                kc, columns["(c)"] = kernel[2]
                line += f" {kc:8.1f} ms {kc / kb:7.2f}x"
            print(line)
            if args.kernel_ops:
                _print_ops(columns, args.kernel_ops)
    del a, b, c
    try:
        if args.rewrite_repeat:
            _rewrite_times(src, tmp, args.rewrite_repeat)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # fused, genai and HF copies: gigabytes at the default size


if __name__ == "__main__":
    main()
