"""The bounded check (the default): the model-level comparisons on a cut of both models (posrewrite.cut), the first
attention after each RoPE site's first-layer rotations, with a memory estimate before every session."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from posrewrite.validation.report import ModelCheck
from posrewrite.validation.runs import MemoryRefusal, compare_outputs, graph_of, token_ids

__all__ = ["CUT_WEIGHT_CAP", "SHORT_CALL_LENGTH", "BoundedRuns", "seed_groups"]

#: Largest weights (as onnxruntime holds them) a cut may take: past it a shallower cut is taken (the first
#: attention's own result rather than the whole first layer).
CUT_WEIGHT_CAP = 2 << 30


def _check_fits(sub: ir.Model, length: int, what: str, way_out: str) -> None:
    from posrewrite import cut, memory

    est = cut.estimate(sub, length)
    avail, source = memory.available_bytes()
    if avail is not None and est["total"] > avail:
        raise MemoryRefusal(
            f"{what} at {length} tokens would need about {memory.describe_bytes(est['total'])} (weights as "
            f"onnxruntime holds them {memory.describe_bytes(est['weights'])}, activations "
            f"{memory.describe_bytes(est['activations'])}), {memory.describe_bytes(avail)} available ({source}); "
            f"{way_out}")


def seed_groups(model: ir.Model, sites) -> list[list[str]]:
    """Per RoPE site, the names of its first-layer rotation outputs (the applications whose input depends on no
    other rotation of any site), or of its fused nodes' outputs; then [] (the model's first attention)."""
    from posrewrite.cut import _descendants

    by_name = {o.name: o for n in model.graph for o in n.outputs if o.name}
    groups = []
    all_out = [by_name[a.output.name] for site in sites for a in site.applications if a.output.name in by_name]
    all_out += [by_name[n.outputs[0].name] for site in sites for n in site.fused_nodes
                if n.outputs and n.outputs[0].name in by_name]
    after = _descendants(model.graph, {id(v) for v in all_out}) - {id(v) for v in all_out}
    for site in sites:
        names = [a.output.name for a in site.applications
                 if a.input.name in by_name and id(by_name[a.input.name]) not in after]
        names += [n.outputs[0].name for n in site.fused_nodes if n.outputs and n.inputs and n.inputs[0] is not None
                  and n.inputs[0].name in by_name and id(by_name[n.inputs[0].name]) not in after]
        if names:
            groups.append(names)
    return [*groups, []]


class BoundedRuns:
    """The model-level checks run on a cut (posrewrite.cut) of the original and of the rewritten model: the
    first attention after each RoPE site's first-layer rotations, up to the inputs of the next attention.
    Positions far past the old length are reached by a short call after a random first-layer past (KV-cache
    exports) or by position_ids. External weights stay in their files (onnxruntime maps them)."""

    WAY_OUT = "rerun with --no-validate to write the model unvalidated, or free memory"

    def __init__(self, original, rewritten, sites, vocab: dict[str, int] | None) -> None:
        from posrewrite import cut as cut_mod

        self.original, self.rewritten, self.vocab = original, rewritten, vocab
        self.orig_model = graph_of(original)
        self.new_model = graph_of(rewritten)
        self.cut = cut_mod.find_cut(self.orig_model, self.new_model, seed_groups(self.orig_model, sites))
        self.orig_sub = self.new_sub = None
        if self.cut is None:
            return
        names = list(self.cut.outputs)
        while names:
            try:
                orig_sub = cut_mod.sub_model(self.orig_model, names)
                new_sub = cut_mod.sub_model(self.new_model, names)
            except Exception:  # noqa: BLE001 - a name the rewritten graph holds but cannot bound: a shallower cut
                orig_sub = new_sub = None
            if orig_sub is not None and max(cut_mod.estimate(m, SHORT_CALL_LENGTH)["weights"]
                                            for m in (orig_sub, new_sub)) <= CUT_WEIGHT_CAP:
                self.orig_sub, self.new_sub, self.cut.outputs = orig_sub, new_sub, names
                break
            names = names[:-1]

    @property
    def usable(self) -> bool:
        return self.new_sub is not None

    def describe(self) -> str:
        if not self.usable:
            return ""
        names = ", ".join(self.cut.outputs[:3]) + (", ..." if len(self.cut.outputs) > 3 else "")
        return f"cut at {names} ({self.cut.reason})"

    def _feeds(self, length: int, seed: int = 0):
        from posrewrite import cut

        inputs = {v.name: v for m in (self.orig_sub, self.new_sub) for v in m.graph.inputs}
        return cut.cut_feeds(list(inputs.values()), length, self.vocab, token_ids, seed)

    def _run(self, sub: ir.Model, feeds: dict[str, np.ndarray], length: int, what: str, quiet: bool = False):
        from posrewrite import cut

        _check_fits(sub, length, f"the bounded check of {what}", self.WAY_OUT)
        session = cut.extracted_session(sub, quiet=quiet)
        names = {i.name for i in session.get_inputs()}
        return session.run(None, {k: v for k, v in feeds.items() if k in names})

    def compare(self, length: int) -> ModelCheck:
        row = ModelCheck(site="model", length=length, ok=True,
                         compared=f"original vs rewritten cut outputs at {length} tokens")
        fed = self._feeds(length)
        if isinstance(fed, str):
            return dataclasses.replace(row, message=f"comparison skipped: {fed}")
        feeds, how = fed
        try:
            ref = self._run(self.orig_sub, feeds, length, "the original model", quiet=True)
        except MemoryRefusal:
            raise
        except Exception as exc:  # noqa: BLE001
            return dataclasses.replace(row, message="comparison skipped: the original: "
                                                    f"{str(exc).splitlines()[0][:200]}")
        try:
            new = self._run(self.new_sub, feeds, length, "the rewritten model")
        except MemoryRefusal:
            raise
        except Exception as exc:  # noqa: BLE001
            return dataclasses.replace(row, ok=False, message=f"the rewritten model's cut fails ({how}): "
                                                              f"{str(exc).splitlines()[0][:200]}")
        where = f"at {length} positions ({how}), {self.describe()}"
        return compare_outputs(row, ref, new, length, where)

    def run_far(self, length: int) -> tuple[bool, str]:
        fed = self._feeds(length, seed=1)
        if isinstance(fed, str):
            return True, f"far-position run skipped: {fed}"
        feeds, how = fed
        try:
            outputs = self._run(self.new_sub, feeds, length, "the rewritten model")
        except MemoryRefusal:
            raise
        except Exception as exc:  # noqa: BLE001
            return False, f"the rewritten model's cut fails at {length} positions ({how}): " \
                          f"{str(exc).splitlines()[0][:200]}"
        for o in outputs:  # -inf is a masked score inside a cut; NaN is never right
            if np.issubdtype(np.asarray(o).dtype, np.floating) and (np.any(np.isnan(o)) or np.any(np.isposinf(o))):
                return False, f"the rewritten model's cut gives NaN or +inf at {length} positions ({how})"
        return True, f"the rewritten model's cut ran at {length} positions ({how}), {self.describe()}"

    def probe_past_cache(self, rows: int) -> ModelCheck:
        length = rows + 1
        row = ModelCheck(site="past cache", length=length, ok=True,
                         compared=f"the fused model's cut at {length} positions, one past its {rows}-row caches: "
                                  "must be rejected")
        fed = self._feeds(length, seed=2)
        if isinstance(fed, str):
            return dataclasses.replace(row, message=f"probe skipped: {fed}")
        try:
            self._run(self.new_sub, fed[0], length, "the rewritten model", quiet=True)
        except MemoryRefusal:
            raise
        except Exception as exc:  # noqa: BLE001
            text = str(exc).splitlines()[0].split("Status Message:", 1)[-1].strip()
            return dataclasses.replace(row, message=f"position {rows} is rejected by onnxruntime: {text[:160]}")
        return dataclasses.replace(row, ok=False, message=f"position {rows} is past the {rows}-row caches but the "
                                                          "model ran without error")


SHORT_CALL_LENGTH = 16
