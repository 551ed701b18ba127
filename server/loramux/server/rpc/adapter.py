"""AdapterService: upload, pull from the Hub, list, inspect, delete, load and unload."""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import grpc

from loramux.core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from loramux.server.hub import HubClient
from loramux.server.registry import (
    ALLOWED_FILES,
    REQUIRED_FILES,
    AdapterRecord,
    check_name,
    check_quota,
)
from loramux.server.rpc.wrapper import Servicer, rpc, time_left
from loramux.server.state import ServerState, register_record
from loramux.server.tenants import Principal
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STATES = {
    "stored": pb.ADAPTER_STATE_STORED,
    "cpu": pb.ADAPTER_STATE_CPU,
    "device": pb.ADAPTER_STATE_DEVICE,
}


def adapter_info(state: ServerState, record: AdapterRecord) -> pb.AdapterInfo:
    """A stored adapter as the API shows it, with where it lives right now."""
    adapters = state.engine.adapters
    where = adapters.state(record.engine_id) if record.engine_id in adapters else "stored"
    return pb.AdapterInfo(
        id=record.digest,
        name=record.name,
        owner=record.owner,
        source=pb.ADAPTER_SOURCE_HUB if record.source == "hub" else pb.ADAPTER_SOURCE_UPLOAD,
        repo_id=record.repo_id or "",
        revision=record.revision or "",
        sha256=record.sha256,
        rank=record.rank,
        alpha=record.alpha,
        target_modules=list(record.target_modules),
        size_bytes=record.size_bytes,
        state=STATES[where],
        public=record.public,
        created_at=record.created_at,
        use_rslora=record.use_rslora,
    )


class AdapterServicer(Servicer, pb_grpc.AdapterServiceServicer):
    def _check_quota(self, principal: Principal, add_bytes: int) -> None:
        """Early refusal before bytes move; `Registry.commit` checks again atomically."""
        count, used = self.state.registry.usage(principal.tenant)
        check_quota(principal.quota, count, used, add_bytes)

    def _store(
        self, principal: Principal, name: str, staged: Path, **source: Any
    ) -> pb.AdapterInfo:
        """Check staged files against the base model, publish them, register with the engine."""
        state = self.state
        try:
            spec = state.engine.adapters.validate(staged)
            record = state.registry.commit(
                principal.tenant,
                name,
                staged,
                rank=spec.rank,
                alpha=spec.alpha,
                use_rslora=spec.use_rslora,
                target_modules=spec.target_modules,
                quota=principal.quota,
                **source,
            )
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        state.engine.adapters.register(record.engine_id, state.registry.path_of(record), spec=spec)
        log.info(
            "stored adapter %s/%s (%s, %d bytes)",
            record.owner,
            name,
            record.source,
            record.size_bytes,
        )
        return adapter_info(self.state, record)

    def _exists(self, principal: Principal, name: str) -> None:
        try:
            self.state.registry.find(principal.tenant, name, for_write=True)
        except NotFound:
            return
        raise AlreadyExists(
            "name", f"adapter {name!r} exists; delete it first or pick another name"
        )

    @rpc
    def UploadAdapter(
        self,
        request_iterator: Iterator[pb.UploadAdapterRequest],
        context: grpc.ServicerContext,
        principal: Principal,
    ) -> pb.AdapterInfo:
        limit = self.state.settings.max_upload_bytes
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("header", "the first message must be the upload header")
        header = first.header
        name = check_name(header.name)
        declared: dict[str, pb.FileEntry] = {}
        for i, entry in enumerate(header.files):
            if entry.path not in ALLOWED_FILES:
                raise InvalidArgument(
                    f"files[{i}].path", f"must be one of {', '.join(ALLOWED_FILES)}"
                )
            if entry.path in declared:
                raise InvalidArgument(f"files[{i}].path", f"{entry.path} listed twice")
            if len(entry.sha256) != 64:
                raise InvalidArgument(f"files[{i}].sha256", "must be 64 hex digits")
            declared[entry.path] = entry
        missing = [f for f in REQUIRED_FILES if f not in declared]
        if missing:
            raise InvalidArgument("files", f"missing {', '.join(missing)}")
        total = sum(e.size for e in declared.values())
        if total > limit:
            raise ResourceExhausted(
                "files", f"upload of {total} bytes exceeds the limit of {limit}"
            )
        self._exists(principal, name)
        # The declared bytes count against the byte quota from now until stored or refused.
        with self.state.registry.staged_bytes(principal.tenant, total, principal.quota):
            staged = self.state.registry.staging_dir()
            try:
                self._receive(request_iterator, declared, staged)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            return self._store(principal, name, staged, source="upload")

    @staticmethod
    def _receive(
        chunks: Iterator[pb.UploadAdapterRequest], declared: dict[str, pb.FileEntry], staged: Path
    ) -> None:
        handles: dict[str, BinaryIO] = {}
        hashes = {path: hashlib.sha256() for path in declared}
        sizes = dict.fromkeys(declared, 0)
        try:
            for message in chunks:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("header", "only one header, before the chunks")
                chunk = message.chunk
                if chunk.path not in declared:
                    raise InvalidArgument(
                        "chunk.path", f"{chunk.path!r} was not declared in the header"
                    )
                sizes[chunk.path] += len(chunk.data)
                if sizes[chunk.path] > declared[chunk.path].size:
                    raise InvalidArgument("chunk.data", f"{chunk.path} is larger than declared")
                if chunk.path not in handles:
                    handles[chunk.path] = (staged / chunk.path).open("wb")
                handles[chunk.path].write(chunk.data)
                hashes[chunk.path].update(chunk.data)
        finally:
            for handle in handles.values():
                handle.close()
        for path, entry in declared.items():
            if sizes[path] != entry.size:
                raise InvalidArgument(
                    "files", f"{path}: got {sizes[path]} bytes, declared {entry.size}"
                )
            if hashes[path].hexdigest() != entry.sha256.lower():
                raise InvalidArgument("files", f"{path}: sha256 does not match the header")
            if entry.size == 0:
                (staged / path).touch()

    @rpc
    def PullAdapter(
        self,
        request: pb.PullAdapterRequest,
        context: grpc.ServicerContext,
        principal: Principal,
    ) -> pb.AdapterInfo:
        name = check_name(request.name)
        if not request.repo_id or request.repo_id.count("/") != 1 or ".." in request.repo_id:
            raise InvalidArgument("repo_id", "must look like `owner/name`")
        self._exists(principal, name)
        self._check_quota(principal, 0)
        hub = HubClient(self.state.settings.hub_endpoint, request.hub_token or None)
        listing = hub.resolve(
            request.repo_id, request.revision or "main", self.state.settings.max_upload_bytes
        )
        with self.state.registry.staged_bytes(
            principal.tenant, listing.size_bytes, principal.quota
        ):
            staged = self.state.registry.staging_dir()
            try:
                hub.download(listing, staged)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            return self._store(
                principal,
                name,
                staged,
                source="hub",
                repo_id=request.repo_id,
                revision=listing.sha,
            )

    @rpc
    def ListAdapters(
        self,
        request: pb.ListAdaptersRequest,
        context: grpc.ServicerContext,
        principal: Principal,
    ) -> pb.ListAdaptersResponse:
        records = self.state.registry.visible_adapters(principal.tenant)
        return pb.ListAdaptersResponse(adapters=[adapter_info(self.state, r) for r in records])

    @rpc
    def GetAdapter(
        self, request: pb.AdapterRef, context: grpc.ServicerContext, principal: Principal
    ) -> pb.AdapterInfo:
        return adapter_info(self.state, self.state.registry.find(principal.tenant, request.name))

    @rpc
    def DeleteAdapter(
        self,
        request: pb.AdapterRef,
        context: grpc.ServicerContext,
        principal: Principal,
    ) -> pb.DeleteAdapterResponse:
        record = self.state.registry.find(principal.tenant, request.name, for_write=True)
        # Engine first: requests already holding the adapter finish with it in memory,
        # new ones get NOT_FOUND; then the row and (if no one else shares them) the files.
        if record.engine_id in self.state.engine.adapters:
            self.state.engine.adapters.unregister(record.engine_id)
        self.state.registry.delete(record)
        return pb.DeleteAdapterResponse()

    def _engine_call(
        self,
        request: pb.AdapterRef,
        context: grpc.ServicerContext,
        principal: Principal,
        action: str,
    ) -> pb.AdapterInfo:
        record = self.state.registry.find(principal.tenant, request.name)
        if record.owner != principal.tenant and not principal.admin:
            # A public adapter is for everyone's requests; where it lives (device slot, CPU,
            # disk) is its owner's or an admin's call, else one tenant evicts it for all.
            raise PermissionDenied(
                "name",
                f"{record.owner}/{record.name} is {record.owner}'s adapter: only its owner "
                f"or an admin may {action} it",
            )
        if record.engine_id not in self.state.engine.adapters:
            register_record(self.state, record)
        remaining = time_left(context)
        getattr(self.state.engine.adapters, action)(
            record.engine_id, timeout=120.0 if remaining is None else remaining
        )
        return adapter_info(self.state, record)

    @rpc
    def LoadAdapter(
        self, request: pb.AdapterRef, context: grpc.ServicerContext, principal: Principal
    ) -> pb.AdapterInfo:
        return self._engine_call(request, context, principal, "load")

    @rpc
    def UnloadAdapter(
        self, request: pb.AdapterRef, context: grpc.ServicerContext, principal: Principal
    ) -> pb.AdapterInfo:
        return self._engine_call(request, context, principal, "unload")
