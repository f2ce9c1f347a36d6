"""`confu serve`: an OpenAI-compatible HTTP server (`server`), its request and response shapes (`protocol`) and
its Prometheus metrics with per-request speculative-decoding statistics (`metrics`)."""
