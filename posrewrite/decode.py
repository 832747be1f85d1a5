"""Step-by-step decoding of a KV-cache ONNX export in onnxruntime, honouring the decode contract a posrewrite
rewrite records (``--runtime-decode``; `posrewrite.provenance.decode_contract`).

A KV-cache export takes ``input_ids`` (and, where the graph has them, ``attention_mask`` and ``position_ids``) and
``past_key_values.*`` and returns ``logits`` and ``present.*`` (Optimum's and onnxruntime-genai's names). The
loop feeds each step's presents back as the next step's past. Run-time RoPE methods (dynamic NTK, LongRoPE)
choose their frequencies from the total length T, so past the trained length L a cached step differs from the
whole sequence at once; a model rewritten with ``--runtime-decode exact`` records when the loop must instead run
the whole sequence so far from an empty past (a re-prefill):

- ``first_past_L`` (longrope): at the first step whose total length exceeds L (the frequencies switch once);
- ``every_past_L`` (dynamic): at every step whose total length exceeds L (they change with every length: each
  such step costs a prefill of T tokens, O(T²) attention per step instead of O(T)).

A model without that record (``hf`` / ``rerotate`` modes, models not rewritten by posrewrite) decodes with the
cache at every step. A model without past inputs runs the whole sequence at every step (what it computes).

    import onnxruntime as ort
    from posrewrite.decode import CachedDecoder, greedy_generate

    session = ort.InferenceSession("model.dynamic.onnx")
    tokens = greedy_generate(session, prompt_ids, max_new_tokens=64)   # [batch, prompt + 64]

Sequences of a batch have the same length (no padding). numpy and onnxruntime's session interface only; no
torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from posrewrite.provenance import read_decode_contract

__all__ = ["CachedDecoder", "greedy_generate"]

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _present_name(past: str, outputs: set[str]) -> str | None:
    for name in (past.replace("past_key_values", "present"), past.replace("past", "present")):
        if name != past and name in outputs:
            return name
    return None


class CachedDecoder:
    """One batch of sequences decoded step by step over ``session`` (an ``onnxruntime.InferenceSession``, or
    anything with its ``get_inputs`` / ``get_outputs`` / ``get_modelmeta`` / ``run``).

    `step` takes the next tokens ``[batch, n]`` and returns their logits ``[batch, n, vocab]``; the first step is
    the prompt. ``honour_contract=False`` ignores the model's decode contract (every step reuses the cache: HF's
    cached behaviour on a model written with ``--runtime-decode exact``). ``kv_heads`` / ``head_dim`` size the
    empty first past when the graph declares those axes symbolic (a packed ``--extend`` cache: the model's own
    head count). `full_runs` counts the steps run from an empty past (the first one and every re-prefill),
    `cached_steps` those that reused the cache."""

    def __init__(self, session: Any, *, honour_contract: bool = True, kv_heads: int | None = None,
                 head_dim: int | None = None) -> None:
        self.session = session
        meta = session.get_modelmeta()
        custom: Mapping[str, str] = getattr(meta, "custom_metadata_map", None) or {}
        #: the decode contract read from the model (None: decode with the cache at every step)
        self.contract = read_decode_contract(custom) if honour_contract else None
        outputs = [o.name for o in session.get_outputs()]
        output_set = set(outputs)
        self._inputs = {i.name: i for i in session.get_inputs()}
        if "input_ids" not in self._inputs:
            raise ValueError(f"the model has no input_ids input (inputs: {', '.join(self._inputs)})")
        self._past: dict[str, str] = {}  # past input -> present output
        for name in self._inputs:
            if name in ("input_ids", "attention_mask", "position_ids"):
                continue
            if "past" not in name.lower():
                raise ValueError(f"the model's input {name!r} is not one this loop feeds (input_ids, attention_mask, "
                                 "position_ids, past_key_values.*)")
            present = _present_name(name, output_set)
            if present is None:
                raise ValueError(f"no present output for the past input {name!r} (expected "
                                 f"{name.replace('past_key_values', 'present')!r})")
            self._past[name] = present
        self._logits = "logits" if "logits" in output_set else next(
            (o for o in outputs if o not in self._past.values()), None)
        if self._logits is None:
            raise ValueError("the model has no logits output")
        self._empty_shapes = {name: self._empty_shape(name, kv_heads, head_dim) for name in self._past}
        self._ids_dtype = _NUMPY_TYPES.get(self._inputs["input_ids"].type, np.int64)
        self.reset()

    def _empty_shape(self, name: str, kv_heads: int | None, head_dim: int | None) -> tuple[int, int, int]:
        """(heads, 0, head_dim) of an empty past [batch, heads, 0, head_dim] for ``name``."""
        shape = list(self._inputs[name].shape or [])
        if len(shape) != 4:
            raise ValueError(f"past input {name!r} has shape {shape}: this loop feeds [batch, heads, past, head_dim]")
        # a packed --extend key cache declares its heads symbolic: its value cache has the model's own count
        sibling = "value".join(name.rsplit("key", 1)) if "key" in name else None
        other = list(self._inputs[sibling].shape or []) if sibling in self._inputs else []
        other = other if len(other) == 4 else [None] * 4
        heads = shape[1] if isinstance(shape[1], int) else kv_heads if kv_heads is not None else other[1]
        dim = shape[3] if isinstance(shape[3], int) else head_dim if head_dim is not None else other[3]
        heads = heads if isinstance(heads, int) else None
        dim = dim if isinstance(dim, int) else None
        if heads is None or dim is None:
            raise ValueError(f"past input {name!r} declares {shape}: pass kv_heads= and head_dim= to size its "
                             "empty first past")
        return int(heads), 0, int(dim)

    def reset(self) -> None:
        """Forget the sequences: the next `step` is a prompt."""
        self.tokens: np.ndarray | None = None  # every token so far, [batch, T]
        self._cache: dict[str, np.ndarray] = {}
        self._cache_length = 0  # the total length the cache was computed at
        self.full_runs = 0
        self.cached_steps = 0

    @property
    def length(self) -> int:
        """The total length T so far."""
        return 0 if self.tokens is None else int(self.tokens.shape[1])

    def _frequencies(self, total: int) -> int:
        """A label of the frequencies a run-time method uses at total length ``total`` (equal labels: equal
        frequencies), as the contract states them."""
        assert self.contract is not None
        if total <= self.contract["original_max_position_embeddings"]:
            return 0
        return 1 if self.contract["reprefill"] == "first_past_L" else total

    def needs_full_run(self, total: int) -> bool:
        """Whether a step ending at total length ``total`` must run the whole sequence from an empty past: no cache
        yet, a model without past inputs, or the contract says the frequencies of ``total`` are not those the
        cache was computed with."""
        if self._cache_length == 0 or not self._past:
            return True
        if self.contract is None or self.contract["reprefill"] == "never":
            return False
        return self._frequencies(total) != self._frequencies(self._cache_length)

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits ``[batch, n, vocab]`` of the next tokens ``input_ids`` ``[batch, n]`` given every token before."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers of shape [batch, n >= 1], not {ids.dtype} {ids.shape}")
        ids = ids.astype(self._ids_dtype)
        if self.tokens is not None and ids.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"batch {ids.shape[0]} differs from the sequences' batch {self.tokens.shape[0]}")
        batch, n = ids.shape
        start = self.length
        total = start + n
        tokens = ids if self.tokens is None else np.concatenate([self.tokens, ids], axis=1)
        full = self.needs_full_run(total)
        first = 0 if full else start
        feeds: dict[str, np.ndarray] = {"input_ids": tokens[:, first:]}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = np.ones((batch, total), _NUMPY_TYPES.get(
                self._inputs["attention_mask"].type, np.int64))
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(first, total), (batch, total - first)).astype(
                _NUMPY_TYPES.get(self._inputs["position_ids"].type, np.int64))
        for name, present in self._past.items():
            if full:
                heads, _, dim = self._empty_shapes[name]
                feeds[name] = np.zeros((batch, heads, 0, dim), _NUMPY_TYPES.get(self._inputs[name].type,
                                                                                  np.float32))
            else:
                feeds[name] = self._cache[present]
        names = [self._logits, *self._past.values()]
        logits, *presents = self.session.run(names, feeds)
        self.tokens = tokens  # only now: a failed run leaves the decoder as it was
        self._cache = dict(zip(self._past.values(), presents, strict=True))
        self._cache_length = total
        if full:
            self.full_runs += 1
        else:
            self.cached_steps += 1
        return logits[:, -n:]


def greedy_generate(session: Any, input_ids: np.ndarray, max_new_tokens: int, *, eos_token_id: int | None = None,
                    honour_contract: bool = True, kv_heads: int | None = None,
                    head_dim: int | None = None) -> np.ndarray:
    """``input_ids`` ``[batch, S]`` followed by up to ``max_new_tokens`` greedy tokens (the argmax of each step's
    last logits), decoded by `CachedDecoder` (re-prefilling where the model's decode contract says so;
    ``kv_heads`` / ``head_dim`` as there). Stops early once every sequence has produced ``eos_token_id``."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
    decoder = CachedDecoder(session, honour_contract=honour_contract, kv_heads=kv_heads, head_dim=head_dim)
    ids = np.asarray(input_ids)
    if max_new_tokens == 0:
        return ids
    logits = decoder.step(ids)
    done = np.zeros(ids.shape[0], dtype=bool)
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(axis=-1)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        new = nxt[:, None]
        ids = np.concatenate([ids, new.astype(ids.dtype)], axis=1)
        if (eos_token_id is not None and done.all()) or i == max_new_tokens - 1:
            break
        logits = decoder.step(new)
    return ids
