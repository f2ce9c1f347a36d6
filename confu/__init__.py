"""ConFu / EAGLE-3 speculative decoding for Hugging Face causal LMs.

Kept import-light on purpose: ``import confu`` must not pull in torch, so the CLI can print
help and errors quickly.
"""

__version__ = "0.1.0"
