"""Exceptions with a user-facing message.

The CLI catches ``ConfuError`` and prints ``error: <message>`` with exit status 2, so every
message must make sense to a user without a traceback.
"""


class ConfuError(Exception):
    """Base class for expected, user-facing failures."""


class TargetNotFoundError(ConfuError):
    """The ``--target`` spec does not name an embedded model, an HF directory or a ``.gguf`` file."""


class DraftMismatchError(ConfuError):
    """A draft checkpoint was trained for a different target (hidden size, layers, vocabulary)."""


class CheckpointError(ConfuError):
    """A draft checkpoint directory is missing, incomplete or corrupt."""


class InputError(ConfuError):
    """Bad user input: empty prompt, prompt longer than the context, invalid arguments."""


class UnsupportedModelError(ConfuError):
    """The target's architecture is one confu cannot run: encoder-decoder, no KV cache, attention that cannot
    take the tree's 4D mask, or layers other than full and sliding-window attention."""
