"""The decoding engine: the frozen target, draft heads and their checkpoints, draft trees, verification,
sampling, contemplate slots and the decoding loop. Import the modules themselves (e.g.
``from confu.engine.generate import Decoder``); this package file stays import-light.
"""
