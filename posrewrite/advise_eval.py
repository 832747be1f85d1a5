"""``posrewrite advise MODEL --context N --eval-text FILE``: which long-context method works best on the user's text.

Every candidate — the model as it is, the frequency methods (linear, ntk, dynamic, yarn at factor s = N / L) and
the attention-level methods (SelfExtend, ReRoPE, Leaky ReRoPE, Dual Chunk Attention, ReRoPE + log-n, with the
parameters of
``posrewrite.math.positions.recommended``) — is written by posrewrite's own rewrite into a temporary folder and
run in onnxruntime on the text: non-overlapping windows of N tokens, perplexity = exp(mean next-token NLL over
every predicted token).  The table is ranked by that perplexity; the winner's command line is printed.

Tokens: with a ``tokenizer.json`` beside the model and the ``tokenizers`` package installed, the text is encoded
with it; otherwise a model whose vocabulary has at most 256 entries per byte (a byte-level model) reads the bytes,
and any other model is refused (give it its tokenizer.json).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from posrewrite import errors
from posrewrite.math.positions import ATTENTION_METHODS, cli_flags, recommended

__all__ = ["Candidate", "EvalAdvice", "candidates", "evaluate_candidates", "rule_of_thumb"]

FREQUENCY_METHODS = ("linear", "ntk", "dynamic", "yarn")
MAX_EVAL_TOKENS = 65536  # tokens of the text evaluated at most (whole windows)


@dataclasses.dataclass
class Candidate:
    name: str
    flags: list[str]  # posrewrite flags ([] = the model as it is)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the same as RewriteOptions fields
    perplexity: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "flags": self.flags, "perplexity": self.perplexity, "error": self.error}


@dataclasses.dataclass
class EvalAdvice:
    model: str
    context: int
    original: int
    tokens: int
    windows: int
    tokenizer: str
    ranked: list[Candidate]
    lines: list[str]

    @property
    def winner(self) -> Candidate | None:
        ok = [c for c in self.ranked if c.perplexity is not None]
        return ok[0] if ok else None

    def command(self, c: Candidate) -> str:
        if not c.flags:
            return f"(no rewrite: use {self.model} as it is)"
        return shlex.join(["posrewrite", self.model, *c.flags])

    def to_dict(self) -> dict[str, Any]:
        w = self.winner
        return {
            "model": self.model,
            "context": self.context,
            "original_context": self.original,
            "eval_tokens": self.tokens,
            "windows": self.windows,
            "tokenizer": self.tokenizer,
            "measured": True,
            "ranked": [c.to_dict() | {"command": self.command(c)} for c in self.ranked],
            "winner": None if w is None else {"name": w.name, "perplexity": w.perplexity, "command": self.command(w)},
            "lines": list(self.lines),
        }


def candidates(original: int, context: int) -> list[Candidate]:
    """The model as it is, the frequency methods at s = context / original, and the attention methods."""
    s = context / original
    out = [Candidate("original (no rewrite)", [])]
    if s > 1:
        for m in FREQUENCY_METHODS:
            out.append(Candidate(m, ["--rope-scale", f"{s:g}", "--rope-method", m, "--original-max-positions",
                                     str(original)],
                                 dict(rope_scale=s, rope_method=m, original_max_positions=original)))
    for m in (*ATTENTION_METHODS, "rerope+logn"):
        base = m.partition("+")[0]
        p = recommended(base, original, context)
        if base == "self-extend" and p.get("group_size") == 1:
            continue  # the model's own attention
        opts = dict(extend=base if base in ("self-extend", "dual-chunk") else "rerope", **p)
        flags = cli_flags(base, p)
        if m.endswith("+logn"):
            opts.update(logn_scaling=True, original_max_positions=original)
            flags += ["--logn-scaling", "--original-max-positions", str(original)]
        out.append(Candidate(m, flags, opts))
    return out


def rule_of_thumb(original: int | None, context: int) -> list[str]:
    """What advise says without --eval-text: a rule, stated as one."""
    if original is None:
        return ["method: not measured (no --eval-text) and the training length is unknown: pass "
                "--original-max-positions L (or keep config.json beside MODEL) for a rule of thumb, or --eval-text "
                "FILE to measure every method on your text"]
    s = context / original
    if s <= 1:
        return [f"method: none needed: {context:,} tokens is within the training length {original:,} "
                "(rule of thumb, not measured)"]
    p = recommended("self-extend", original, context)
    flags = " ".join(cli_flags("self-extend", p))
    return [
        f"method (RULE OF THUMB, not measured on your text): SelfExtend, `posrewrite MODEL {flags}`. The rule: "
        "an attention-level method keeps the model exactly as trained for tokens within the window and maps "
        "far tokens to trained relative positions (W = L/4, the smallest group size G keeping every relative "
        f"position below L = {original:,}). Evidence for the rule: on this project's byte model "
        "(benchmarks/long_context.py) SelfExtend stayed within 1.02x of the trained-length perplexity up to 16x, "
        "while ntk, dynamic and yarn reached 1.19-1.30x at 4x and 1.44-1.90x at 8x. One small model is not a law: "
        "measure on your own text with --eval-text FILE"
    ]


def _tokens(model_path: Path, text_path: Path) -> tuple[np.ndarray, str]:
    try:
        data = text_path.read_bytes()
    except OSError as exc:
        raise errors.UsageError(f"--eval-text {text_path}: {exc.strerror or exc}") from None
    tok_file = model_path.parent / "tokenizer.json"
    if tok_file.exists():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise errors.UsageError(f"{tok_file} needs the 'tokenizers' package (pip install tokenizers)") from None
        try:
            ids = Tokenizer.from_file(str(tok_file)).encode(data.decode("utf-8", errors="replace")).ids
        except Exception as exc:  # noqa: BLE001 - a broken tokenizer file is the user's input
            raise errors.UsageError(f"{tok_file}: cannot encode the text: {str(exc).splitlines()[0][:160]}") from None
        return np.asarray(ids, np.int64), f"tokenizer.json beside the model ({len(ids):,} tokens)"
    from posrewrite.validate import token_id_limits

    limits = token_id_limits(model_path)
    vocab = next(iter(limits.values()), None)
    if vocab is None or vocab > 260:
        raise errors.UsageError(
            f"--eval-text needs the model's tokenizer: put its tokenizer.json beside {model_path} (the model's "
            f"vocabulary has {vocab if vocab else 'an unknown number of'} entries, so it does not read bytes)")
    ids = np.frombuffer(data, np.uint8).astype(np.int64)
    if ids.size and int(ids.max()) >= vocab:
        raise errors.UsageError(f"--eval-text has byte {int(ids.max())}, past the model's vocabulary of {vocab}: "
                                f"put the model's tokenizer.json beside {model_path}")
    return ids, f"bytes (byte-level vocabulary of {vocab})"


def _perplexity(path: Path, windows: np.ndarray) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if any("past" in n for n in names):
        raise errors.UsageError("--eval-text measures prefill models: this export has KV-cache inputs")
    outs = [o.name for o in sess.get_outputs()]
    logits_name = "logits" if "logits" in outs else outs[0]
    total, count = 0.0, 0
    for w in windows:
        ids = w[None]
        feeds: dict[str, np.ndarray] = {}
        for inp in sess.get_inputs():
            n = inp.name.lower()
            dtype = np.int32 if "int32" in inp.type else np.int64
            if "position" in n:
                feeds[inp.name] = np.arange(ids.shape[1], dtype=dtype)[None]
            elif "mask" in n:
                feeds[inp.name] = np.ones(ids.shape, dtype)
            else:
                feeds[inp.name] = ids.astype(dtype)
        (logits,) = sess.run([logits_name], feeds)
        x = logits[0, :-1].astype(np.float64)
        mx = x.max(-1, keepdims=True)
        lse = (mx + np.log(np.exp(x - mx).sum(-1, keepdims=True)))[:, 0]
        nll = lse - x[np.arange(x.shape[0]), ids[0, 1:]]
        total += float(nll.sum())
        count += nll.size
    return math.exp(total / count)


def evaluate_candidates(model_path: str | os.PathLike, context: int, text_path: str | os.PathLike,
                        original: int, progress=None) -> EvalAdvice:
    """Rewrites the model with every candidate, measures each on the text at ``context`` tokens, ranks them."""
    from posrewrite import api
    from posrewrite.options import RewriteOptions
    from posrewrite.progress import NullReporter

    progress = progress or NullReporter()
    model_path, text_path = Path(model_path), Path(text_path)
    tokens, how = _tokens(model_path, text_path)
    n = min(tokens.size // context, max(1, MAX_EVAL_TOKENS // context))
    if n < 1:
        raise errors.UsageError(f"--eval-text has {tokens.size:,} tokens, fewer than one window of --context "
                                f"{context:,}: give a longer text")
    windows = tokens[: n * context].reshape(n, context)
    cands = candidates(original, context)
    with tempfile.TemporaryDirectory(prefix="posrewrite-advise-") as tmp, \
            progress.stage("measuring candidates", total=len(cands)) as stage:
        for i, c in enumerate(cands):
            path = model_path
            try:
                if c.flags:
                    out = Path(tmp) / f"candidate{i}.onnx"
                    api.rewrite(model_path, RewriteOptions(**c.options, output=out, validate=False))
                    path = out
                c.perplexity = _perplexity(path, windows)
            except errors.PosrewriteError as exc:
                c.error = str(exc)
            stage.advance()
    ranked = sorted(cands, key=lambda c: (c.perplexity is None, c.perplexity or 0.0))
    adv = EvalAdvice(os.fspath(model_path), context, original, int(n * context), n, how, ranked, [])
    adv.lines = _lines(adv)
    return adv


def _lines(adv: EvalAdvice) -> list[str]:
    lines = [f"measured on {adv.windows} window(s) of {adv.context:,} tokens ({adv.tokens:,} tokens; {adv.tokenizer}),"
             f" trained length {adv.original:,}; perplexity in onnxruntime, lower is better:"]
    base = next((c.perplexity for c in adv.ranked if not c.flags), None)
    for rank, c in enumerate(adv.ranked, 1):
        if c.perplexity is None:
            lines.append(f"  -  {c.name:<22} failed: {c.error}")
            continue
        rel = f"  ({c.perplexity / base:.2f}x the model as it is)" if base else ""
        lines.append(f"  {rank}. {c.name:<22} {c.perplexity:10.3f}{rel}   {' '.join(c.flags) or '(no rewrite)'}")
    w = adv.winner
    if w is not None:
        lines.append(f"winner: {w.name}: {adv.command(w)}")
    return lines
