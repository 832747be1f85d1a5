"""End-to-end onnxruntime CPU latency of a Llama-shaped export: original vs posrewrite-fused.

    python benchmarks/end_to_end.py [--layers 8 --hidden 1024 --heads 16 --kv-heads 4]
                                    [--lengths 512,1024,2048,4096] [--threads 2] [--repeat 3]

The model is a real transformers LlamaForCausalLM (random weights, fixtures.hf_models.export_llama_onnx_large)
exported with the dynamo exporter (input_ids -> logits, batch 1). Variants, all from that one export:
  original    the export as is
  rope        RoPE fused only (com.microsoft.RotaryEmbedding, attention left decomposed; --with-rope-only)
  fuse-ort    `posrewrite M.onnx --fuse ort`: RoPE fused, then the attention around it
  onnxscript  onnxscript's optimize_for_ort on the original export (--with-onnxscript; for reference)
Each length: one warm-up run per variant, then --repeat rounds in which every variant runs once (interleaved,
so a load change on a shared machine hits all variants alike); the minimum and the median are printed, the
speed-ups use the minimum. Logits of every variant are compared with the original's at the first length.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_variants(src: Path, tmp: Path, with_onnxscript: bool, with_rope: bool, max_positions: int) -> dict[str, Path]:
    import onnx_ir as ir

    from posrewrite import api
    from posrewrite.passes.onnx._infra import cleanup_passes
    from posrewrite.passes.onnx.attention.fuse import FuseAttentionPass
    from posrewrite.passes.onnx.rope.fuse import FuseRotaryPass
    from posrewrite.pipeline import run_passes

    variants = {"original": src}
    if with_rope:
        model = ir.load(str(src))
        found = api.detect(model)
        rope = FuseRotaryPass(sites=found.rope_sites, target="ort", max_positions=max_positions)
        run_passes([rope, *cleanup_passes()], model)
        out = tmp / "rope.onnx"
        ir.save(model, str(out), external_data="rope.onnx.data")
        variants["rope"] = out
        del model
    model = ir.load(str(src))
    found = api.detect(model)
    rope = FuseRotaryPass(sites=found.rope_sites, target="ort", max_positions=max_positions)
    attention = FuseAttentionPass(target="ort", after=rope, context=rope.context)
    t = time.perf_counter()
    run_passes([rope, *cleanup_passes(), attention, *cleanup_passes()], model)
    full = rope.context.report
    print(f"posrewrite --fuse ort: {time.perf_counter() - t:.1f} s; " + "; ".join(full.changes))
    for n in full.notes:
        print(f"  note: {n}")
    out = tmp / "fuse-ort.onnx"
    ir.save(model, str(out), external_data="fuse-ort.onnx.data")
    variants["fuse-ort"] = out
    del model
    if with_onnxscript:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        model = ir.load(str(src))
        optimize_for_ort(model)
        out = tmp / "onnxscript.onnx"
        ir.save(model, str(out), external_data="onnxscript.onnx.data")
        variants["onnxscript"] = out
    gc.collect()
    return variants


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--lengths", default="512,1024,2048,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--with-onnxscript", action="store_true")
    ap.add_argument("--with-rope-only", action="store_true")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    from fixtures.hf_models import export_llama_onnx_large

    lengths = [int(n) for n in args.lengths.split(",")]
    t = time.perf_counter()
    src = export_llama_onnx_large(
        num_layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab
    )
    print(
        f"model: Llama {args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} kv heads "
        f"({time.perf_counter() - t:.0f} s to export or load from the cache)"
    )
    with tempfile.TemporaryDirectory() as d:
        variants = build_variants(
            Path(src), Path(d), args.with_onnxscript, args.with_rope_only, max(max(lengths), 4096)
        )
        sessions = {name: session(path, args.threads) for name, path in variants.items()}
        best: dict[str, dict[int, float]] = {name: {} for name in variants}
        median: dict[str, dict[int, float]] = {name: {} for name in variants}
        for n in lengths:
            ids = np.random.default_rng(n).integers(3, args.vocab, size=(1, n)).astype(np.int64)
            ref = None
            for name, sess in sessions.items():
                out = sess.run(None, {"input_ids": ids})[0]  # warm-up
                if ref is None:
                    ref = out
                elif n == lengths[0]:
                    err = float(np.max(np.abs(out - ref)))
                    print(f"{name}: max |logits - original| at {n} tokens = {err:.2e}")
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for _ in range(args.repeat):
                for name, sess in sessions.items():
                    t = time.perf_counter()
                    sess.run(None, {"input_ids": ids})
                    times[name].append(time.perf_counter() - t)
            for name in sessions:
                best[name][n] = min(times[name]) * 1e3
                median[name][n] = statistics.median(times[name]) * 1e3
            print(f"{n} tokens: " + ", ".join(f"{k} {best[k][n]:.0f} ms" for k in sessions), flush=True)
        del sessions
        gc.collect()
    print(
        f"\nonnxruntime {ort.__version__} CPU, {args.threads} thread(s), batch 1, {args.repeat} interleaved rounds;"
        " min (median) in ms"
    )
    names = list(variants)
    print(
        f"{'tokens':>7} "
        + " ".join(f"{n:>18}" for n in names)
        + " "
        + " ".join(f"{'orig/' + n:>16}" for n in names[1:])
    )
    for n in lengths:
        row = f"{n:>7} " + " ".join(f"{best[v][n]:>9.0f} ({median[v][n]:>6.0f})" for v in names)
        row += " " + " ".join(f"{best['original'][n] / best[v][n]:>15.2f}x" for v in names[1:])
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
