"""lowbit: a compiler for extreme low-bit language models."""
