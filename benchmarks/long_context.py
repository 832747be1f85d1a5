"""Long-context perplexity of a small byte-level RoPE model before and after posrewrite's RoPE rescaling.

    python benchmarks/long_context.py -o docs/long_context.png

The model is ``fixtures/train_lm.py``'s LlamaForCausalLM (trained on 128-byte windows of the Python standard
library; weights committed in ``fixtures/trained/``, retrained when missing).  It is exported to ONNX once
(cached), and for every method and scale s the CLI writes a rewritten model:

    python -m posrewrite byte_llama.onnx --rope-scale s --rope-method M --original-max-positions 128 \
        -o byte_llama.M.s.onnx --no-validate

Every model is evaluated in onnxruntime on the held-out files (never trained on): the same first
``--tokens`` bytes, cut into non-overlapping windows of s x 128 bytes; perplexity = exp(mean next-byte NLL
over every predicted position of every window).  The original model is evaluated at every length (plain
extrapolation); each rewrite at the length matching its scale.  No fine-tuning anywhere.

``--crosscheck`` also builds each rescaled model in Hugging Face transformers (same weights, the
corresponding ``rope_parameters``) and reports the largest logit difference from the rewritten ONNX model on
the first window.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fixtures import train_lm  # noqa: E402

FREQUENCY_METHODS = ("linear", "ntk", "dynamic", "yarn")
# attention-level methods (posrewrite.math.positions.recommended gives their parameters for each length)
ATTENTION_METHODS = ("self-extend", "rerope", "leaky-rerope", "rerope+logn", "dual-chunk")
METHODS = FREQUENCY_METHODS + ATTENTION_METHODS
SCALES = (1, 2, 4, 8, 16)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    mx = x.max(axis=-1, keepdims=True)
    lse = (mx + np.log(np.exp(x - mx).sum(axis=-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def windows(tokens: np.ndarray, length: int, budget: int) -> np.ndarray:
    n = budget // length
    if n < 1 or n * length > tokens.size:
        raise ValueError(f"not enough held-out text for windows of {length} (budget {budget}, have {tokens.size})")
    return tokens[: n * length].reshape(n, length).astype(np.int64)


def perplexity(
    path: Path, tokens: np.ndarray, length: int, budget: int, threads: int, train_length: int, batch: int = 8
) -> dict:
    """Perplexity over every predicted byte of the windows, and over the bytes at positions >= train_length
    only (those whose context reaches past the training length; absent at 1x)."""
    sess = _session(path, threads)
    w = windows(tokens, length, budget)
    total, count, tail, tail_count = 0.0, 0, 0.0, 0
    for s in range(0, len(w), batch):
        ids = w[s : s + batch]
        (logits,) = sess.run(["logits"], {"input_ids": ids})
        nll = _log_softmax_nll(logits[:, :-1], ids[:, 1:])  # nll[:, p] predicts the byte at position p + 1
        total += float(nll.sum())
        count += nll.size
        t = nll[:, train_length - 1 :]
        tail += float(t.sum())
        tail_count += t.size
    out = {"ppl": math.exp(total / count), "nll": total / count, "windows": len(w), "predicted": count}
    if tail_count:
        out["ppl_past_train_length"] = math.exp(tail / tail_count)
    return out


def method_flags(method: str, scale: int, L: int) -> list[str]:
    """The posrewrite flags of one row of the table at scale x L tokens."""
    if method in FREQUENCY_METHODS:
        return ["--rope-scale", str(scale), "--rope-method", method, "--original-max-positions", str(L)]
    from posrewrite.math.positions import cli_flags, recommended

    base, _, logn = method.partition("+")
    flags = cli_flags(base, recommended(base, L, scale * L))
    if logn:
        flags += ["--logn-scaling", "--original-max-positions", str(L)]
    return flags


def params_label(method: str, L: int, scales) -> str:
    if method in FREQUENCY_METHODS:
        return f"{method} (scale = length / {L})"
    from posrewrite.math.positions import recommended

    base, _, logn = method.partition("+")
    per = [recommended(base, L, s * L) for s in scales]
    if base == "dual-chunk":
        return f"{method} (C {per[0]['chunk_size']}, W {per[0]['local_size']})"
    keys = [k for k in per[0] if k != "window"]
    what = f"W {per[0]['window']}" + "".join(f", {k.replace('group_size', 'G').replace('leaky', 'k')} "
                                             + "/".join(f"{p[k]:g}" for p in per) for k in keys)
    return f"{method} ({what})"


def rewrite(src: Path, method: str, scale: int, L: int, cache: Path) -> tuple[Path | None, str]:
    out = cache / f"byte_llama.{method}.x{scale}.onnx"
    flags = method_flags(method, scale, L)
    stamp = out.with_suffix(".flags")
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime and stamp.exists() and \
            stamp.read_text() == " ".join(flags):
        return out, ""
    cmd = [sys.executable, "-m", "posrewrite", str(src), *flags, "-o", str(out), "--no-validate"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        return None, f"exit {p.returncode}: {(p.stderr or p.stdout).strip().splitlines()[-1:] or ['']}"
    stamp.write_text(" ".join(flags))
    return out, ""


def hf_rope_parameters(method: str, scale: int, L: int) -> dict:
    from posrewrite.math.rope import ntk_base

    if method == "ntk":
        head_dim = train_lm.MODEL_CONFIG["hidden_size"] // train_lm.MODEL_CONFIG["num_attention_heads"]
        return {"rope_type": "default", "rope_theta": ntk_base(train_lm.ROPE_THETA, head_dim, scale)}
    if method in ("linear", "dynamic"):  # HF's dynamic compares with config.max_position_embeddings (= L)
        return {"rope_type": method, "factor": float(scale)}
    return {"rope_type": method, "factor": float(scale), "original_max_position_embeddings": L}


def crosscheck(path: Path, method: str, scale: int, tokens: np.ndarray, L: int, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    model = train_lm.load_model(hf_rope_parameters(method, scale, L))
    ids = windows(tokens, scale * L, scale * L)[:1]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    (got,) = _session(path, threads).run(["logits"], {"input_ids": ids})
    return float(np.abs(got - ref).max())


def fmt_ppl(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 100 else f"{x:.4g}"


def table(results: dict, L: int, scales: tuple[int, ...], methods: tuple[str, ...]) -> list[str]:
    head = "| model (no fine-tuning) | " + " | ".join(f"{s}× ({s * L})" for s in scales) + " |"
    lines = [head, "|---|" + "---:|" * len(scales)]
    base1 = results["original"].get(1, {}).get("ppl")
    orig = [results["original"].get(s, {}).get("ppl") for s in scales]
    lines.append("| original (plain extrapolation) | " + " | ".join(fmt_ppl(x) for x in orig) + " |")
    for m in methods:
        cells = []
        for s in scales:
            r = results.get(m, {}).get(s)
            if s == 1 and m in FREQUENCY_METHODS:
                cells.append("= original")
            elif r is None:
                cells.append("—")
            elif "error" in r:
                cells.append("failed")
            else:
                cells.append(fmt_ppl(r["ppl"]))
        lines.append(f"| {params_label(m, L, scales)} | " + " | ".join(cells) + " |")
    tail_scales = [s for s in scales if s > 1]
    if tail_scales:
        lines.append("")
        lines.append(
            f"perplexity of the bytes at positions ≥ {L} only (their context reaches past the training length):"
        )
        lines.append("| model | " + " | ".join(f"{s}× ({s * L})" for s in tail_scales) + " |")
        lines.append("|---|" + "---:|" * len(tail_scales))
        for m in ("original",) + tuple(methods):
            cells = [fmt_ppl(results.get(m, {}).get(s, {}).get("ppl_past_train_length")) for s in tail_scales]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if base1:
        lines.append("")
        lines.append(f"ratio to the 1× perplexity {base1:.3f}:")
        lines.append("| model | " + " | ".join(f"{s}×" for s in scales) + " |")
        lines.append("|---|" + "---:|" * len(scales))
        lines.append("| original | " + " | ".join("—" if x is None else f"{x / base1:.2f}" for x in orig) + " |")
        for m in methods:
            cells = []
            for s in scales:
                r = results.get(m, {}).get(s)
                skip = s == 1 and m in FREQUENCY_METHODS
                cells.append("—" if skip or r is None or "ppl" not in r else f"{r['ppl'] / base1:.2f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict, L: int, scales, methods, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    xs = [s for s in scales if s in results["original"]]
    ax.plot(xs, [results["original"][s]["ppl"] for s in xs], "k--o", lw=2, label="original (plain extrapolation)")
    base1 = results["original"].get(1, {}).get("ppl")
    markers = {"linear": "s", "ntk": "^", "dynamic": "v", "yarn": "D", "self-extend": "P", "rerope": "X",
               "leaky-rerope": "*", "rerope+logn": "h", "dual-chunk": "p"}
    for m in methods:
        first = 1 if m in FREQUENCY_METHODS else 0
        pts = [(s, results[m][s]["ppl"]) for s in scales if s > first and "ppl" in results.get(m, {}).get(s, {})]
        if base1 and m in FREQUENCY_METHODS:
            pts = [(1, base1)] + pts
        if len(pts) > 1:
            style = "-" if m in FREQUENCY_METHODS else "-."
            ax.plot(*zip(*pts, strict=True), style, marker=markers.get(m, "o"), lw=1.5,
                    label=params_label(m, L, scales))
    if base1:
        ax.axhline(base1 * 1.5, color="gray", ls=":", lw=1, label="1.5 × the 1× perplexity")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xticks(list(scales), [f"{s}×\n{s * L}" for s in scales])
    ax.set_xlabel(f"evaluation length (multiple of the training length {L})")
    ax.set_ylabel("held-out perplexity (bytes)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default="out/long_context.png", help="PNG to write (a .json is written beside)")
    ap.add_argument("--cache-dir", default=str(REPO / ".cache" / "long_context"))
    ap.add_argument("--tokens", type=int, default=32768, help="held-out bytes evaluated per length")
    ap.add_argument("--scales", type=int, nargs="+", default=list(SCALES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crosscheck", action="store_true", help="compare each rewrite with the HF model's logits")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    L = train_lm.CONTEXT
    scales = tuple(sorted(set(args.scales)))
    methods = tuple(args.methods)
    src = train_lm.ensure_onnx(cache)
    meta = json.loads(train_lm.META.read_text()) if train_lm.META.exists() else {}
    tokens = train_lm.heldout_tokens()
    print(
        f"model: {src} ({meta.get('parameters', '?')} parameters, trained at {L} bytes, "
        f"seed {meta.get('seed', '?')}); held-out text: {tokens.size:,} bytes from "
        f"{len(train_lm.split_files()[1])} stdlib files, {args.tokens:,} evaluated per length",
        flush=True,
    )

    results: dict = {"original": {}}
    for s in scales:
        results["original"][s] = perplexity(src, tokens, s * L, args.tokens, args.threads, L)
        print(f"  original @ {s}x: ppl {results['original'][s]['ppl']:.3f}", flush=True)  # noqa: E501
    failures = []
    for m in methods:
        results[m] = {}
        for s in scales:
            if s == 1 and m in FREQUENCY_METHODS:
                continue
            path, err = rewrite(src, m, s, L, cache)
            if path is None:
                results[m][s] = {"error": err}
                failures.append(f"{m} x{s}: {err}")
                print(f"  {m} x{s}: rewrite failed ({err})", flush=True)
                continue
            r = perplexity(path, tokens, s * L, args.tokens, args.threads, L)
            if args.crosscheck and m in FREQUENCY_METHODS:
                r["max_abs_logit_diff_vs_hf"] = crosscheck(path, m, s, tokens, L, args.threads)
            results[m][s] = r
            extra = f", max |logit - HF| {r['max_abs_logit_diff_vs_hf']:.2e}" if "max_abs_logit_diff_vs_hf" in r else ""
            print(f"  {m} @ {s}x: ppl {r['ppl']:.3f}{extra}", flush=True)

    lines = table(results, L, scales, methods)
    print()
    print("\n".join(lines))
    base1 = results["original"].get(1, {}).get("ppl")
    verdict = []
    if base1 and 4 in scales:
        ok = [m for m in methods if "ppl" in results[m].get(4, {}) and results[m][4]["ppl"] <= 1.5 * base1]
        verdict.append(f"at 4×, within 1.5× of the 1× perplexity: {', '.join(ok) if ok else 'none'}")
        for s in (4, 8):
            if s in results["original"]:
                verdict.append(f"original at {s}×: {results['original'][s]['ppl'] / base1:.2f}× its 1× perplexity")
    for s in scales:
        if s == 1:
            continue
        ranked = sorted((results[m][s]["ppl"], m) for m in methods if "ppl" in results[m].get(s, {}))
        if ranked:
            verdict.append(f"best at {s}×: {ranked[0][1]} ({ranked[0][0]:.3f})")
    if failures:
        verdict.append("rewrites that failed: " + "; ".join(failures))
    print()
    print("\n".join(verdict))

    out = Path(args.out)
    title = (
        f"byte-level Llama ({meta.get('parameters', '?')} params) trained at {L} bytes on stdlib source;\n"
        f"held-out stdlib files, {args.tokens:,} bytes per length; rewrites by posrewrite, onnxruntime, "
        "no fine-tuning"
    )
    plot(results, L, scales, methods, out, title)
    doc = {
        "command": "python benchmarks/long_context.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "training_length": L,
        "tokens_per_length": args.tokens,
        "model": {k: meta.get(k) for k in ("parameters", "seed", "train_seconds", "python", "heldout_digest")},
        "results": {m: {str(s): r for s, r in v.items()} for m, v in results.items()},
        "table": lines,
        "verdict": verdict,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.json')} in {doc['seconds']} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
