"""gguf-surgeon: edit the transformer blocks of GGUF models without PyTorch."""

__version__ = "0.1.0"
