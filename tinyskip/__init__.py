"""tinyskip: early-exit training and decoding for small Llama-style decoders."""

__version__ = "0.1.0"
