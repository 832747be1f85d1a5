"""posrewrite: find and rewrite the positional encodings of exported transformer models."""

__version__ = "0.2.0"
