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

``--decode-tokens N`` adds the decode rows of the run-time methods (dynamic, longrope) at ``--decode-scales``
(2 and 4): the model exported with a KV cache (``fixtures/train_lm.py``'s ``export_onnx_with_cache``) is
rewritten with ``--runtime-decode hf`` and with ``--runtime-decode exact``, and the first N held-out bytes, cut
into windows of s x 128, are decoded one byte per step by ``posrewrite.decode.CachedDecoder`` (which honours the
exact model's decode contract: longrope re-prefilled once at 129 tokens, dynamic at every step past 128), next to
the perplexity of the same windows computed whole (one run from an empty past: the frequencies of the window's
length at every position, what the table above measures) and of each position computed from its own prefix at
once (what the whole sequence at once means at the step that produces it: the reference of exact decode).
LongRoPE needs per-dimension factors the byte model was never searched for: short_factor 1 (the trained
frequencies up to L) and, as long factors, YaRN's per-dimension ratios for the scale (beta 32 / 1;
``longrope_factors``).
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


def _cached_rewrite(src: Path, out: Path, flags: list[str]) -> tuple[Path | None, str]:
    """``posrewrite SRC FLAGS -o OUT`` unless OUT is newer than SRC and was written with the same flags (a
    ``.flags`` stamp beside it): (the output or None, the error line)."""
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


def rewrite(src: Path, method: str, scale: int, L: int, cache: Path) -> tuple[Path | None, str]:
    return _cached_rewrite(src, cache / f"byte_llama.{method}.x{scale}.onnx", method_flags(method, scale, L))


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


DECODE_METHODS = ("dynamic", "longrope")
DECODE_MODES = ("hf", "exact")


def longrope_factors(scale: int, L: int) -> dict:
    """LongRoPE rope_parameters for the byte model: short_factor 1 and YaRN's per-dimension ratios as
    long_factor (1 for dimensions turning more than 32 times in L, ``scale`` for those turning less than once, a
    linear ramp of the interpolation weight between): LongRoPE's searched factors do not exist for this model."""
    from posrewrite.math.rope import yarn_correction_range

    dim = train_lm.MODEL_CONFIG["hidden_size"] // train_lm.MODEL_CONFIG["num_attention_heads"]
    low, high = yarn_correction_range(32.0, 1.0, dim, train_lm.ROPE_THETA, L)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)  # 1: interpolated fully
    long = 1.0 / (ramp / scale + (1.0 - ramp))
    return {"short_factor": [1.0] * (dim // 2), "long_factor": [float(v) for v in long]}


def decode_flags(method: str, scale: int, L: int, mode: str) -> list[str]:
    flags = ["--rope-scale", str(scale), "--rope-method", method, "--original-max-positions", str(L),
             "--runtime-decode", mode]
    if method == "longrope":
        flags += ["--rope-params", json.dumps(longrope_factors(scale, L))]
    return flags


def decode_rewrite(src: Path, method: str, scale: int, L: int, mode: str, cache: Path) -> tuple[Path | None, str]:
    return _cached_rewrite(src, cache / f"byte_llama_kv.{method}.x{scale}.{mode}.onnx",
                           decode_flags(method, scale, L, mode))


def _run_from_empty(sess, ids: np.ndarray) -> np.ndarray:
    """Logits of ``ids`` (a whole prefix) from an empty past: the KV-cache export fed as a prefill, written here
    without posrewrite.decode (the reference its loop is compared with)."""
    feeds = {"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int64),
             "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32)
    return sess.run(["logits"], feeds)[0]


def prefix_logits(path: Path, w: np.ndarray, train_length: int, threads: int) -> np.ndarray:
    """Logits of every position p of the windows ``w`` computed from the prefix 0..p alone at once (what the
    whole sequence at once means at the step that produces p): one run of the first ``train_length`` bytes (their
    frequencies are all those of lengths <= L), then one run per longer prefix."""
    sess = _session(path, threads)
    out = [_run_from_empty(sess, w[:, :train_length])]
    out += [_run_from_empty(sess, w[:, :p + 1])[:, -1:] for p in range(train_length, w.shape[1])]
    return np.concatenate(out, axis=1)


def decode_perplexity(path: Path, w: np.ndarray, prefix: np.ndarray, threads: int, train_length: int) -> dict:
    """The windows ``w`` (one batch) decoded one byte per step by posrewrite.decode's loop (the first byte as the
    prompt), next to the same windows computed whole (one run from an empty past) and to ``prefix`` (each
    position from its own prefix at once, `prefix_logits`): perplexity over every predicted byte and over those at
    positions >= train_length; the largest logit difference of the decode from ``prefix``; the loop's full runs
    (prefills) and cached steps, and the seconds the decode took."""
    from posrewrite.decode import CachedDecoder

    sess = _session(path, threads)

    def ppl(logits: np.ndarray) -> tuple[float, float]:
        nll = _log_softmax_nll(logits[:, :-1], w[:, 1:])
        return math.exp(float(nll.mean())), math.exp(float(nll[:, train_length - 1:].mean()))

    whole = _run_from_empty(sess, w)
    dec = CachedDecoder(sess)
    t0 = time.perf_counter()
    steps = [dec.step(w[:, :1])] + [dec.step(w[:, p:p + 1]) for p in range(1, w.shape[1])]
    seconds = time.perf_counter() - t0
    decoded = np.concatenate(steps, axis=1)
    (ppl_w, tail_w), (ppl_p, tail_p), (ppl_d, tail_d) = ppl(whole), ppl(prefix), ppl(decoded)
    return {"whole_ppl": ppl_w, "whole_ppl_past_train_length": tail_w,
            "prefix_ppl": ppl_p, "prefix_ppl_past_train_length": tail_p,
            "decode_ppl": ppl_d, "decode_ppl_past_train_length": tail_d, "windows": len(w),
            "max_rel_logit_diff_decode_vs_prefix": float(np.abs(decoded - prefix).max() / np.abs(prefix).max()),
            "full_runs": dec.full_runs, "cached_steps": dec.cached_steps, "decode_seconds": round(seconds, 2)}


def decode_table(decode: dict, L: int, scales: tuple[int, ...], budget: int) -> list[str]:
    """Rows: whole-sequence perplexity, then decode in each mode, per run-time method; columns per scale."""
    lines = [f"decode across L (one byte per step with a KV cache, first {budget:,} held-out bytes in windows of "
             "s × 128; perplexity of every predicted byte, and of those at positions ≥ 128 in brackets; decode rows: "
             "the largest logit difference from each prefix at once, relative to the largest logit):",
             "| run-time method | " + " | ".join(f"{s}× ({s * L})" for s in scales) + " |",
             "|---|" + "---:|" * len(scales)]
    for m in DECODE_METHODS:
        label = m + (" (short 1, long: YaRN ratios)" if m == "longrope" else "")
        first = {s: decode.get(m, {}).get("exact", {}).get(s) or decode.get(m, {}).get("hf", {}).get(s)
                 for s in scales}

        def cell(r: dict | None, key: str) -> str:
            if r is None:
                return "—"
            if "error" in r:
                return "failed"
            return f"{fmt_ppl(r[key])} ({fmt_ppl(r[key + '_past_train_length'])})"

        lines.append(f"| {label}, whole window at once | " + " | ".join(cell(first[s], "whole_ppl")
                                                                    for s in scales) + " |")
        lines.append(f"| {label}, each prefix at once | " + " | ".join(cell(first[s], "prefix_ppl")
                                                                   for s in scales) + " |")
        for mode in DECODE_MODES:
            cells = []
            for s in scales:
                r = decode.get(m, {}).get(mode, {}).get(s)
                diff = "" if r is None or "error" in r else \
                    f"; {r['max_rel_logit_diff_decode_vs_prefix']:.1e} from it"
                cells.append(cell(r, "decode_ppl") + diff)
            lines.append(f"| {label}, decode `--runtime-decode {mode}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("cost of the decode (the same loop; full runs = the first step and every re-prefill):")
    lines.append("| run-time method | mode | " + " | ".join(f"{s}×: full runs / steps, seconds" for s in scales)
                 + " |")
    lines.append("|---|---|" + "---:|" * len(scales))
    for m in DECODE_METHODS:
        for mode in DECODE_MODES:
            cells = []
            for s in scales:
                r = decode.get(m, {}).get(mode, {}).get(s)
                cells.append("—" if r is None or "error" in r else
                             f"{r['full_runs']} / {r['full_runs'] + r['cached_steps']}, {r['decode_seconds']:.1f} s")
            lines.append(f"| {m} | {mode} | " + " | ".join(cells) + " |")
    return lines


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
    ap.add_argument("--decode-tokens", type=int, default=0, metavar="N",
                    help="also decode the first N held-out bytes one per step with a KV cache (dynamic, longrope; "
                    "--runtime-decode hf and exact); 0: skip")
    ap.add_argument("--decode-scales", type=int, nargs="+", default=[2, 4])
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

    decode: dict = {}
    decode_scales = tuple(sorted(set(args.decode_scales)))
    if args.decode_tokens:
        src_kv = train_lm.ensure_onnx_with_cache(cache)
        for m in DECODE_METHODS:
            for s in decode_scales:
                w = windows(tokens, s * L, args.decode_tokens)
                prefix = None
                for mode in DECODE_MODES:
                    path, err = decode_rewrite(src_kv, m, s, L, mode, cache)
                    if path is None:
                        r = {"error": err}
                        failures.append(f"{m} x{s} decode {mode}: {err}")
                    else:
                        if prefix is None:  # the same graph in both modes: one reference
                            prefix = prefix_logits(path, w, L, args.threads)
                        r = decode_perplexity(path, w, prefix, args.threads, L)
                    decode.setdefault(m, {}).setdefault(mode, {})[s] = r
                    print(f"  {m} @ {s}x decode {mode}: {r}", flush=True)

    lines = table(results, L, scales, methods)
    if decode:
        lines += ["", *decode_table(decode, L, decode_scales, args.decode_tokens)]
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
        "decode_tokens": args.decode_tokens,
        "decode": {m: {mode: {str(s): r for s, r in v.items()} for mode, v in d.items()} for m, d in decode.items()},
        "table": lines,
        "verdict": verdict,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.json')} in {doc['seconds']} s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
