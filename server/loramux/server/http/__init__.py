"""The OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions, /v1/models.

It runs in the gRPC server's process on the same `ServerState` (engine, registry, keys,
tenant gate, metrics), so a tenant's quota and isolation hold whichever way it calls.
"""
