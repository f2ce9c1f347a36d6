"""`confu serve`: the OpenAI-compatible server (`confu.serve`). The engine is imported inside the handler:
`confu --help` must stay fast."""

from __future__ import annotations

from typing import Any

from confu.cli.common import add_decoding_args, add_target_args


def cmd_serve(args) -> None:
    from confu.cli.generate import load_decoder
    from confu.engine.tree import TreeConfig
    from confu.errors import InputError
    from confu.serve.protocol import Defaults
    from confu.serve.server import ServeConfig, make_server

    if args.max_queue < 0:
        raise InputError(f"--max-queue must be >= 0 (got {args.max_queue})")
    decoder = load_decoder(args.target, args.draft)
    cfg = ServeConfig(
        model_name=args.served_model_name or args.target,
        defaults=Defaults(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k),
        tree=TreeConfig(total_nodes=args.tree_nodes, depth=args.depth, topk=args.topk),
        contemplate=args.contemplate,
        max_queue=args.max_queue,
    )
    try:
        server = make_server(decoder, cfg, args.host, args.port, verbose=args.verbose)
    except OSError as err:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from err
    host, port = server.server_address[:2]
    kind = "plain decoding" if args.draft == "none" else f"draft {args.draft}"
    print(f"serving {cfg.model_name!r} ({kind}) on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def add_parser(subparsers: Any) -> None:
    """`confu serve`."""
    s = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat / completions, streaming, /metrics)",
        description="The decoding flags are the defaults of requests that leave a parameter out. Requests are "
                    "decoded one at a time; up to --max-queue wait, more get 429.")
    add_target_args(s)
    s.add_argument("--draft", default="none",
                   help="a draft directory (confu, official / SpecForge or speculators EAGLE-3), or 'none'")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--served-model-name", default=None, help="the model id clients name (default: --target)")
    s.add_argument("--max-queue", type=int, default=16, help="requests that may wait for the engine")
    s.add_argument("--tree-nodes", type=int, default=60)
    add_decoding_args(s)
    s.add_argument("--verbose", action="store_true", help="log every request")
    s.set_defaults(func=cmd_serve)
