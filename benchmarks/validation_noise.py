"""What benign changes move a model's outputs, beside what correct fusions move: the numbers behind the bound
of validation's original-vs-rewritten comparison (posrewrite.validation.runs.COMPARE_EPS_UNITS).

    python benchmarks/validation_noise.py [--archs llama,cohere,...] [--length 48]

For each fixture export (fixtures.hf_models, fp32; the fp16 hand-written module of fixtures.modules), prints
max |a - b| / max |a| over every output for
  threads2   onnxruntime with 2 intra-op threads vs 1
  opt_off    graph optimisation disabled vs ORT_ENABLE_ALL
  opt_basic  ORT_ENABLE_BASIC vs ORT_ENABLE_ALL
  fuse_ort / fuse_onnx   `posrewrite M --fuse ort|onnx` (validation off) vs the original
and the bound validation uses (64 fp32 eps / 8 fp16 eps of the magnitude).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _session(path, threads: int, level):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.graph_optimization_level = level
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _rel(ref, out) -> float:
    worst = 0.0
    for a, b in zip(ref, out, strict=True):
        if np.asarray(a).dtype.kind != "f":
            continue
        a64 = np.asarray(a, np.float64)
        worst = max(worst, float(np.max(np.abs(a64 - b))) / (float(np.max(np.abs(a64))) or 1.0))
    return worst


def measure(path: Path, length: int) -> dict[str, float]:
    import onnxruntime as ort

    from posrewrite import api
    from posrewrite.validation.runs import full_model_feeds, token_id_limits

    levels = ort.GraphOptimizationLevel
    base = _session(path, 1, levels.ORT_ENABLE_ALL)
    feeds = full_model_feeds(base, length, token_id_limits(path))
    ref = base.run(None, feeds)
    row = {
        "threads2": _rel(ref, _session(path, 2, levels.ORT_ENABLE_ALL).run(None, feeds)),
        "opt_off": _rel(ref, _session(path, 1, levels.ORT_DISABLE_ALL).run(None, feeds)),
        "opt_basic": _rel(ref, _session(path, 1, levels.ORT_ENABLE_BASIC).run(None, feeds)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for target in ("ort", "onnx"):
            out = Path(tmp) / f"{target}.onnx"
            try:
                api.rewrite(path, output=out, fuse=target, validate=False)
            except Exception as exc:  # noqa: BLE001 - a refused fusion is reported, not fatal
                row[f"fuse_{target}"] = float("nan")
                print(f"  {path.parent.name}: --fuse {target}: {exc}", file=sys.stderr)
                continue
            row[f"fuse_{target}"] = _rel(ref, _session(out, 1, levels.ORT_ENABLE_ALL).run(None, feeds))
    row["dtype"] = str(np.asarray(ref[0]).dtype)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="llama,gpt_neox,qwen2,phi,gemma2,cohere,glm,gptj")
    parser.add_argument("--length", type=int, default=48)
    args = parser.parse_args()
    from fixtures.hf_models import export_hf_onnx
    from fixtures.modules import build_fp16_legacy_rope
    from posrewrite.validation.runs import COMPARE_EPS_UNITS, dtype_eps

    paths = [(a, export_hf_onnx(a)) for a in args.archs.split(",") if a]
    paths.append(("fp16 module", build_fp16_legacy_rope()[0]))
    keys = ["threads2", "opt_off", "opt_basic", "fuse_ort", "fuse_onnx"]
    print(f"{'model':14s} {'dtype':8s} " + " ".join(f"{k:>10s}" for k in keys) + f" {'bound':>10s}")
    for name, path in paths:
        row = measure(Path(path), args.length)
        bound = COMPARE_EPS_UNITS[row["dtype"]] * dtype_eps(row["dtype"])
        print(f"{name:14s} {row['dtype']:8s} " + " ".join(f"{row[k]:10.2e}" for k in keys) + f" {bound:10.2e}")


if __name__ == "__main__":
    main()
