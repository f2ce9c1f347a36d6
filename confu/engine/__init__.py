"""The decoding engine: the frozen target, draft heads and their checkpoints, draft trees, verification,
sampling, contemplate slots and the decoding loop. Import the modules themselves (e.g.
``from confu.engine.generate import Decoder``); this package file stays import-light.
"""

# How a target's linear layers run (`Target(numerics=...)`, `--numerics`): here so the CLI can list them cheaply.
TARGET_NUMERICS = ("auto", "reference", "q8")
