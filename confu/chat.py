"""Chat-template helpers shared by decoding, benchmarks and data preparation: prompt encoding, prompt files,
and the one end-of-turn policy (which token ids end an assistant turn).

Kept import-light (no torch): the CLI and the data tools use it before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from confu.errors import InputError

# Tokens that end a turn in common chat templates (ChatML, Llama 3, Gemma, Phi-3); those in the vocabulary
# count as end of turn.
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def end_of_turn_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's EOS, the turn-end markers of
    :data:`TURN_END_TOKENS` that exist in the vocabulary, and the generation config's EOS ids.

    The order is stable (tokenizer EOS first, duplicates dropped), so callers may use the first id as a
    fallback pad token.
    """
    candidates: list[Any] = [tokenizer.eos_token_id]
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in TURN_END_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != unk:
            candidates.append(tid)
    gen_eos = getattr(generation_config, "eos_token_id", None)
    candidates.extend(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    ids: list[int] = []
    for tid in candidates:
        if isinstance(tid, int) and tid >= 0 and tid not in ids:
            ids.append(tid)
    return ids


def encode_prompt(tokenizer, text: str, raw: bool) -> list[int]:
    """Token ids of a prompt, through the target's chat template unless `raw`."""
    if not text.strip():
        raise InputError("the prompt is empty")
    if raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer(text, add_special_tokens=True).input_ids
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
    ))


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-empty line (lines starting with # are comments); a line that is a JSON object may
    give `prompt` or `turns` (its first turn)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise InputError(f"cannot read the prompt file {path}: {err.strerror}") from err
    prompts = []
    for number, line in enumerate((raw.strip() for raw in lines), start=1):
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                rec = json.loads(line)
                line = rec.get("prompt") or rec["turns"][0]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
                raise InputError(
                    f"{path}:{number}: a JSON line must be an object with 'prompt' or a non-empty 'turns' ({err})"
                ) from err
            if not isinstance(line, str):
                raise InputError(f"{path}:{number}: the prompt must be a string")
        prompts.append(line)
    if not prompts:
        raise InputError(f"no prompts in {path}")
    return prompts
