"""Score biases classified by value (`detect.py`: families of `math.bias`) and rewritten from the fitted
formula (`rewrite.py`: --max-positions, --bias-scale, --fp32-positions).

Modules are imported by their own path; this package imports nothing, so that importing one of its detectors
does not import its rewriting passes (and, through them, the pass infrastructure)."""
