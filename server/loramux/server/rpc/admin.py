"""AdminService: tenants, their keys and quotas, and which adapters are public."""

from __future__ import annotations

import grpc

from loramux.server.registry import Quota, check_name
from loramux.server.rpc.adapter import adapter_info
from loramux.server.rpc.wrapper import Servicer, admin_rpc
from loramux.server.tenants import Principal
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc


class AdminServicer(Servicer, pb_grpc.AdminServiceServicer):
    def _tenant(self, name: str) -> pb.Tenant:
        record = self.state.registry.tenant(name)
        q = record.quota
        return pb.Tenant(
            name=record.name,
            admin=record.admin,
            quota=pb.TenantQuota(
                max_concurrent=q.max_concurrent,
                max_queued=q.max_queued,
                max_adapters=q.max_adapters,
                max_bytes=q.max_bytes,
                requests_per_minute=q.requests_per_minute,
                tokens_per_minute=q.tokens_per_minute,
            ),
        )

    @admin_rpc
    def CreateTenant(
        self,
        request: pb.CreateTenantRequest,
        context: grpc.aio.ServicerContext,
        principal: Principal,
    ) -> pb.Tenant:
        default = self.state.registry.default_quota
        q = request.quota
        quota = Quota(
            q.max_concurrent or default.max_concurrent,
            q.max_queued or default.max_queued,
            q.max_adapters or default.max_adapters,
            q.max_bytes or default.max_bytes,
            # 0 stays 0: the server's default budget, read at each request (rates.py)
            q.requests_per_minute,
            q.tokens_per_minute,
        )
        record = self.state.registry.create_tenant(request.name, admin=request.admin, quota=quota)
        return self._tenant(record.name)

    @admin_rpc
    def ListTenants(
        self,
        request: pb.ListTenantsRequest,
        context: grpc.aio.ServicerContext,
        principal: Principal,
    ) -> pb.ListTenantsResponse:
        return pb.ListTenantsResponse(
            tenants=[self._tenant(t.name) for t in self.state.registry.tenants()]
        )

    @admin_rpc
    def CreateKey(
        self, request: pb.CreateKeyRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.CreateKeyResponse:
        key_id, key = self.state.registry.create_key(check_name(request.tenant, "tenant"))
        return pb.CreateKeyResponse(key_id=key_id, key=key)

    @admin_rpc
    def RevokeKey(
        self, request: pb.RevokeKeyRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.RevokeKeyResponse:
        self.state.registry.revoke_key(request.key_id)
        return pb.RevokeKeyResponse()

    @admin_rpc
    def SetAdapterPublic(
        self,
        request: pb.SetAdapterPublicRequest,
        context: grpc.aio.ServicerContext,
        principal: Principal,
    ) -> pb.AdapterInfo:
        record = self.state.registry.set_public(request.owner, request.name, request.public)
        return adapter_info(self.state, record)
