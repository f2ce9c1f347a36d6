"""`confu serve`: the OpenAI-compatible server (`confu.serve`), and `confu bench-serve`: a bounded load run against
it (`confu.bench.serve_load`). The engine and the server are imported inside the handlers: `confu --help` must
stay fast."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

from confu.cli.common import (
    DefaultsHelpFormatter,
    add_decoding_args,
    add_numerics_arg,
    add_target_args,
    parse_tree_nodes,
)
from confu.cli.generate import add_match_arg

API_KEY_ENV = "CONFU_API_KEY"


def add_match_args(p) -> None:
    """`--match` and how much of earlier requests' text it may match."""
    add_match_arg(p)
    p.add_argument("--match-history", type=int, default=0, metavar="TOKENS",
                   help="with --match: also match the latest TOKENS tokens of earlier requests (their text then "
                        "becomes draft candidates for later requests, which verification checks; never output)")


def served_method(decoder) -> str:
    """What decodes for the server: 'plain', or what proposes ('eagle3', 'confu', 'match', 'eagle3+match')."""
    return "plain" if decoder.proposer is None else decoder.proposer.name


def serve_config(args, model_name: str, max_queue: int, method: str = "plain", api_key: str | None = None):
    """The server's settings from its flags (checked before anything loads)."""
    from confu.engine.generation_config import tree_setting
    from confu.errors import InputError
    from confu.serve.generation import ServeConfig
    from confu.serve.protocol import Defaults

    if max_queue < 0:
        raise InputError(f"--max-queue must be >= 0 (got {max_queue})")
    tree, auto = tree_setting(args.tree_nodes, args.depth, args.topk)
    return ServeConfig(
        model_name=model_name,
        defaults=Defaults(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k),
        tree=tree,
        auto_tree=auto,
        contemplate=args.contemplate,
        zero_future=args.zero_future,
        max_queue=max_queue,
        method=method,
        draft=None if args.draft == "none" else args.draft,
        api_key=api_key,
        match=args.match,
    )


def cmd_serve(args) -> None:
    from confu.cli.generate import load_decoder
    from confu.serve.server import make_server

    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    cfg = serve_config(args, args.served_model_name or args.target, args.max_queue, api_key=api_key)
    decoder = load_decoder(args.target, args.draft, args.numerics, args.match, args.match_history)
    cfg = replace(cfg, method=served_method(decoder))
    kind = "plain decoding" if args.draft == "none" else f"{cfg.method} draft {args.draft}"
    auth = ", bearer API key required" if api_key else ""
    print(f"serving {cfg.model_name!r} ({kind}); OpenAI API under /v1{auth}", flush=True)
    # uvicorn prints the address it bound (the chosen port for --port 0) and, on failure, why it could not.
    make_server(decoder, cfg, args.host, args.port, log_level="info", access_log=args.verbose).run()


def cmd_bench_serve(args) -> None:
    from confu.bench.serve_load import LoadConfig, render_load_console, run_load
    from confu.cli.generate import load_decoder
    from confu.serve.server import make_server, serve_in_thread

    if args.url:  # a server already running: its model is the one it lists
        from urllib.request import urlopen

        from confu.errors import InputError

        try:
            with urlopen(args.url.rstrip("/") + "/v1/models", timeout=30) as resp:
                model = json.load(resp)["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError) as err:
            raise InputError(f"no confu server answers at {args.url}: {err}") from err
        server = nullcontext(args.url.rstrip("/"))
    else:
        model = args.target
        # Room in the queue for every client: a 429 would count as an error of the run.
        decoder = load_decoder(args.target, args.draft, args.numerics, args.match, args.match_history)
        cfg = serve_config(args, model, max_queue=args.clients, method=served_method(decoder))
        server = serve_in_thread(make_server(decoder, cfg))
    with server as base_url:
        report = run_load(LoadConfig(base_url=base_url, model=model, clients=args.clients,
                                     requests_per_client=args.requests, max_tokens=args.max_tokens))
    report["server"] = args.url or {"target": args.target, "draft": args.draft, "tree_nodes": args.tree_nodes,
                                    "depth": args.depth, "topk": args.topk}
    print(render_load_console(report))
    print(json.dumps(report))


def add_parser(subparsers: Any) -> None:
    """`confu serve` and `confu bench-serve`."""
    s = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat / completions, streaming, /metrics)",
        description="The decoding flags are the defaults of requests that leave a parameter out. Requests are "
                    "decoded one at a time; up to --max-queue wait, more get 429.",
        formatter_class=DefaultsHelpFormatter)
    add_target_args(s)
    add_numerics_arg(s)
    s.add_argument("--draft", default="none",
                   help="a draft directory (confu, official / SpecForge or speculators EAGLE-3), or 'none'")
    add_match_args(s)
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--served-model-name", default=None, help="the model id clients name (default: --target)")
    s.add_argument("--max-queue", type=int, default=16, help="requests that may wait for the engine")
    s.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on the /v1 routes (default: ${API_KEY_ENV} if set, "
                        "else no key)")
    s.add_argument("--tree-nodes", type=parse_tree_nodes, default="auto", help="'auto' or a fixed node count")
    add_decoding_args(s)
    s.add_argument("--verbose", action="store_true", help="log every request")
    s.set_defaults(func=cmd_serve)

    b = subparsers.add_parser(
        "bench-serve", help="load run: concurrent clients against confu serve (requests/s, latency, TTFT)",
        description="Starts a server on 127.0.0.1 (or targets --url) and sends --clients concurrent clients x "
                    "--requests requests each, half of them streaming, to both completion endpoints; checks the "
                    "/metrics counters against the per-response statistics.",
        formatter_class=DefaultsHelpFormatter)
    add_target_args(b)
    add_numerics_arg(b)
    b.add_argument("--draft", default="none", help="a draft directory, or 'none'")
    add_match_args(b)
    b.add_argument("--url", help="a running server (http://host:port) instead of starting one")
    b.add_argument("--clients", type=int, default=8, help="concurrent clients")
    b.add_argument("--requests", type=int, default=5, help="requests per client, one after another")
    b.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    b.add_argument("--tree-nodes", type=parse_tree_nodes, default="auto", help="'auto' or a fixed node count")
    add_decoding_args(b)
    b.set_defaults(func=cmd_bench_serve)
