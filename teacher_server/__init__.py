"""teacher_server: holds one teacher VLM on its device(s) and turns prepared samples into
distillation targets over HTTP — top-k log-probs + tail mass at the response positions and the
visual span, and the normalised visual autocorrelation (docs/design.md §4) — for the fill
(``logit_cache fill`` / ``ckd fill``, deploy/fill.py), which talks to it through ``client``.

Run: ``teacher_server serve --model DIR --device cuda:0 [--dtype bf16] [--port 8000]
[--token-file F]`` (or ``python -m teacher_server serve ...``). Endpoints: /healthz, /readyz,
/v1/info, /v1/tokenizer, POST /v1/targets (binary, see PROTOCOL.md), /metrics, /docs.

Layout: config (the typed ServerConfig) -> connections (deadlines, connection cap, under uvicorn)
-> service (body read, admission, validation) -> engines (hf: dynamic batching around
ckd_common.teacher.TeacherRunner; vllm: optional extra) ; routes (thin) ; app (lifespan, auth) ;
errors (the one mapping of failures to HTTP codes) ; cli (derived from ServerConfig) ; client (the
typed httpx client; no FastAPI). The protocol (PROTOCOL.md) lives in ckd_common: the JSON
models in ckd_common.protocol, the binary frames in ckd_common.wire.
"""
