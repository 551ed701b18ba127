"""LoRAMux Python client: sync and asyncio gRPC clients and the client CLI.

from loramux.client import LoramuxClient
with LoramuxClient("127.0.0.1:50051", api_key="lmx_...") as client:
    print(client.generate(messages=[("user", "Hi")], adapter="my-adapter").text)
"""

from loramux.client.client import (
    Adapter,
    AsyncLoramuxClient,
    Chunk,
    Completion,
    Logprob,
    LoramuxClient,
    to_error,
)
from loramux.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LoramuxError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "Adapter",
    "AlreadyExists",
    "AsyncLoramuxClient",
    "Cancelled",
    "Chunk",
    "Completion",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "Logprob",
    "LoramuxClient",
    "LoramuxError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "to_error",
]
