"""ALiBi: detection (`detect.py`, reading what the score-bias classifier found), extension past the training
length (`extend.py`) and the fp32-safe rewrite with its precision analysis (`fp32.py`).

Modules are imported by their own path; this package imports nothing, so that importing one of its detectors
does not import its rewriting passes (and, through them, the pass infrastructure)."""
