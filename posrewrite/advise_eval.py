"""``posrewrite advise MODEL --context N --eval-text FILE``: which long-context method works best on the user's text.

Every candidate — the model as it is, the frequency methods (linear, ntk, dynamic, yarn at factor s = N / L) and
the attention-level methods (SelfExtend, ReRoPE, Leaky ReRoPE, ReRoPE + log-n, with the parameters of
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

__all__ = ["Candidate", "EvalAdvice", "Ranking", "candidates", "evaluate_candidates", "rank", "rule_of_thumb"]

FREQUENCY_METHODS = ("linear", "ntk", "dynamic", "yarn")
MAX_EVAL_TOKENS = 65536  # tokens of the text evaluated at most (whole windows), unless MIN_WINDOWS need more
MIN_WINDOWS = 8  # fewer windows than this give no usable bootstrap: no winner is declared
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
MIN_RELATIVE_GAP = 1e-3  # perplexities closer than 0.1 % are a tie, however consistent the difference


@dataclasses.dataclass(eq=False)  # compared by identity (it holds arrays)
class Candidate:
    name: str
    flags: list[str]  # posrewrite flags ([] = the model as it is)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the same as RewriteOptions fields
    perplexity: float | None = None
    error: str | None = None
    window_nll: np.ndarray | None = dataclasses.field(default=None, repr=False)  # summed NLL per window
    window_tokens: np.ndarray | None = dataclasses.field(default=None, repr=False)  # predicted tokens per window
    interval: tuple[float, float] | None = None  # bootstrap interval of the perplexity
    beats_leader: float | None = None  # fraction of paired resamples in which the leader is not better

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "flags": self.flags, "perplexity": self.perplexity,
                "interval": None if self.interval is None else list(self.interval),
                "error": self.error}


@dataclasses.dataclass
class Ranking:
    """Candidates ranked by perplexity with a paired bootstrap over windows: ``leader`` is the lowest perplexity;
    ``tied`` the candidates not distinguishable from it (the leader better in fewer than ``CONFIDENCE`` of the
    resamples, or perplexities within ``MIN_RELATIVE_GAP``); ``winner`` the leader when nothing is tied with it
    and there were at least ``MIN_WINDOWS`` windows, else None; ``reason`` says why there is none."""

    ranked: list[Candidate]
    leader: Candidate | None
    tied: list[Candidate]
    winner: Candidate | None
    reason: str | None


def rank(cands: list[Candidate], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Ranking:
    """Rank candidates measured on the same windows (``window_nll``/``window_tokens`` set) with a paired bootstrap:
    windows are resampled with replacement, the same indices for every candidate, and each candidate's perplexity
    recomputed per resample."""
    ok = [c for c in cands if c.perplexity is not None and c.window_nll is not None]
    ranked = sorted(ok, key=lambda c: c.perplexity) + [c for c in cands if c not in ok]
    if not ok:
        return Ranking(ranked, None, [], None, "no candidate could be measured")
    n = ok[0].window_nll.size
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    counts = ok[0].window_tokens[idx].sum(1)
    log_ppl = {c.name: c.window_nll[idx].sum(1) / counts for c in ok}  # [resamples] per candidate
    lo, hi = (1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2
    for c in ok:
        q = np.exp(np.quantile(log_ppl[c.name], [lo, hi]))
        c.interval = (float(q[0]), float(q[1]))
    leader = ranked[0]
    tied = []
    for c in ranked[1:len(ok)]:
        c.beats_leader = float(np.mean(log_ppl[c.name] <= log_ppl[leader.name]))
        close = c.perplexity <= leader.perplexity * (1 + MIN_RELATIVE_GAP)
        if c.beats_leader > 1 - CONFIDENCE or close:
            tied.append(c)
    if n < MIN_WINDOWS:
        reason = (f"only {n} window(s) of text: at least {MIN_WINDOWS} are needed to tell candidates apart "
                  "(give a longer --eval-text)")
        return Ranking(ranked, leader, tied, None, reason)
    if tied:
        reason = (f"{', '.join([leader.name, *(c.name for c in tied)])} are not distinguishable on this text "
                  f"(paired bootstrap over {n} windows: the leader is not better in {CONFIDENCE:.0%} of resamples, "
                  f"or within {MIN_RELATIVE_GAP:.1%})")
        return Ranking(ranked, leader, tied, None, reason)
    return Ranking(ranked, leader, [], leader, None)


@dataclasses.dataclass
class EvalAdvice:
    model: str
    context: int
    original: int
    tokens: int
    windows: int
    tokenizer: str
    ranking: Ranking
    lines: list[str]

    @property
    def ranked(self) -> list[Candidate]:
        return self.ranking.ranked

    @property
    def winner(self) -> Candidate | None:
        """The leader when it is distinguishable from every other candidate, else None (see `rank`)."""
        return self.ranking.winner

    def command(self, c: Candidate) -> str:
        if not c.flags:
            return f"(no rewrite: use {self.model} as it is)"
        return shlex.join(["posrewrite", self.model, *c.flags])

    def to_dict(self) -> dict[str, Any]:
        w, lead = self.winner, self.ranking.leader
        return {
            "model": self.model,
            "context": self.context,
            "original_context": self.original,
            "eval_tokens": self.tokens,
            "windows": self.windows,
            "tokenizer": self.tokenizer,
            "measured": True,
            "ranked": [c.to_dict() | {"command": self.command(c)} for c in self.ranked],
            "leader": None if lead is None else {"name": lead.name, "perplexity": lead.perplexity,
                                                 "interval": list(lead.interval or ()), "command": self.command(lead)},
            "tied_with_leader": [c.name for c in self.ranking.tied],
            "winner": None if w is None else {"name": w.name, "perplexity": w.perplexity, "command": self.command(w)},
            "no_winner_because": self.ranking.reason,
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "confidence": CONFIDENCE, "unit": "window",
                          "min_windows": MIN_WINDOWS, "min_relative_gap": MIN_RELATIVE_GAP},
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
        opts = dict(extend="self-extend" if base == "self-extend" else "rerope", **p)
        flags = cli_flags(base, p)
        if m.endswith("+logn"):
            opts.update(logn_scaling=True, original_max_positions=original)
            flags += ["--logn-scaling", "--original-max-positions", str(original)]
        out.append(Candidate(m, flags, opts))
    return out


def rule_of_thumb(original: int | None, context: int, model: str | os.PathLike | None = None) -> list[str]:
    """What advise says without --eval-text: a rule, stated as one; its command names ``model`` when given."""
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
    target = shlex.quote(str(model)) if model is not None else "MODEL"
    return [
        f"method (RULE OF THUMB, not measured on your text): SelfExtend, `posrewrite {target} {flags}`. The rule: "
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


def _perplexity(path: Path, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Summed next-token NLL and the number of predicted tokens, per window."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if any("past" in n for n in names):
        raise errors.UsageError("--eval-text measures prefill models: this export has KV-cache inputs")
    outs = [o.name for o in sess.get_outputs()]
    logits_name = "logits" if "logits" in outs else outs[0]
    total, count = np.zeros(len(windows)), np.zeros(len(windows))
    for k, w in enumerate(windows):
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
        total[k], count[k] = float(nll.sum()), nll.size
    return total, count


def evaluate_candidates(model_path: str | os.PathLike, context: int, text_path: str | os.PathLike,
                        original: int, progress=None) -> EvalAdvice:
    """Rewrites the model with every candidate, measures each on the text at ``context`` tokens, ranks them."""
    from posrewrite import api
    from posrewrite.options import RewriteOptions
    from posrewrite.progress import NullReporter

    progress = progress or NullReporter()
    model_path, text_path = Path(model_path), Path(text_path)
    tokens, how = _tokens(model_path, text_path)
    n = min(tokens.size // context, max(MIN_WINDOWS, MAX_EVAL_TOKENS // context))
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
                c.window_nll, c.window_tokens = _perplexity(path, windows)
                c.perplexity = math.exp(c.window_nll.sum() / c.window_tokens.sum())
            except errors.PosrewriteError as exc:
                c.error = str(exc)
            stage.advance()
    adv = EvalAdvice(os.fspath(model_path), context, original, int(n * context), n, how, rank(cands), [])
    adv.lines = _lines(adv)
    return adv


def _lines(adv: EvalAdvice) -> list[str]:
    lines = [f"measured on {adv.windows} window(s) of {adv.context:,} tokens ({adv.tokens:,} tokens; {adv.tokenizer}),"
             f" trained length {adv.original:,}; perplexity in onnxruntime, lower is better:"]
    base = next((c.perplexity for c in adv.ranked if not c.flags), None)
    for position, c in enumerate(adv.ranked, 1):
        if c.perplexity is None:
            lines.append(f"  -  {c.name:<22} failed: {c.error}")
            continue
        rel = f"  ({c.perplexity / base:.2f}x the model as it is)" if base else ""
        ci = f" [{c.interval[0]:.4g}, {c.interval[1]:.4g}]" if c.interval else ""
        tie = "  (not distinguishable from 1.)" if c in adv.ranking.tied else ""
        lines.append(f"  {position}. {c.name:<22} {c.perplexity:10.4g}{ci}{rel}{tie}   "
                     f"{' '.join(c.flags) or '(no rewrite)'}")
    lines.append(f"  [a, b]: {CONFIDENCE:.0%} interval of a bootstrap over the {adv.windows} window(s)")
    w = adv.winner
    if w is not None:
        lines.append(f"winner: {w.name}: {adv.command(w)}")
    elif adv.ranking.leader is not None:
        lines.append(f"no winner: {adv.ranking.reason}. Lowest perplexity: {adv.ranking.leader.name}: "
                     f"{adv.command(adv.ranking.leader)}")
    return lines
