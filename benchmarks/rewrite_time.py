"""Rewrite time on a 32-layer Llama export (weights in external data) vs onnxscript's optimize_for_ort.

posrewrite: load + detect + rescale (yarn x4) + save, no validation. onnxscript: load + optimize_for_ort +
save, on the same file. Both in this process, side by side; peak RSS growth is printed too.

    python benchmarks/rewrite_time.py [--layers 32] [--hidden 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import onnx_ir as ir


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_posrewrite(src: Path, out: Path) -> tuple[float, int]:
    from posrewrite import api

    t = time.perf_counter()
    result = api.rewrite(src, output=out, rope_scale=4.0, rope_method="yarn", original_max_positions=2048,
                         validate=False)
    elapsed = time.perf_counter() - t
    return elapsed, sum(s.rotations for s in result.sites if s.kind == "rope")


def time_onnxscript(src: Path, out: Path) -> tuple[float, int]:
    from onnxscript.rewriter import ort_fusions

    t = time.perf_counter()
    model = ir.load(src)
    model, counts = ort_fusions.optimize_for_ort(model)
    ir.save(model, out, external_data=out.name + ".data")
    elapsed = time.perf_counter() - t
    fused = sum(1 for node in ir.load(out).graph if node.op_type == "RotaryEmbedding")
    return elapsed, fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from fixtures.hf_models import export_llama_onnx_large

    src = export_llama_onnx_large(num_layers=args.layers, hidden=args.hidden)
    data = src.with_name(src.name + ".data")
    size_mb = data.stat().st_size / 2**20 if data.exists() else 0.0
    print(f"model: {args.layers} layers, hidden {args.hidden}, external data {size_mb:.0f} MB ({src})")
    ours, theirs = [], []
    # import the code first, so the growth below is data held by the rewrite, not modules being loaded
    import posrewrite.api  # noqa: F401
    import posrewrite.passes.onnx.rope.detect  # noqa: F401
    import posrewrite.passes.onnx.rope.rescale  # noqa: F401

    rss0 = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeat):
            t, ours_sites = time_posrewrite(src, Path(tmp) / f"pr{k}.onnx")
            ours.append(t)
        rss_ours = _rss_mb() - rss0
        for k in range(args.repeat):
            t, fused = time_onnxscript(src, Path(tmp) / f"os{k}.onnx")
            theirs.append(t)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"posrewrite rewrite (yarn x4, {ours_sites} RoPE applications): median {a:.2f} s over {args.repeat} runs; "
          f"peak RSS growth {rss_ours:.0f} MB")
    print(f"onnxscript optimize_for_ort (RotaryEmbedding nodes in its output: {fused}): "
          f"median {b:.2f} s over {args.repeat} runs")
    print(f"ratio onnxscript / posrewrite: {b / a:.2f}x")


if __name__ == "__main__":
    main()
