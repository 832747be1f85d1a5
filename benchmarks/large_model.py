"""Rewrite time and peak memory on a 7B-shaped Llama export (Optimum layout, fp16, external data).

The graph is built directly with onnx (no torch): 32 layers, hidden 4096, 32 q / 8 kv heads, intermediate
11008, vocab 32000, fp16 weights in one *sparse* external data file (13.5 GB apparent, almost nothing on disk:
the values are zeros). Inputs input_ids, attention_mask, position_ids, past_key_values.{i}.key/value; outputs
logits, present.{i}.key/value; RoPE computed HF-style from an inv_freq constant and position_ids.

Each rewrite runs in a fresh process (``/usr/bin/time``-style: the child's peak RSS from ``wait4``):

    python benchmarks/large_model.py [--layers 32] [--dir /tmp/posrewrite-7b] [--what rescale,fuse,inspect]
                                     [--code /work/main]   # another checkout of posrewrite, side by side
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fixtures.llama_graph import build_llama  # noqa: E402


class _StageTimes:
    """A posrewrite progress reporter that records how long each stage took."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, description: str, total: float | None = None):
        from posrewrite.progress import NullReporter

        t = time.perf_counter()
        with NullReporter().stage(description, total) as s:
            yield s
        self.times[description] = self.times.get(description, 0.0) + time.perf_counter() - t

    def note(self, message: str) -> None:
        pass


def _child(what: str, src: str, out: str) -> None:
    from posrewrite import api

    stages = _StageTimes()
    t = time.perf_counter()
    if what == "inspect":  # identification alone: reads no weights
        found = api.inspect(src)
        print(f"  inspect: {len(found.sites)} site(s), {len(found.refusals)} refusal(s), "
              f"{time.perf_counter() - t:.1f} s")
        return
    if what == "rescale":
        r = api.rewrite(src, output=out, rope_scale=4.0, rope_method="yarn", original_max_positions=4096,
                        validate=False, progress=stages)
    else:
        r = api.rewrite(src, output=out, fuse="ort", max_positions=16384, validate=False, progress=stages)
    rest = time.perf_counter() - t - sum(stages.times.values())
    print("  stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.times.items()) + f", other {rest:.1f} s")
    for line in r.changes:
        print("  change:", line)
    for line in r.notes:
        print("  note:", line)


def measure(what: str, src: Path, out: Path, code: str | None = None) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, return code) of one rewrite in a fresh process (posrewrite from `code`, a
    checkout, else this one)."""
    env = dict(os.environ, PYTHONPATH=code or str(Path(__file__).resolve().parents[1]))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", what, str(src), str(out)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dir", default="/tmp/posrewrite-7b")
    parser.add_argument("--what", default="rescale,fuse")
    parser.add_argument("--code", action="append", default=[],
                        help="also run with posrewrite from this checkout (repeatable): side-by-side figures")
    args = parser.parse_args()
    folder = Path(args.dir)
    src = folder / "model.onnx"
    t = time.perf_counter()
    if not src.exists():
        build_llama(src, layers=args.layers, hidden=args.hidden, heads=32, kv_heads=8,
                    intermediate=11008 if args.hidden == 4096 else args.hidden * 3)
    data = src.with_name(src.name + ".data")
    print(f"built {src} in {time.perf_counter() - t:.1f} s: {args.layers} layers, hidden {args.hidden}, "
          f"fp16 weights {data.stat().st_size / 2**30:.1f} GB (sparse file)")
    for what in args.what.split(","):
        out = folder / f"{what}.onnx"
        for code in [None, *args.code]:
            seconds, rss, rc = measure(what, src, out, code)
            print(f"{what:8s} {seconds:6.1f} s  peak RSS {rss:7.0f} MB  exit {rc}  ({code or 'this checkout'})")
            for p in (out, out.with_name(out.name + ".data")):
                p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
