"""`confu serve`: an OpenAI-compatible HTTP server. `server` is the HTTP layer (FastAPI, run by uvicorn),
`generation` the engine side (the request queue, round-by-round decoding, cancellation, stop sequences),
`protocol` the request and response shapes, `metrics` the Prometheus metrics with per-request speculative-decoding
statistics."""
