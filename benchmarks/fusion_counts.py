"""How many RoPE rotations each fuser turns into a fused op, on the same exports.

    python benchmarks/fusion_counts.py [--archs llama,gpt_neox,...] [--json]

Fixtures: the tiny Hugging Face models of fixtures.hf_models.ARCHS exported with the dynamo exporter (the
export people get today). For each, the number of q/k rotations posrewrite detects, then the rotations
fused by
  posrewrite  `posrewrite M.onnx --fuse ort`          (RotaryEmbedding nodes + 2 per GroupQueryAttention
                                                      with do_rotary)
  onnxscript  `onnxscript.rewriter.ort_fusions.optimize_for_ort(model)`
  ort-opt     `onnxruntime.transformers.optimizer.optimize_model(path, model_type="gpt2", opt_level=0)`
and whether the fuser's output still runs in onnxruntime with the original's logits (1e-4).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def rotations_fused(proto: onnx.ModelProto) -> int:
    n = 0
    for node in proto.graph.node:
        if node.op_type == "RotaryEmbedding":
            n += 1
        elif node.op_type == "GroupQueryAttention":
            if any(a.name == "do_rotary" and a.i == 1 for a in node.attribute):
                n += 2
    return n


def _logits_ok(src: Path, out: Path) -> bool | None:
    from fixtures.hf_models import ort_logits

    ids = np.random.default_rng(0).integers(3, 128, size=(2, 20))
    try:
        return bool(np.max(np.abs(ort_logits(out, ids) - ort_logits(src, ids))) <= 1e-4)
    except Exception:  # noqa: BLE001
        return False


def run_posrewrite(src: Path, tmp: Path) -> dict:
    from posrewrite import api

    out = tmp / "posrewrite.onnx"
    t = time.perf_counter()
    api.rewrite(src, output=out, fuse="ort")
    return {"fused": rotations_fused(onnx.load(out)), "seconds": time.perf_counter() - t, "runs": _logits_ok(src, out)}


def run_onnxscript(src: Path, tmp: Path) -> dict:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    out = tmp / "onnxscript.onnx"
    t = time.perf_counter()
    model = ir.load(str(src))
    optimize_for_ort(model)
    ir.save(model, str(out))
    return {"fused": rotations_fused(onnx.load(out)), "seconds": time.perf_counter() - t, "runs": _logits_ok(src, out)}


def run_ort_optimizer(src: Path, tmp: Path) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    out = tmp / "ortopt.onnx"
    t = time.perf_counter()
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = optimize_model(str(src), model_type="gpt2", num_heads=0, hidden_size=0, opt_level=0)
        m.save_model_to_file(str(out))
    return {"fused": rotations_fused(onnx.load(out)), "seconds": time.perf_counter() - t, "runs": _logits_ok(src, out)}


TOOLS = {"posrewrite": run_posrewrite, "onnxscript": run_onnxscript, "ort-opt": run_ort_optimizer}


def count(arch: str) -> dict:
    from fixtures.hf_models import export_hf_onnx
    from posrewrite import api

    src = export_hf_onnx(arch)
    found = api.inspect(src)
    row: dict = {"arch": arch, "rotations": sum(s.rotations for s in found.sites)}
    with tempfile.TemporaryDirectory() as d:
        for name, fn in TOOLS.items():
            try:
                row[name] = fn(Path(src), Path(d))
            except Exception as exc:  # noqa: BLE001 - a fuser failing is a result
                row[name] = {
                    "fused": None,
                    "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}",
                }
    return row


def main(argv=None) -> int:
    from fixtures.hf_models import ARCHS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [count(a) for a in args.archs.split(",")]
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'arch':>10} {'rotations':>9} " + " ".join(f"{t:>18}" for t in TOOLS))
    totals = {t: 0 for t in TOOLS}
    for r in rows:
        cells = []
        for t in TOOLS:
            c = r[t]
            if c.get("fused") is None:
                cells.append(f"{'error':>18}")
                continue
            totals[t] += c["fused"]
            ok = "" if c.get("runs") else " (bad)"
            cells.append(f"{c['fused']:>7} {c['seconds']:5.1f}s{ok:>5}")
        print(f"{r['arch']:>10} {r['rotations']:>9} " + " ".join(cells))
    print(f"{'total':>10} {sum(r['rotations'] for r in rows):>9} " + " ".join(f"{totals[t]:>18}" for t in TOOLS))
    for r in rows:
        for t in TOOLS:
            if "error" in r[t]:
                print(f"  {r['arch']} {t}: {r[t]['error']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
