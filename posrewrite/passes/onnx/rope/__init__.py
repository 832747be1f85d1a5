"""RoPE in ONNX graphs: detection (`detect.py`, with the rotation patterns in `patterns.py`, cos/sin traced to their
source in `sources.py`, the angle product read in `angles.py`, tables in `tables.py`, fused ops in `fused.py`, the
base in `base.py`, posrewrite's own records in `markers.py`, leftovers reported by `lint.py`), the rescale
(`rescale.py`), fp32 positions and angles (`fp32.py`) and the fusion into RotaryEmbedding (`fuse.py`).

Modules are imported by their own path (``posrewrite.passes.onnx.rope.detect``); this package imports nothing, so
that the passes, the pipeline and detection can import one another's modules without a cycle through here."""
