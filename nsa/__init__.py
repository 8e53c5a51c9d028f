"""nsa: Native Sparse Attention (DeepSeek, arXiv 2502.11089) for byte-level language models."""

__version__ = "0.1.0"
