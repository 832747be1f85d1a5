"""Absolute position encodings, learned and sinusoidal: detection of tables read by position and of computed
sinusoids (`detect.py`), extension past the training length (`extend.py`).

Modules are imported by their own path; this package imports nothing, so that importing one of its detectors
does not import its rewriting passes (and, through them, the pass infrastructure)."""
