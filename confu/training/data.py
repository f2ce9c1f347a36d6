"""Conversations -> tokenized training samples with a loss mask; regeneration of answers by the target.

Pipeline: ``confu data prompts`` (offline prompt source) -> ``confu data regenerate`` (the target answers
every user turn, so the draft head learns the target's own distribution, as EAGLE does) -> ``confu data
prepare`` (chat template + loss mask over assistant tokens) -> training.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from confu.chat import end_of_turn_ids
from confu.errors import InputError

Message = dict[str, str]
Conversation = list[Message]

_ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system", "developer": "system",
}


@dataclass
class Sample:
    """One tokenized conversation: target token ids and a 0/1 mask of positions trained on."""

    input_ids: list[int]
    loss_mask: list[int]


@dataclass
class DatasetStats:
    conversations: int = 0
    samples: int = 0
    skipped_no_assistant: int = 0
    skipped_truncated: int = 0  # every assistant token fell beyond max_len
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- loading


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI multi-part content: keep the text parts, the only kind a text-only target can use.
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(str(p.get("text", "")) for p in value if p.get("type", "text") == "text")
    raise InputError(f"{where}: message content must be a string, got {type(value).__name__}")


def _role(value: Any, where: str) -> str:
    role = _ROLE_ALIASES.get(str(value).lower()) if isinstance(value, str) else None
    if role is None:
        raise InputError(f"{where}: unsupported role {value!r} (expected user / assistant / system)")
    return role


def _parse_record(obj: Any, where: str) -> Conversation:
    """Detect the format of one JSON record and normalize it to ``[{"role", "content"}, ...]``."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("conversations"), list):  # ShareGPT (some dumps use role/content inside)
        items = obj["conversations"]
        keys = ("from", "value")
    elif isinstance(obj.get("messages"), list):  # OpenAI chat
        items = obj["messages"]
        keys = ("role", "content")
    elif isinstance(obj.get("turns"), list):  # Spec-Bench / MT-bench / offline prompts: user turns only
        turns = obj["turns"]
        if not all(isinstance(t, str) for t in turns):
            raise InputError(f"{where}: 'turns' must be a list of strings")
        return [{"role": "user", "content": t} for t in turns]
    else:
        raise InputError(f"{where}: unknown record format; expected 'conversations' (ShareGPT), "
                         f"'messages' (OpenAI) or 'turns' (Spec-Bench)")
    messages: Conversation = []
    for item in items:
        if not isinstance(item, dict):
            raise InputError(f"{where}: every message must be an object")
        role_key = keys[0] if keys[0] in item else "role" if "role" in item else "from"
        text_key = keys[1] if keys[1] in item else "content" if "content" in item else "value"
        if role_key not in item or text_key not in item:
            raise InputError(f"{where}: message without {keys[0]!r} / {keys[1]!r}: {json.dumps(item)[:80]}")
        messages.append({"role": _role(item[role_key], where), "content": _content(item[text_key], where)})
    return messages


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any], Conversation]]:
    """Yield ``(line_number, raw_record, conversation)`` for every non-blank line of a JSONL file (gzipped
    when its name ends in .gz)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    with (gzip.open(p, "rt", encoding="utf-8") if p.suffix == ".gz" else p.open(encoding="utf-8")) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: malformed JSON ({err.msg})") from None
            yield lineno, obj, _parse_record(obj, where)


def load_conversations(path: str | os.PathLike[str]) -> list[Conversation]:
    """All conversations of a ShareGPT / OpenAI / Spec-Bench JSONL file (formats may mix per line)."""
    return [conv for _, _, conv in iter_records(path)]


# ---------------------------------------------------------------------------------------------- tokenizing


def _render(tokenizer: Any, messages: Conversation, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the tokenizer has no chat template; conversations cannot be rendered")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises template-defined errors of any type
        raise InputError(f"the chat template rejected the conversation: {err}") from err


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The rendered template already holds BOS / special tokens where the model expects them.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_conversation(tokenizer: Any, messages: Conversation, max_len: int,
                          end_ids: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Chat-template token ids of a conversation and its loss mask, both truncated to ``max_len``.

    The mask is 1 over every assistant turn's content tokens and its turn-end token (``<|im_end|>`` for
    ChatML), 0 over system / user turns, role headers and anything after the end token (ChatML's ``\\n``).
    Span boundaries come from rendering prefixes of the conversation with the template and comparing token
    counts; a template whose prefixes do not tokenize to prefixes of the full text (e.g. one that rewrites
    earlier turns) raises :class:`InputError` rather than producing a silently wrong mask.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    ids, mask = _tokenize_untruncated(tokenizer, messages, max_len, end_ids)
    return ids[:max_len], mask[:max_len]


def _tokenize_untruncated(tokenizer: Any, messages: Conversation, max_len: int,
                          end_ids: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """All token ids (so callers can tell truncation happened); the mask is exact up to ``max_len``."""
    end_ids = list(end_ids) if end_ids is not None else end_of_turn_ids(tokenizer)
    msgs = list(messages)
    # An assistant turn before any user turn answers nothing; most templates reject it anyway.
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), len(msgs))
    msgs = [m for i, m in enumerate(msgs) if i >= first_user or m["role"] != "assistant"]
    full_text = _render(tokenizer, msgs, add_generation_prompt=False)
    ids = _encode(tokenizer, full_text)
    mask = [0] * len(ids)
    for i, message in enumerate(msgs):
        if message["role"] != "assistant":
            continue
        head_text = _render(tokenizer, msgs[:i], add_generation_prompt=True)
        turn_text = _render(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if not (turn_text.startswith(head_text) and full_text.startswith(turn_text)):
            raise InputError("the chat template does not render conversation prefixes as text prefixes; "
                             "cannot locate assistant turns for the loss mask")
        head_ids, turn_ids = _encode(tokenizer, head_text), _encode(tokenizer, turn_text)
        start, stop = len(head_ids), len(turn_ids)
        if ids[:stop] != turn_ids or turn_ids[:start] != head_ids:
            raise InputError("tokenizing a conversation prefix does not give a prefix of the full token ids "
                             "(merges across a turn boundary); cannot build the loss mask")
        span = ids[start:stop]
        ends = [j for j, t in enumerate(span) if t in end_ids]
        stop = start + ends[-1] + 1 if ends else stop  # drop what the template adds after the end token
        mask[start:stop] = [1] * (stop - start)
        if start >= max_len:
            break  # later turns would be truncated away; skip rendering them
    return ids, mask


def prepare(input_paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], tokenizer: Any,
            out_path: str | os.PathLike[str], max_len: int) -> DatasetStats:
    """Tokenize conversation files into a JSONL dataset of ``{"input_ids", "loss_mask"}`` lines.

    Conversations without an assistant turn (prompt-only formats that were not regenerated) are skipped and
    counted. The file is written to a temporary name and renamed, so a crash never leaves half a dataset.
    """
    paths = [input_paths] if isinstance(input_paths, (str, os.PathLike)) else list(input_paths)
    if not paths:
        raise InputError("no input files given")
    end_ids = end_of_turn_ids(tokenizer)
    stats = DatasetStats()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for path in paths:
            for lineno, _, conv in iter_records(path):
                stats.conversations += 1
                if not any(m["role"] == "assistant" for m in conv):
                    stats.skipped_no_assistant += 1
                    continue
                try:
                    ids, mask = _tokenize_untruncated(tokenizer, conv, max_len, end_ids)
                except InputError as err:
                    raise InputError(f"{path}:{lineno}: {err}") from None
                stats.truncated += int(len(ids) > max_len)
                ids, mask = ids[:max_len], mask[:max_len]
                if not any(mask):
                    stats.skipped_truncated += 1
                    continue
                f.write(json.dumps({"input_ids": ids, "loss_mask": mask}, separators=(",", ":")) + "\n")
                stats.samples += 1
                stats.tokens += len(ids)
                stats.loss_tokens += sum(mask)
    os.replace(tmp, out)
    return stats


def load_dataset(path: str | os.PathLike[str]) -> list[Sample]:
    """Read a dataset written by :func:`prepare`."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such dataset file (run `confu data prepare` first)")
    samples: list[Sample] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                sample = Sample(input_ids=[int(t) for t in obj["input_ids"]],
                                loss_mask=[int(m) for m in obj["loss_mask"]])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise InputError(f"{p}:{lineno}: not a tokenized sample ({err})") from None
            if len(sample.input_ids) != len(sample.loss_mask):
                raise InputError(f"{p}:{lineno}: input_ids and loss_mask differ in length")
            samples.append(sample)
    return samples


# -------------------------------------------------------------------------------------------- regeneration


def generate_replies(model: Any, tokenizer: Any, conversations: Sequence[Conversation], batch_size: int = 8,
                     max_new_tokens: int = 256, temperature: float = 0.0,
                     max_prompt_len: int | None = None) -> list[str | None]:
    """The target's next assistant reply to each conversation (each must end with a user turn).

    Prompts are sorted by length and batched with left padding, so every row's last prompt token sits at
    the same position and generation starts together. Each reply is cut at the first turn-end token.
    Prompts longer than ``max_prompt_len`` tokens get ``None`` instead of a reply.
    """
    import torch

    end_ids = end_of_turn_ids(tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    prompts = [_encode(tokenizer, _render(tokenizer, c, add_generation_prompt=True)) for c in conversations]
    config = plain_sampling_config(max_new_tokens, temperature, end_ids, pad_id)
    replies: list[str | None] = [None] * len(prompts)
    todo = [i for i, p in enumerate(prompts) if max_prompt_len is None or len(p) <= max_prompt_len]
    todo.sort(key=lambda i: -len(prompts[i]))  # longest first: memory trouble shows up immediately
    device = next(model.parameters()).device
    for b in range(0, len(todo), batch_size):
        rows = todo[b:b + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attention[r, width - len(prompts[i]):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 generation_config=config)
        for r, i in enumerate(rows):
            new = out[r, width:].tolist()
            replies[i] = tokenizer.decode(new[:turn_end(new, end_ids)], skip_special_tokens=True).strip()
    return replies


def plain_sampling_config(max_new_tokens: int, temperature: float, end_ids: list[int], pad_id: int) -> Any:
    """A transformers ``GenerationConfig`` that samples at ``temperature`` (0 = greedy) and nothing else.

    Built fresh rather than from the checkpoint's: its own defaults (top_p, repetition penalty, ...) must not
    leak into data that is meant to be the model's plain distribution.
    """
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                            temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
                            eos_token_id=end_ids, pad_token_id=pad_id)


def turn_end(tokens: Sequence[int], end_ids: Sequence[int]) -> int | None:
    """Index of the first turn-end token in ``tokens``; None when the turn was cut off before ending."""
    return next((j for j, t in enumerate(tokens) if t in end_ids), None)


def _record_id(raw: dict[str, Any], index: int) -> str:
    for key in ("id", "question_id"):
        if raw.get(key) is not None:
            return str(raw[key])
    return str(index)


def _done_indices(out: Path, ids: Sequence[str]) -> set[int]:
    """Indices already regenerated into ``out``; a torn last line from a killed run is cut away."""
    done: set[int] = set()
    good_bytes = 0
    with out.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                rec = json.loads(line)
                index = int(rec["index"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if not line.endswith(b"\n"):
                    break  # torn final write: truncated below and redone
                raise InputError(f"{out}:{lineno}: not a regenerated record; use a new --out") from None
            if index >= len(ids) or str(rec.get("id")) != ids[index]:
                raise InputError(f"{out}:{lineno}: record {index} does not match the input file; "
                                 f"the output was made from a different input (use a new --out)")
            done.add(index)
            good_bytes += len(line)
    if good_bytes < out.stat().st_size:
        with out.open("r+b") as f:
            f.truncate(good_bytes)
    return done


def regenerate(model: Any, tokenizer: Any, input_path: str | os.PathLike[str],
               out_path: str | os.PathLike[str], batch_size: int = 8, max_new_tokens: int = 256,
               temperature: float = 0.0, resume: bool = True, limit: int | None = None, seed: int = 0) -> int:
    """Answer every user turn of ``input_path`` with the target; write OpenAI-format JSONL to ``out_path``.

    Existing assistant turns are replaced. Multi-turn records are answered turn by turn, each answer fed
    back before the next user turn. Records are written and flushed per batch as ``{"id", "index",
    "category"?, "messages"}``; with ``resume`` a rerun skips the indices already in ``out_path``. ``limit``
    restricts the run to the first ``limit`` input records. Returns the number of records written now.
    """
    import torch
    from tqdm import tqdm

    if batch_size <= 0 or max_new_tokens <= 0:
        raise InputError("batch size and max new tokens must be positive")
    records = [(raw, conv) for _, raw, conv in iter_records(input_path)]
    ids = [_record_id(raw, i) for i, (raw, _) in enumerate(records)]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Resume checks against every input record: an earlier run may have gone further than this --limit.
    done = _done_indices(out, ids) if resume and out.exists() else set()
    stop = len(records) if limit is None else min(limit, len(records))
    todo = [i for i in range(stop) if i not in done]
    context = getattr(model.config, "max_position_embeddings", None)
    max_prompt = context - max_new_tokens if isinstance(context, int) else None
    # Batch records of similar first-prompt length together; padding costs compute on every step.
    todo.sort(key=lambda i: sum(len(m["content"]) for m in records[i][1] if m["role"] != "assistant"))
    if temperature > 0:
        torch.manual_seed(seed)
    written = 0
    with out.open("a" if resume else "w", encoding="utf-8") as f, \
            tqdm(total=len(todo), desc="regenerate", unit="conv", disable=None) as bar:
        for b in range(0, len(todo), batch_size):
            batch = todo[b:b + batch_size]
            # Keep system + user turns; the target writes every assistant turn itself.
            pending = {i: [m for m in records[i][1] if m["role"] != "assistant"] for i in batch}
            answered: dict[int, Conversation] = {i: [] for i in batch}
            while pending:
                asks = {}
                for i, rest in pending.items():
                    k = next((j for j, m in enumerate(rest) if m["role"] == "user"), None)
                    if k is not None:
                        answered[i].extend(rest[: k + 1])
                        pending[i] = rest[k + 1:]
                        asks[i] = answered[i]
                    else:
                        answered[i].extend(rest)
                        pending[i] = []
                if asks:
                    replies = generate_replies(model, tokenizer, list(asks.values()), batch_size=batch_size,
                                               max_new_tokens=max_new_tokens, temperature=temperature,
                                               max_prompt_len=max_prompt)
                    for i, reply in zip(asks, replies, strict=True):
                        if reply is None:  # context full: end the conversation before this turn
                            answered[i].pop()
                            pending[i] = []
                        else:
                            answered[i].append({"role": "assistant", "content": reply})
                pending = {i: rest for i, rest in pending.items() if rest}
            for i in batch:
                rec: dict[str, Any] = {"id": ids[i], "index": i}
                if "category" in records[i][0]:
                    rec["category"] = records[i][0]["category"]
                rec["messages"] = answered[i]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            written += len(batch)
            bar.update(len(batch))
    return written
