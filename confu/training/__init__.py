"""Training draft heads: the prompt source (``passages``, ``prompts``, ``self_written``), regeneration and
tokenization (``data``), the draft vocabulary (``vocab``), the train-time test (``ttt``) and the training loop
(``train``). This package file stays import-light.
"""
