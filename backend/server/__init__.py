"""The ImFace++ backend server (ZeroMQ; protocol in `addon.link.protocol`, docs/protocol.md, docs/server.md).

`python -m backend.server serve ...` / `imface serve`; `imface keygen`. Modules:
`server` (request loop), `engine` (decode thread), `jobs` (worker and training processes),
`model_service` (every model-facing import), `decoders` (warm decoders, frame cache), `uploads`,
`paths` (allowed roots), `security` (keys, bind rule), `worker`
(the worker process), `pipe` (its channel), `cli`.
"""
