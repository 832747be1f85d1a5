"""Load and save ONNX models through onnx_ir, safely: one import for the three parts.

- :mod:`posrewrite.io.policy`: what a model file may hold before a byte of it is used. One loading policy
  applies to every tensor of the file, in the main graph, subgraphs (If/Loop/Scan) and local function bodies
  alike, before a byte of external data is read: external data must be a regular file inside the model's folder
  (resolved against that folder, symlinks followed), with the tensor's bytes within the file and its declared
  length; inline data must match its shape; sparse tensors, training_info and strings that are not UTF-8 are
  refused rather than dropped. Every way a model can be unusable is a one-line
  :class:`~posrewrite.errors.ModelLoadError` (exit 3) at load time.
- :mod:`posrewrite.io.load`: :func:`load_model` parses the graph but never reads weight bytes: external tensors
  stay :class:`onnx_ir.ExternalTensor` objects and inline ones :class:`InlineTensor` objects (the payload left
  in the .onnx file, :mod:`posrewrite.io.protowire`), memory-mapped only when a pass actually reads one.
- :mod:`posrewrite.io.output`: :func:`stage_model` / :func:`save_model` follow one output protocol (write beside
  the output, validate there, switch by one rename; a failure leaves nothing; leftovers of killed runs removed;
  untouched weights copied file to file, holes kept; nothing written over the input or its data).

Loading is a library call without state: a caller that read a model up front (the command line, to fail fast)
hands it on explicitly (``api.rewrite(..., loaded=model)``).
"""

from __future__ import annotations

__all__ = [
    "INLINE_LIMIT_BYTES",
    "InlineTensor",
    "MAX_OPSET",
    "MIN_OPSET",
    "default_output_path",
    "ensure_distinct_output",
    "external_data_files",
    "external_data_path",
    "has_inline_tensors",
    "load_model",
    "max_supported_opset",
    "read_model",
    "read_proto",
    "StagedModel",
    "check_output_path",
    "copy_sparse",
    "output_disk_bytes",
    "remove_leftovers",
    "save_model",
    "shares_weights_with",
    "stage_model",
    "source_path",
]

from posrewrite.io.load import (
    InlineTensor,
    external_data_files,
    has_inline_tensors,
    load_model,
    read_model,
    read_proto,
    source_path,
)
from posrewrite.io.output import (
    INLINE_LIMIT_BYTES,
    StagedModel,
    check_output_path,
    copy_sparse,
    default_output_path,
    ensure_distinct_output,
    external_data_path,
    output_disk_bytes,
    remove_leftovers,
    save_model,
    shares_weights_with,
    stage_model,
)
from posrewrite.io.policy import MAX_OPSET, MIN_OPSET, max_supported_opset
