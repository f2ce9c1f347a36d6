"""The OpenAI API as confu serves it: request validation (every mistake is a 400 with an OpenAI-style error
body, never an exception that reaches the server) and the response / stream-chunk shapes.

Supported: `/v1/chat/completions` (messages through the target's chat template) and `/v1/completions` (a raw
prompt, or token ids), with temperature (0 to 2, as OpenAI's), top_p, top_k (an extension, as in vLLM), max_tokens
(or max_completion_tokens; at most what the context has room for after the prompt), stop, seed, stream and
stream_options.include_usage, and `match` (an extension: false turns off a `--match` server's draft candidates
matched in the text so far for this request). Omitted sampling parameters take the server's decoding flags (greedy unless
`confu serve --temperature` says otherwise), not OpenAI's temperature 1; an omitted max_tokens is the server's,
cut to the context's room. A parameter confu does not implement is refused unless it asks for nothing, never
silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from confu.engine.sampling import SamplingConfig
from confu.errors import InputError

MAX_STOP_SEQUENCES = 4
MAX_TEMPERATURE = 2.0  # OpenAI's bound
ROLES = ("system", "user", "assistant", "tool", "developer")
# Parameters confu does not implement, with the values that ask for nothing (accepted as such).
UNSUPPORTED = {"logprobs": (None, False), "echo": (None, False), "suffix": (None, ""), "tools": (None, []),
               "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "logit_bias": (None, {}), "response_format": (None, {"type": "text"})}


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.error_type = message, status, param, code, error_type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Defaults:
    """What a request gets for what it leaves out (the server's decoding flags)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int


@dataclass(frozen=True)
class CompletionRequest:
    chat: bool  # /v1/chat/completions (else /v1/completions)
    model: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    match: bool | None = None  # draft candidates matched in the text so far: on / off (None: the server's)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{key}' must be a number, got {json.dumps(value)}", param=key)
    return float(value)


def _optional_bool(body: dict, key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"'{key}' must be a boolean, got {json.dumps(value)}", param=key)
    return value


def _optional_int(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is not None and not _is_int(value):
        raise RequestError(f"'{key}' must be an integer, got {json.dumps(value)}", param=key)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    return tuple(stops)


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts",
                       param=f"messages[{index}].content")


def chat_prompt_ids(tokenizer, messages: Any) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}] must be an object with a role in {ROLES}", param=f"messages[{i}]")
        turns.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("the target's tokenizer has no chat template: use /v1/completions")
    try:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as err:  # a template may refuse a role order (e.g. two user turns in a row)
        raise RequestError(f"the chat template refused these messages: {err}", param="messages") from err
    return list(ids)


def completion_prompt_ids(tokenizer, prompt: Any, vocab_size: int) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("'prompt' is empty", param="prompt")
        return tokenizer(prompt, add_special_tokens=True).input_ids
    if isinstance(prompt, list) and prompt and all(_is_int(t) and 0 <= t < vocab_size for t in prompt):
        return list(prompt)
    raise RequestError("'prompt' must be a string, or a list of token ids within the vocabulary "
                       "(one prompt per request)", param="prompt")


def check_model(name: Any, served: str, status: int = 400) -> None:
    """Refuses any model but the one served: a 400 for a request's `model`, a 404 for a `/v1/models/{id}`."""
    if name != served:
        raise RequestError(f"the model {json.dumps(name)} does not exist; this server serves {json.dumps(served)}",
                           status=status, param="model", code="model_not_found")


def parse_request(raw: bytes, chat: bool, model: str, tokenizer, vocab_size: int, max_context: int,
                  defaults: Defaults) -> CompletionRequest:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    check_model(body.get("model", model), model)
    n = body.get("n")
    if n not in (None, 1):
        raise RequestError("only n = 1 is supported", param="n")
    for key, harmless in UNSUPPORTED.items():
        if body.get(key) not in harmless:
            raise RequestError(f"'{key}' is not supported", param=key)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError("'stream_options' must be an object with a boolean include_usage", param="stream_options")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise RequestError(f"'max_tokens' must be an integer >= 1, got {json.dumps(max_tokens)}", param="max_tokens")
    top_k = _optional_int(body, "top_k")
    top_k = defaults.top_k if top_k is None else (0 if top_k == -1 else top_k)  # vLLM spells "off" as -1
    temperature = _number(body, "temperature", defaults.temperature)
    if temperature > MAX_TEMPERATURE:
        raise RequestError(f"'temperature' must be at most {MAX_TEMPERATURE:g}, got {temperature:g}",
                           param="temperature")
    try:
        sampling = SamplingConfig(temperature, _number(body, "top_p", defaults.top_p), top_k)
    except InputError as err:
        raise RequestError(str(err)) from err

    ids = chat_prompt_ids(tokenizer, body.get("messages")) if chat else completion_prompt_ids(
        tokenizer, body.get("prompt"), vocab_size)
    if not ids:
        raise RequestError("the prompt is empty", param="messages" if chat else "prompt")
    room = max_context - len(ids)  # tokens the context holds after the prompt
    if room < 1:
        raise RequestError(f"the prompt has {len(ids)} tokens; the model's context holds {max_context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(defaults.max_tokens, room)
    elif max_tokens > room:
        raise RequestError(f"'max_tokens' is {max_tokens}, but the model's context of {max_context} tokens holds "
                           f"{room} after the prompt's {len(ids)}", param="max_tokens",
                           code="context_length_exceeded")
    return CompletionRequest(chat=chat, model=model, prompt_ids=ids, max_tokens=max_tokens, sampling=sampling,
                             seed=_optional_int(body, "seed"), stop=_stop(body), stream=stream,
                             include_usage=options.get("include_usage", False), match=_optional_bool(body, "match"))


# -- responses --------------------------------------------------------------------------------------------------


@dataclass
class ResponseIds:
    """The id, object names and creation time every chunk of one response shares."""

    chat: bool
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def envelope(self, streaming: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind + (".chunk" if streaming and self.chat else ""),
                "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(ids: ResponseIds, text: str, finish_reason: str, usage_: dict[str, int],
                  spec_decode: dict[str, Any]) -> dict[str, Any]:
    if ids.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {**ids.envelope(streaming=False), "choices": [choice], "usage": usage_, "spec_decode": spec_decode}


def stream_chunk(ids: ResponseIds, text: str | None, finish_reason: str | None = None, first: bool = False,
                 include_usage: bool = False) -> dict[str, Any]:
    """One content chunk (`text`) or the closing chunk (`finish_reason`); `usage: null` when usage will follow."""
    if ids.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    chunk = {**ids.envelope(streaming=True), "choices": [choice]}
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(ids: ResponseIds, usage_: dict[str, int]) -> dict[str, Any]:
    return {**ids.envelope(streaming=True), "choices": [], "usage": usage_}
