"""AdapterService: upload, pull from the Hub, list, inspect, delete, load and unload."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import grpc

from loramux.core.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from loramux.server.hub import HubClient
from loramux.server.listing import AdapterQuery, page_size
from loramux.server.registry import (
    ALLOWED_FILES,
    NAME_PATTERN,
    REQUIRED_FILES,
    AdapterRecord,
    check_name,
    check_quota,
    sha256_file,
)
from loramux.server.rpc.wrapper import Servicer, rpc, time_left
from loramux.server.state import ServerState, register_record
from loramux.server.tenants import Principal
from loramux.server.versions import (
    Split,
    VersionMetadata,
    check_alias,
    check_evaluations,
    version_number,
)
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DOWNLOAD_CHUNK_BYTES = 1 << 20  # one DownloadAdapter message: well under gRPC's 4 MiB
SOURCES = {pb.ADAPTER_SOURCE_UPLOAD: "upload", pb.ADAPTER_SOURCE_HUB: "hub"}

STATES = {
    "stored": pb.ADAPTER_STATE_STORED,
    "cpu": pb.ADAPTER_STATE_CPU,
    "device": pb.ADAPTER_STATE_DEVICE,
}


def adapter_info(state: ServerState, record: AdapterRecord) -> pb.AdapterInfo:
    """A stored version as the API shows it, with where it lives right now."""
    adapters = state.engine.adapters
    registry = state.registry
    where = adapters.state(record.engine_id) if record.engine_id in adapters else "stored"
    aliases = registry.aliases(record.owner, record.name)
    return pb.AdapterInfo(
        version=record.version,
        aliases=[a for a, split in aliases.items() if record.version in split.versions],
        metadata=pb.AdapterMetadata(
            description=record.description, tags=record.tags, base_model=record.base_model
        ),
        evaluations=[pb.Evaluation(name=n, value=v) for n, v in registry.evaluations(record)],
        has_model_card=(registry.path_of(record) / "README.md").is_file(),
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


def _metadata(message: pb.AdapterMetadata, field: str) -> VersionMetadata:
    return VersionMetadata(
        description=message.description, tags=tuple(message.tags), base_model=message.base_model
    ).checked(field)


def _alias(name: str, split: Split) -> pb.Alias:
    return pb.Alias(
        name=name, targets=[pb.AliasTarget(version=f"v{v}", weight=w) for v, w in split.targets]
    )


@dataclass(frozen=True)
class _UploadHeader:
    name: str
    declared: dict[str, pb.FileEntry]
    total: int
    metadata: VersionMetadata


def _upload_header(first: pb.UploadAdapterRequest | None, limit: int) -> _UploadHeader:
    """The upload's first message, checked: name, declared files, total size, metadata."""
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("header", "the first message must be the upload header")
    header = first.header
    name = check_name(header.name)
    declared: dict[str, pb.FileEntry] = {}
    for i, entry in enumerate(header.files):
        if entry.path not in ALLOWED_FILES:
            raise InvalidArgument(f"files[{i}].path", f"must be one of {', '.join(ALLOWED_FILES)}")
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
        raise ResourceExhausted("files", f"upload of {total} bytes exceeds the limit of {limit}")
    return _UploadHeader(name, declared, total, _metadata(header.metadata, "header.metadata"))


class _Receiver:
    """An upload's chunks into the staging folder, sizes and hashes checked (blocking: on
    the pool); closes its files when the `with` block ends."""

    def __init__(self, declared: dict[str, pb.FileEntry], staged: Path) -> None:
        self.declared, self.staged = declared, staged
        self.handles: dict[str, BinaryIO] = {}
        self.hashes = {path: hashlib.sha256() for path in declared}
        self.sizes = dict.fromkeys(declared, 0)

    def __enter__(self) -> _Receiver:
        return self

    def __exit__(self, *_: object) -> None:
        for handle in self.handles.values():
            handle.close()

    def write(self, message: pb.UploadAdapterRequest) -> None:
        if message.WhichOneof("part") != "chunk":
            raise InvalidArgument("header", "only one header, before the chunks")
        chunk = message.chunk
        if chunk.path not in self.declared:
            raise InvalidArgument("chunk.path", f"{chunk.path!r} was not declared in the header")
        self.sizes[chunk.path] += len(chunk.data)
        if self.sizes[chunk.path] > self.declared[chunk.path].size:
            raise InvalidArgument("chunk.data", f"{chunk.path} is larger than declared")
        if chunk.path not in self.handles:
            self.handles[chunk.path] = (self.staged / chunk.path).open("wb")
        self.handles[chunk.path].write(chunk.data)
        self.hashes[chunk.path].update(chunk.data)

    def check(self) -> None:
        """After the last chunk (files closed): every file whole and as declared."""
        for path, entry in self.declared.items():
            if self.sizes[path] != entry.size:
                raise InvalidArgument(
                    "files", f"{path}: got {self.sizes[path]} bytes, declared {entry.size}"
                )
            if self.hashes[path].hexdigest() != entry.sha256.lower():
                raise InvalidArgument("files", f"{path}: sha256 does not match the header")
            if entry.size == 0:
                (self.staged / path).touch()


class AdapterServicer(Servicer, pb_grpc.AdapterServiceServicer):
    def _check_quota(self, principal: Principal, add_bytes: int) -> None:
        """Early refusal before bytes move; `Registry.commit` checks again atomically."""
        count, used = self.state.registry.usage(principal.tenant)
        check_quota(principal.quota, count, used, add_bytes)

    def _store(
        self,
        principal: Principal,
        name: str,
        staged: Path,
        metadata: VersionMetadata,
        **source: Any,
    ) -> pb.AdapterInfo:
        """Check staged files against the base model, publish them as the name's next
        version, register with the engine."""
        state = self.state
        try:
            spec = state.engine.adapters.validate(staged)
            if not metadata.base_model and spec.base_model_name_or_path:
                metadata = replace(metadata, base_model=spec.base_model_name_or_path[:256])
            record = state.registry.commit(
                principal.tenant,
                name,
                staged,
                rank=spec.rank,
                alpha=spec.alpha,
                use_rslora=spec.use_rslora,
                target_modules=spec.target_modules,
                quota=principal.quota,
                metadata=metadata,
                **source,
            )
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        state.engine.adapters.register(record.engine_id, state.registry.path_of(record), spec=spec)
        log.info(
            "stored adapter %s (%s, %d bytes)",
            record.ref,
            record.source,
            record.size_bytes,
        )
        return adapter_info(self.state, record)

    @rpc
    async def UploadAdapter(
        self,
        request_iterator: AsyncIterator[pb.UploadAdapterRequest],
        context: grpc.aio.ServicerContext,
        principal: Principal,
    ) -> pb.AdapterInfo:
        """Each chunk is awaited on the event loop (a slow uploader holds no thread), then
        written on the pool; the staged files are checked and stored on the pool."""
        header = _upload_header(
            await anext(request_iterator, None), self.state.settings.max_upload_bytes
        )
        loop, pool, registry = asyncio.get_running_loop(), self.executor, self.state.registry
        # The declared bytes count against the byte quota from now until stored or refused.
        with ExitStack() as held:
            hold = registry.staged_bytes(principal.tenant, header.total, principal.quota)
            await loop.run_in_executor(pool, held.enter_context, hold)
            staged = await loop.run_in_executor(pool, registry.staging_dir)
            try:
                with _Receiver(header.declared, staged) as receiver:
                    async for message in request_iterator:
                        await loop.run_in_executor(pool, receiver.write, message)
                await loop.run_in_executor(pool, receiver.check)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            store = functools.partial(
                self._store, principal, header.name, staged, header.metadata, source="upload"
            )
            return await loop.run_in_executor(pool, store)

    @rpc
    def PullAdapter(
        self,
        request: pb.PullAdapterRequest,
        context: grpc.aio.ServicerContext,
        principal: Principal,
    ) -> pb.AdapterInfo:
        name = check_name(request.name)
        if not request.repo_id or request.repo_id.count("/") != 1 or ".." in request.repo_id:
            raise InvalidArgument("repo_id", "must look like `owner/name`")
        metadata = _metadata(request.metadata, "metadata")
        self._check_quota(principal, 0)
        hub = HubClient(self.state.settings.hub_endpoint, request.hub_token or None)
        listing = hub.resolve(
            request.repo_id, request.revision or "main", self.state.settings.max_upload_bytes
        )
        with self.state.registry.staged_bytes(
            principal.tenant, listing.size_bytes or 0, principal.quota
        ) as held:
            staged = self.state.registry.staging_dir()
            try:
                hub.download(
                    listing, staged, self.state.settings.max_upload_bytes, arrived=held.cover
                )
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            return self._store(
                principal,
                name,
                staged,
                metadata,
                source="hub",
                repo_id=request.repo_id,
                revision=listing.sha,
            )

    @rpc
    def ListAdapters(
        self,
        request: pb.ListAdaptersRequest,
        context: grpc.aio.ServicerContext,
        principal: Principal,
    ) -> pb.ListAdaptersResponse:
        registry = self.state.registry
        size = page_size(request.page_size)
        query = AdapterQuery(
            tenant=principal.tenant,
            name_prefix=request.name_prefix,
            owner=request.owner,
            public=request.public if request.HasField("public") else None,
            source=SOURCES.get(request.source, ""),
        )
        if len(query.name_prefix) > 64:
            raise InvalidArgument("name_prefix", "at most 64 characters")
        if query.owner and not NAME_PATTERN.match(query.owner):
            raise InvalidArgument("owner", "not a tenant name")
        fingerprint = query.fingerprint()
        after = registry.page_tokens().read(request.page_token, fingerprint)
        start = (str(after[0]), str(after[1])) if after else None
        names = registry.list_names(query, size + 1, start)
        page, more = names[:size], len(names) > size
        token = registry.page_tokens().make(fingerprint, list(page[-1])) if more else ""
        records = registry.served_versions(page)
        return pb.ListAdaptersResponse(
            adapters=[adapter_info(self.state, r) for r in records], next_page_token=token
        )

    @rpc
    def ListAdapterVersions(
        self,
        request: pb.ListAdapterVersionsRequest,
        context: grpc.aio.ServicerContext,
        principal: Principal,
    ) -> pb.ListAdapterVersionsResponse:
        registry = self.state.registry
        size = page_size(request.page_size)
        if "@" in request.name:
            raise InvalidArgument("name", "give the adapter's name without a version")
        record = registry.find(principal.tenant, request.name, field="name")
        fingerprint = f"versions\0{principal.tenant}\0{record.owner}/{record.name}"
        after = registry.page_tokens().read(request.page_token, fingerprint)
        start = int(after[0]) if after else 0  # type: ignore[call-overload]
        versions = registry.list_versions(record.owner, record.name, size + 1, start)
        page, more = versions[:size], len(versions) > size
        token = registry.page_tokens().make(fingerprint, [page[-1].version]) if more else ""
        return pb.ListAdapterVersionsResponse(
            versions=[adapter_info(self.state, r) for r in page],
            next_page_token=token,
            aliases=[
                _alias(name, split)
                for name, split in registry.aliases(record.owner, record.name).items()
            ],
        )

    @rpc
    def GetAdapter(
        self, request: pb.AdapterRef, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.AdapterInfo:
        return adapter_info(
            self.state,
            self.state.registry.find(
                principal.tenant, request.name, admin=principal.admin, field="name"
            ),
        )

    @rpc
    def DeleteAdapter(
        self,
        request: pb.AdapterRef,
        context: grpc.aio.ServicerContext,
        principal: Principal,
    ) -> pb.DeleteAdapterResponse:
        registry, engine = self.state.registry, self.state.engine.adapters
        selector = request.name.partition("@")[2]
        if selector and version_number(selector) is None:
            raise InvalidArgument(
                "name", "delete a name or one version ('name@v3'); an alias goes with DeleteAlias"
            )
        record = registry.find(
            principal.tenant, request.name, for_write=True, admin=principal.admin, field="name"
        )
        if selector:
            registry.delete_version(record)  # refused while an alias points at it
            if (
                record.engine_id
                not in {r.engine_id for r in registry.versions(record.owner, record.name)}
                and record.engine_id in engine
            ):
                engine.unregister(record.engine_id)
            return pb.DeleteAdapterResponse()
        # Engine first: requests already holding the adapter finish with it in memory,
        # new ones get NOT_FOUND; then the rows and (if no one else shares them) the files.
        for version in registry.versions(record.owner, record.name):
            if version.engine_id in engine:
                engine.unregister(version.engine_id)
        registry.delete(record)
        return pb.DeleteAdapterResponse()

    def _own_name(self, principal: Principal, ref: str) -> AdapterRecord:
        """The name an alias call changes: the caller's own (an admin: anyone's)."""
        if "@" in ref:
            raise InvalidArgument("name", "give the adapter's name without a version or alias")
        return self.state.registry.find(
            principal.tenant, ref, for_write=True, admin=principal.admin, field="name"
        )

    @rpc
    def SetAlias(
        self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.SetAliasResponse:
        alias = check_alias(request.alias)
        split = Split.parse([(t.version, t.weight) for t in request.targets])
        record = self._own_name(principal, request.name)
        previous = self.state.registry.set_alias(record.owner, record.name, alias, split)
        log.info("alias %s/%s@%s -> %s", record.owner, record.name, alias, split.describe())
        return pb.SetAliasResponse(
            alias=_alias(alias, split),
            previous=_alias(alias, previous) if previous else pb.Alias(name=alias),
        )

    @rpc
    def RollbackAlias(
        self, request: pb.AliasRef, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.SetAliasResponse:
        record = self._own_name(principal, request.name)
        registry = self.state.registry
        before = registry.aliases(record.owner, record.name).get(request.alias)
        split = registry.rollback_alias(record.owner, record.name, request.alias)
        log.info("alias %s/%s@%s rolled back to %s", record.owner, record.name, request.alias,
                 split.describe())  # fmt: skip
        return pb.SetAliasResponse(
            alias=_alias(request.alias, split),
            previous=_alias(request.alias, before) if before else pb.Alias(name=request.alias),
        )

    @rpc
    def DeleteAlias(
        self, request: pb.AliasRef, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.DeleteAliasResponse:
        record = self._own_name(principal, request.name)
        self.state.registry.delete_alias(record.owner, record.name, request.alias)
        return pb.DeleteAliasResponse()

    @rpc
    def DownloadAdapter(
        self, request: pb.AdapterRef, context: grpc.aio.ServicerContext, principal: Principal
    ) -> Iterator[pb.DownloadAdapterResponse]:
        record = self.state.registry.find(
            principal.tenant, request.name, admin=principal.admin, field="name"
        )
        folder = self.state.registry.path_of(record)
        yield pb.DownloadAdapterResponse(info=adapter_info(self.state, record))
        for name in ALLOWED_FILES:
            path = folder / name
            if not path.is_file():
                continue
            with path.open("rb") as fh:
                yield pb.DownloadAdapterResponse(
                    file=pb.FileEntry(path=name, size=path.stat().st_size, sha256=sha256_file(path))
                )
                while block := fh.read(DOWNLOAD_CHUNK_BYTES):
                    yield pb.DownloadAdapterResponse(chunk=pb.FileChunk(path=name, data=block))

    @rpc
    def AddEvaluations(
        self,
        request: pb.AddEvaluationsRequest,
        context: grpc.aio.ServicerContext,
        principal: Principal,
    ) -> pb.AdapterInfo:
        results = check_evaluations([(e.name, e.value) for e in request.evaluations])
        registry = self.state.registry
        record = registry.find(
            principal.tenant, request.name, for_write=True, admin=principal.admin, field="name"
        )
        registry.add_evaluations(record, results)
        return adapter_info(self.state, record)

    def _engine_call(
        self,
        request: pb.AdapterRef,
        context: grpc.aio.ServicerContext,
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
        self, request: pb.AdapterRef, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.AdapterInfo:
        return self._engine_call(request, context, principal, "load")

    @rpc
    def UnloadAdapter(
        self, request: pb.AdapterRef, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.AdapterInfo:
        return self._engine_call(request, context, principal, "unload")
