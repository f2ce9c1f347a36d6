"""Prompts the target writes itself, so they come from its own distribution.

Two ways: `confu data prompts --self-written N` asks it, in an ordinary user turn, for a request of each category;
`--magpie N` renders the chat template up to the start of a user turn and lets the instruct model write the user's
message (Magpie, Xu et al. 2024, arXiv 2406.08464). A small model follows the explicit ask poorly (it often answers
the ask instead of writing a request); the Magpie form needs no instruction following and yields requests that look
like the ones the model was tuned on."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from confu.chat import end_of_turn_ids
from confu.errors import InputError
from confu.training.data import generate_replies, plain_sampling_config, turn_end
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


@contextmanager
def _seeded(model: Any, seed: int) -> Iterator[None]:
    """Seed generation without disturbing the caller's RNG streams (CPU and the model's CUDA devices)."""
    import torch

    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


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
    rng = random.Random(seed)
    asks: list[tuple[str, list[dict[str, str]]]] = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        request = (f"Write {_SELF_WRITE_ASK[category]} that a user might send to an AI assistant about "
                   f"{rng.choice(_SELF_TOPICS)}. Reply with the user's message only, nothing else.")
        asks.append((category, [{"role": "user", "content": request}]))
    with _seeded(model, seed):
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


def user_turn_prefix(tokenizer: Any) -> str:
    """The chat template rendered up to where a user's message begins (system prompt and header included)."""
    sentinel = "\u2063confu-user-message\u2063"  # text no template adds by itself
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
    except Exception as exc:  # no template, or one that rejects a lone user turn
        raise InputError(f"--magpie needs a chat template that renders a user turn: {exc}") from exc
    if sentinel not in rendered:
        raise InputError("--magpie: the chat template does not place the user's message in its output")
    return rendered[: rendered.index(sentinel)]


def magpie_prompts(
    model: Any, tokenizer: Any, n: int, seed: int = 0, batch_size: int = 8, max_new_tokens: int = 96,
    temperature: float = 1.0,
) -> list[dict[str, Any]]:
    """Sample ``n`` user messages from the target, starting from :func:`user_turn_prefix`.

    A message is kept only when the model ends the user turn itself within ``max_new_tokens`` (a cut-off one
    is usually rambling), is at least 10 characters long and is new; so fewer than ``n`` can come back.
    """
    import torch

    prefix = tokenizer(user_turn_prefix(tokenizer), add_special_tokens=False, return_tensors="pt").input_ids
    end_ids = end_of_turn_ids(tokenizer, getattr(model, "generation_config", None))
    config = plain_sampling_config(max_new_tokens, temperature, end_ids, end_ids[0])
    device = next(model.parameters()).device
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    with _seeded(model, seed), torch.inference_mode():
        for start in range(0, n, batch_size):
            rows = min(batch_size, n - start)
            ids = prefix.repeat(rows, 1).to(device)  # one shared prefix: no padding, no attention mask needed
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            for r in range(rows):
                new = out[r, ids.shape[1]:].tolist()
                cut = turn_end(new, end_ids)
                if cut is None:  # cut off by max_new_tokens
                    continue
                text = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
                if len(text) < 10 or text in seen:
                    continue
                seen.add(text)
                records.append({"id": f"magpie-{seed}-{start + r:06d}", "category": "magpie", "turns": [text]})
    return records
