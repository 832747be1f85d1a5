"""Attention around the positional encoding in ONNX graphs: fusion into onnxruntime's attention ops (`fuse.py`; KV-cache
exports in Optimum's layout: `fuse_cache.py`) and attention-level context extension — SelfExtend, ReRoPE, log-n
(`extend.py`).

Modules are imported by their own path; this package imports nothing (no import cycle through here)."""
