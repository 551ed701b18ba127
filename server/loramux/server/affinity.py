"""Which adapter a call asks for, from its message and its metadata.

Balancers route by headers, not by message bodies: LoRAMux's client repeats the adapter
as `loramux-adapter` metadata (nginx `hash $http_loramux_adapter consistent`, Envoy
ring_hash on the header), and Ray Serve's model multiplexing sends `multiplexed_model_id`.
Either names the adapter of a message that names none; a message and metadata that name
different adapters are refused, since a balancer routed the call by one and the server
would serve the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loramux.core.errors import InvalidArgument

ADAPTER_METADATA = "loramux-adapter"
# A caller's sticky key for weighted aliases (versions.py): gRPC metadata or HTTP header.
ROUTE_KEY_METADATA = "loramux-route-key"
RAY_SERVE_METADATA = "multiplexed_model_id"


def requested_adapter(body: str, metadata: Mapping[str, str]) -> str:
    """The adapter reference a call names ("" for the base model)."""
    named = {key: metadata.get(key, "").strip() for key in (ADAPTER_METADATA, RAY_SERVE_METADATA)}
    named = {key: value for key, value in named.items() if value}
    choices = set(named.values())
    if len(choices) > 1:
        raise InvalidArgument(
            RAY_SERVE_METADATA,
            f"names {named[RAY_SERVE_METADATA]!r} but metadata {ADAPTER_METADATA} "
            f"names {named[ADAPTER_METADATA]!r}",
        )
    if not choices:
        return body
    (chosen,) = choices
    if body and body != chosen:
        key = ADAPTER_METADATA if ADAPTER_METADATA in named else RAY_SERVE_METADATA
        raise InvalidArgument(
            "adapter", f"is {body!r} but metadata {key} names {chosen!r}; send one adapter"
        )
    return chosen


def weighted_adapters(request: Any, metadata: Mapping[str, str]) -> list[tuple[str, float]]:
    """The (name, weight) entries of a GenerateRequest naming `adapters`.

    `adapter` and `adapters` are mutually exclusive; metadata for balancers, if any, must
    name one of the entries (the client sends the first).
    """
    if request.adapter:
        raise InvalidArgument("adapters", "set either adapter or adapters, not both")
    entries = [(entry.name, float(entry.weight)) for entry in request.adapters]
    chosen = requested_adapter("", metadata)
    if chosen and chosen not in {name for name, _ in entries}:
        raise InvalidArgument(
            ADAPTER_METADATA, f"names {chosen!r}, which is not among the request's adapters"
        )
    return entries
