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

from loramux.core.errors import InvalidArgument

ADAPTER_METADATA = "loramux-adapter"
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
