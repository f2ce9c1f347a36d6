"""Prompts the target writes itself (`confu data prompts --self-written N`): it is asked for user requests of
every category, so the prompts come from its own distribution."""

from __future__ import annotations

import random
import re
from typing import Any

from confu.training.data import generate_replies
from confu.training.prompts import _HUMANITIES, _STEM_CONCEPTS, _TOPICS, CATEGORIES

_SELF_WRITE_ASK = {
    "writing": "a creative writing task", "roleplay": "a role-play request", "coding": "a programming task",
    "extraction": "a request to extract information from a short text they include",
    "stem": "a science or engineering question", "humanities": "a history or philosophy question",
    "summarization": "a request to summarize a short text they include",
    "translation": "a translation request that includes the sentence to translate",
    "qa": "an everyday practical question", "math_reasoning": "a math word problem",
    "rag": "a question about a short passage they include",
}
_SELF_TOPICS = _TOPICS + _STEM_CONCEPTS + _HUMANITIES


def _clean_self_written(text: str) -> str:
    text = text.strip()
    text = re.sub(r"^(sure|here(?: is|'s)[^:\n]*|question|user)\s*[:!.,-]\s*", "", text, flags=re.I).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def self_written_prompts(
    model: Any, tokenizer: Any, n: int, seed: int = 0, batch_size: int = 8, max_new_tokens: int = 128,
    temperature: float = 0.8,
) -> list[dict[str, Any]]:
    """Ask the target itself to write ``n`` user requests (one per generation), balanced by category.

    The answers come from the target's own distribution, which makes the prompts look like what its users
    might type; sampling (``temperature > 0``) keeps prompts for the same topic apart. Answers shorter than
    10 characters or repeated are dropped, so fewer than ``n`` records can come back.
    """
    import torch

    rng = random.Random(seed)
    asks: list[tuple[str, list[dict[str, str]]]] = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        request = (f"Write {_SELF_WRITE_ASK[category]} that a user might send to an AI assistant about "
                   f"{rng.choice(_SELF_TOPICS)}. Reply with the user's message only, nothing else.")
        asks.append((category, [{"role": "user", "content": request}]))
    # Seed generation without disturbing the caller's RNG streams (CPU and the model's CUDA device).
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        replies = generate_replies(model, tokenizer, [a[1] for a in asks], batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, temperature=temperature)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, ((category, _), reply) in enumerate(zip(asks, replies, strict=True)):
        text = _clean_self_written(reply)
        if len(text) < 10 or text in seen:
            continue
        seen.add(text)
        records.append({"id": f"self-{seed}-{i:06d}", "category": category, "turns": [text]})
    return records
