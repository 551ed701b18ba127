"""The gRPC front end: one module per service, one wrapper shared by every handler.

Protobuf in, transport-neutral calls (state, generation, hub) in between, protobuf out.
No tensors here.
"""

from loramux.server.rpc.adapter import AdapterServicer
from loramux.server.rpc.admin import AdminServicer
from loramux.server.rpc.inference import InferenceServicer

__all__ = ["AdapterServicer", "AdminServicer", "InferenceServicer"]
