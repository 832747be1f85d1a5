"""Where the model-level checks run: `model_runs` gives the bounded runner (a cut of both models, the default) or
`FullRuns` (the whole models, `--validate full`, falling back to the cut when their memory estimate does not fit)."""

from __future__ import annotations

from posrewrite import errors
from posrewrite.validation.bounded import BoundedRuns
from posrewrite.validation.report import ModelCheck, ValidationReport
from posrewrite.validation.runs import MemoryRefusal, compare_models, graph_of, probe_past_cache, run_full_model

__all__ = ["FullRuns", "model_runs"]


class FullRuns:
    """The model-level checks on the whole original and rewritten models (`--validate full`); a run whose
    memory estimate does not fit falls back to the bounded check of the same thing, and says so."""

    def __init__(self, original, rewritten, report: ValidationReport, fallback) -> None:

        self.original, self.rewritten, self.report, self.fallback = original, rewritten, report, fallback
        self.models = {str(original): graph_of(original), str(rewritten): graph_of(rewritten)}

    def _fits(self, path, length: int) -> str | None:
        from posrewrite import memory

        est = memory.session_estimate(self.models[str(path)], length - length // 2, length)
        avail, source = memory.available_bytes()
        if avail is None or est["total"] <= avail:
            return None
        return (f"the whole model at {length} tokens would need about {memory.describe_bytes(est['total'])}, "
                f"{memory.describe_bytes(avail)} available ({source}): checked on the bounded cut instead")

    def _bounded(self, why: str):
        if why not in self.report.notes:
            self.report.notes.append(why)
        runs = self.fallback()
        if runs is None:
            raise MemoryRefusal(why.replace(": checked on the bounded cut instead", "") + "; no cut of the model "
                                "was found for the bounded check: rerun with --no-validate")
        return runs

    def compare(self, length: int) -> ModelCheck:
        why = self._fits(self.original, length) or self._fits(self.rewritten, length)
        return self._bounded(why).compare(length) if why else compare_models(self.original, self.rewritten, length)

    def run_far(self, length: int) -> tuple[bool, str]:
        why = self._fits(self.rewritten, length)
        return self._bounded(why).run_far(length) if why else run_full_model(self.rewritten, length,
                                                                               original=self.original)

    def probe_past_cache(self, rows: int) -> ModelCheck:
        why = self._fits(self.rewritten, rows + 1)
        return self._bounded(why).probe_past_cache(rows) if why else probe_past_cache(self.rewritten, rows)


def model_runs(original, rewritten, options, sites, vocab, report: ValidationReport):
    """The runner of the model-level checks (compare, run_far, probe_past_cache) for `options.validate_scope`:
    BoundedRuns (the default) or FullRuns. In the bounded scope, a model whose original onnxruntime cannot
    load is refused (ModelLoadError, exit 3)."""
    made: list = []

    def bounded():
        if not made:
            runs = BoundedRuns(original, rewritten, sites, vocab)
            made.append(runs if runs.usable else None)
        return made[0]

    from posrewrite.cut import onnxruntime_load_error

    reason = onnxruntime_load_error(graph_of(original))  # the whole graph, no weight held
    if reason is not None:
        raise errors.ModelLoadError(f"{original}: onnxruntime cannot load the model: {reason}")

    if getattr(options, "validate_scope", "bounded") == "full":
        return FullRuns(original, rewritten, report, bounded)
    report.scope = "bounded"
    runs = bounded()
    if runs is None:
        report.notes.append("no cut of the model was found (no attention whose result both models hold): the "
                            "whole models are run instead, within the memory estimate")
        return FullRuns(original, rewritten, report, lambda: None)
    report.notes.append(f"model-level checks on a cut of both models ({runs.describe()}); --validate full runs "
                        "the whole models")
    return runs
