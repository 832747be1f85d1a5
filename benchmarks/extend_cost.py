"""What the attention-level extensions cost at run time: each rewritten model against the model as exported.

The model is a random-weight Llama in Optimum's ``text-generation-with-past`` layout (TorchScript, opset 14, KV
cache; ``fixtures.hf_models.export_optimum_layout``), default 4 layers, hidden 512, 8 q / 4 kv heads, 4096
positions. It is rewritten with each method (``posrewrite MODEL --extend ...``; ``--fuse ort`` alone and each
method with ``--fuse ort``; ``--runtime-decode rerotate`` for dynamic NTK against dynamic's HF mode) and every model
runs in one process on the same feeds: a prefill of ``--prefill`` tokens from an empty past, and one decode step at
``--past`` past (random past keys/values). onnxruntime CPU, ``--threads`` intra-op threads.

Every round runs each model once, in an order shuffled per round (seeded), so that no model always follows the
same one. Per model and case the table gives the fastest round (or, ``--statistic median``, the median) and two
ratios to the model as exported: of those statistics, and the median over rounds of the ratio within a round
(paired: both runs under the same load; the steadier figure on a shared CPU).

``--extend`` also moves torch's NaN guard (``Where(IsNaN(p), 0, p)`` on the [.., S, T] probabilities) to the
attention's output rows (exact; `posrewrite.passes.onnx.attention.softmax_guard`). The row ``guard moved`` is
the exported model with that move alone (the Python API, no extension): the extension's own cost is its ratio
to that row.

    python benchmarks/extend_cost.py [--layers 4] [--hidden 512] [--prefill 2048] [--past 2048] [--threads 2]
                                     [--repeat 5] [--decode-repeat N] [--compare OTHER_CHECKOUT]

Decode feeds a past in each model's own cache layout (``--extend`` packs the keys of its position systems on the
heads axis of ``present.key``: docs/long-context.md).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METHODS = {
    "self-extend": ["--extend", "self-extend", "--group-size", "8", "--window", "1024"],
    "rerope": ["--extend", "rerope", "--window", "1024"],
    "dual-chunk": ["--extend", "dual-chunk", "--chunk-size", "1536", "--local-size", "256"],
    "log-n": ["--logn-scaling", "--original-max-positions", "1024"],
}
FUSED = {  # --fuse ort alone (the rotary and attention fusion), and every method on top of it
    "fuse ort": ["--fuse", "ort"],
    **{f"{name} + fuse ort": [*flags, "--fuse", "ort"] for name, flags in METHODS.items()},
}
RUNTIME = {  # compared with each other: HF's cached behaviour against re-rotating the past
    "dynamic (hf)": ["--rope-scale", "4", "--rope-method", "dynamic", "--original-max-positions", "1024"],
    "dynamic (rerotate)": ["--rope-scale", "4", "--rope-method", "dynamic", "--original-max-positions", "1024",
                           "--runtime-decode", "rerotate"],
}


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _cache_heads(sess) -> dict[str, int]:
    """Heads of each past input as the model's own presents have them (a packed key cache of `--extend` has
    (1 + m) H), read from a one-token prefill from an empty past of H heads."""
    values = {i.name: i for i in sess.get_inputs() if i.name.startswith("past_key_values")}
    heads = {n: (i.shape[1] if isinstance(i.shape[1], int) else
                 values["value".join(n.rsplit("key", 1))].shape[1]) for n, i in values.items()}
    feeds = {"input_ids": np.ones((1, 1), np.int64), "attention_mask": np.ones((1, 1), np.int64),
             "position_ids": np.zeros((1, 1), np.int64)}
    for n, i in values.items():
        feeds[n] = np.zeros((1, heads[n], 0, i.shape[3]), np.float32)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds), strict=True))
    return {n: outs[n.replace("past_key_values", "present")].shape[1] for n in values}


def _feeds(sess, past: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(3, 1000, size=(1, seq)).astype(np.int64),
             "attention_mask": np.ones((1, past + seq), np.int64),
             "position_ids": np.arange(past, past + seq)[None].astype(np.int64)}
    heads = _cache_heads(sess)
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values"):
            h = heads[inp.name] if past else (inp.shape[1] if isinstance(inp.shape[1], int) else
                                              heads["value".join(inp.name.rsplit("key", 1))])
            feeds[inp.name] = rng.standard_normal((1, h, past, inp.shape[3])).astype(np.float32)
    return feeds


def _rewrite(src: Path, out: Path, flags: list[str], checkout: Path = REPO) -> None:
    cmd = [sys.executable, "-m", "posrewrite", str(src), *flags, "-o", str(out), "--no-validate"]
    p = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(flags)}: exit {p.returncode}: {p.stderr.strip()[-300:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--past", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--decode-repeat", type=int, default=None,
                    help="rounds of the decode step (default --repeat; a step is short and noisy on a shared CPU)")
    names = [*METHODS, *FUSED, *RUNTIME]
    ap.add_argument("--methods", nargs="+", default=names, choices=names)
    ap.add_argument("--no-guard-row", action="store_true",
                    help="leave out the 'guard moved' control row (the exported model with only torch's NaN guard "
                         "moved)")
    ap.add_argument("--statistic", choices=["median", "min"], default="min",
                    help="per model and case: the median of the rounds, or the fastest (on a CPU shared with "
                         "bursty work the fastest round is the one least disturbed)")
    ap.add_argument("--compare", type=Path, metavar="CHECKOUT",
                    help="also rewrite every method with the posrewrite of another checkout (rows 'method @ NAME', "
                         "NAME the checkout's folder name), timed in the same rounds")
    args = ap.parse_args()

    from fixtures.hf_models import export_optimum_layout

    src = export_optimum_layout(num_layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                                vocab=32000, intermediate=4 * args.hidden, max_position_embeddings=4096)
    tmp = Path(tempfile.mkdtemp(prefix="extend_cost_"))
    models = {"as exported": src}
    for name in args.methods:
        out = tmp / f"{name.replace(' ', '_').replace('(', '').replace(')', '').replace('+', 'and')}.onnx"
        _rewrite(src, out, {**METHODS, **FUSED, **RUNTIME}[name])
        models[name] = out
        if args.compare is not None:
            label = f"{name} @ {args.compare.resolve().name}"
            other = tmp / f"compare_{out.name}"
            _rewrite(src, other, {**METHODS, **FUSED, **RUNTIME}[name], args.compare)
            models[label] = other
    if not args.no_guard_row:
        import onnx_ir as ir

        from posrewrite.passes.onnx.attention.softmax_guard import move_softmax_guards

        guarded = ir.load(src)
        if move_softmax_guards(guarded):
            models["guard moved"] = tmp / "guard_moved.onnx"
            ir.save(guarded, models["guard moved"])
    sessions = {name: _session(path, args.threads) for name, path in models.items()}
    # the same tokens and values for every model; a past in each model's own cache layout (random keys: the
    # packed systems of a --extend model get random keys too, which costs the same as real ones)
    cases = {f"prefill {args.prefill}": {n: _feeds(s, 0, args.prefill) for n, s in sessions.items()},
             f"decode at {args.past} past": {n: _feeds(s, args.past, 1) for n, s in sessions.items()}}
    times: dict[tuple[str, str], list[float]] = {}
    rounds = {case: args.repeat if case.startswith("prefill") or args.decode_repeat is None else args.decode_repeat
              for case in cases}
    order = list(sessions)
    shuffle = random.Random(0).shuffle
    for case, per_model in cases.items():
        for name, sess in sessions.items():  # warm-up
            sess.run(None, per_model[name])
        for _ in range(rounds[case]):
            shuffle(order)  # every model under the same load, none always right after the same one
            for name in order:
                t0 = time.perf_counter()
                sessions[name].run(None, per_model[name])
                times.setdefault((case, name), []).append(time.perf_counter() - t0)
    print(f"model: Llama, {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} heads, Optimum "
          f"layout (TorchScript, opset 14); onnxruntime CPU, {args.threads} threads; "
          + ", ".join(f"{n} shuffled rounds ({c})" for c, n in rounds.items())
          + f"; ms: the {args.statistic} of the rounds; ratio: of those; paired: median of the per-round ratios")
    print()
    header = "| model | " + " | ".join(f"{c} (ms) | ratio | paired" for c in cases) + " |"
    print(header)
    print("|---|" + "---:|---:|---:|" * len(cases))
    stat = statistics.median if args.statistic == "median" else min
    base = {c: stat(times[(c, "as exported")]) for c in cases}
    for name in models:
        cells = []
        for c in cases:
            paired = statistics.median(a / b for a, b in zip(times[(c, name)], times[(c, "as exported")],
                                                             strict=True))
            cells.append(f"{1000 * stat(times[(c, name)]):.1f} | {stat(times[(c, name)]) / base[c]:.2f}x | "
                         f"{paired:.2f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "dynamic (hf)" in models and "dynamic (rerotate)" in models:
        print()
        for c in cases:
            a = stat(times[(c, "dynamic (rerotate)")])
            b = stat(times[(c, "dynamic (hf)")])
            print(f"rerotate / hf, {c}: {a / b:.2f}x")


if __name__ == "__main__":
    main()
