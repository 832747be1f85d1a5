"""T5 relative attention bias: detection (`detect.py`). It runs at any length as is (distances past
max_distance share the last bucket), so there is no extension to write.

Modules are imported by their own path; this package imports nothing, so that importing one of its detectors
does not import its rewriting passes (and, through them, the pass infrastructure)."""
