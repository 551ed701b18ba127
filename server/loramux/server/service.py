"""gRPC servicers: protobuf in, engine calls, protobuf out. No tensors here.

Every handler authenticates the caller, resolves adapter names within the caller's
tenant (another tenant's private adapter is NOT_FOUND, so nothing leaks), and turns the
shared error vocabulary (loramux.core.errors) into gRPC statuses, naming the offending
field in the `loramux-error-field` trailing metadata.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import grpc

from loramux.core.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LoramuxError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from loramux.server.affinity import requested_adapter, weighted_adapters
from loramux.server.engine import RequestStream
from loramux.server.generation import GenerationCall
from loramux.server.registry import (
    ALLOWED_FILES,
    REQUIRED_FILES,
    AdapterRecord,
    Quota,
    check_name,
    check_quota,
)
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from loramux.server.state import ServerState, register_record
from loramux.server.tenants import Authenticator, Principal
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_NEW_TOKENS = 64
FIELD_METADATA = "loramux-error-field"
FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
}
STATES = {
    "stored": pb.ADAPTER_STATE_STORED,
    "cpu": pb.ADAPTER_STATE_CPU,
    "device": pb.ADAPTER_STATE_DEVICE,
}


def finish_reason(event: TokenEvent) -> pb.FinishReason:
    """The wire value of an event's finish reason (UNSPECIFIED while unfinished)."""
    if event.finish_reason is None:
        return pb.FINISH_REASON_UNSPECIFIED
    return FINISH_REASONS.get(event.finish_reason, pb.FINISH_REASON_UNSPECIFIED)


NO_DEADLINE_SECONDS = 10**7  # gRPC reports "no deadline" as a huge number of seconds


def time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds until the client's deadline, or None when the client set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > NO_DEADLINE_SECONDS:
        return None
    return max(float(remaining), 0.0)


def abort(context: grpc.ServicerContext, error: LoramuxError) -> None:
    """End the call with the error's status; never returns."""
    if error.field:
        context.set_trailing_metadata(((FIELD_METADATA, error.field),))
    context.abort(grpc.StatusCode[error.code], str(error))


class _Base:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _authenticate(self, context: grpc.ServicerContext) -> Principal:
        return self.state.auth.authenticate(dict(context.invocation_metadata()))

    def _run(self, context: grpc.ServicerContext, handler: Callable[[Principal], T]) -> T:
        try:
            with self.state.tracked():
                return handler(self._authenticate(context))
        except LoramuxError as error:
            abort(context, error)
        except Exception as exc:
            if not context.is_active():  # the client went away (e.g. mid-upload): not a bug
                abort(context, Cancelled(None, "the client cancelled the call"))
            log.exception("unexpected error")  # a bug: report it as INTERNAL, keep serving
            abort(context, Internal(None, f"internal error ({type(exc).__name__})"))
        raise AssertionError("unreachable")

    def _adapter_info(self, record: AdapterRecord) -> pb.AdapterInfo:
        adapters = self.state.engine.adapters
        state = adapters.state(record.engine_id) if record.engine_id in adapters else "stored"
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
            state=STATES[state],
            public=record.public,
            created_at=record.created_at,
            use_rslora=record.use_rslora,
        )


def _chat(messages: pb.ChatMessages) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in messages.messages]


class InferenceServicer(_Base, pb_grpc.InferenceServiceServicer):
    def _prompt(self, request: pb.GenerateRequest | pb.TokenizeRequest) -> list[int]:
        engine = self.state.engine
        which = request.WhichOneof("input")
        if which in ("prompt", "text"):
            text = request.prompt if which == "prompt" else request.text  # type: ignore[union-attr]
            if not text:
                raise InvalidArgument(which, "is empty")
            return engine.tokenize(text)
        if which == "chat":
            return engine.render_chat(_chat(request.chat))
        raise InvalidArgument("input", "give `prompt` or `chat`")

    def _params(self, request: pb.GenerateRequest) -> SamplingParams:
        sampling = request.sampling
        params = SamplingParams(
            max_new_tokens=request.max_new_tokens
            if request.HasField("max_new_tokens")
            else DEFAULT_MAX_NEW_TOKENS,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
            top_k=sampling.top_k,
            repetition_penalty=sampling.repetition_penalty
            if sampling.HasField("repetition_penalty")
            else 1.0,
            seed=sampling.seed if sampling.HasField("seed") else None,
            stop=tuple(request.stop),
            stop_token_ids=tuple(request.stop_token_ids),
            ignore_eos=request.ignore_eos,
        )
        params.validate(self.state.settings.max_new_tokens_limit)
        return params

    @contextmanager
    def _generation(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext, call: GenerationCall
    ) -> Iterator[RequestStream]:
        """Validate, wait for a tenant slot, submit; the stream is cancelled when the call ends.

        A client that cancels or disconnects at any point frees what it holds: its place in
        the tenant's wait line at once, its engine row at the next engine step.
        """
        # The message's adapter, or the one its metadata names for balancers (affinity.py).
        metadata = dict(context.invocation_metadata())
        if request.adapters:
            adapter_id = call.resolve_weighted(weighted_adapters(request, metadata), "adapters")
        else:
            adapter_id = call.resolve(requested_adapter(request.adapter, metadata))
        params = self._params(request)
        prompt = self._prompt(request)
        remaining = time_left(context)
        if not context.add_callback(call.cancel):
            raise Cancelled(None, "the call ended before generation started")
        generation = GenerationRequest(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_token_ids=prompt,
            params=params,
            adapter_id=adapter_id,
            deadline=time.monotonic() + remaining if remaining is not None else None,
        )
        with call.submitted(generation, remaining) as stream:
            yield stream

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> pb.GenerateResponse:
        def handle(principal: Principal) -> pb.GenerateResponse:
            call = GenerationCall(self.state, principal)
            with call.recorded(), self._generation(request, context, call) as stream:
                text: list[str] = []
                tokens: list[int] = []
                for event in call.events(stream):
                    text.append(event.text)
                    tokens.extend(event.token_ids)
                return pb.GenerateResponse(
                    request_id=stream.request_id,
                    text="".join(text),
                    token_ids=tokens,
                    finish_reason=finish_reason(event),
                    usage=pb.Usage(
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                    ),
                )

        return self._run(context, handle)

    def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateStreamResponse]:
        try:
            with self.state.tracked():
                call = GenerationCall(self.state, self._authenticate(context))
                with call.recorded(), self._generation(request, context, call) as stream:
                    for event in call.events(stream):
                        message = pb.GenerateStreamResponse(
                            request_id=stream.request_id,
                            text=event.text,
                            token_ids=list(event.token_ids),
                        )
                        if event.finished:
                            message.finish_reason = finish_reason(event)
                            message.usage.prompt_tokens = event.prompt_tokens
                            message.usage.completion_tokens = event.completion_tokens
                        yield message
        except LoramuxError as error:
            abort(context, error)
        except Exception as exc:
            log.exception("unexpected error in GenerateStream")
            abort(context, Internal(None, f"internal error ({type(exc).__name__})"))

    def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfoResponse:
        def handle(principal: Principal) -> pb.ModelInfoResponse:
            info = self.state.engine.info
            return pb.ModelInfoResponse(
                base_model=info.base_model,
                base_model_reference=info.base_model_reference,
                quantization=info.quantization,
                device=info.device,
                context_length=info.context_length,
                max_rank=info.max_rank,
                max_new_tokens_limit=info.max_new_tokens_limit,
                max_batch_size=info.max_batch_size,
                max_loaded_adapters=info.max_loaded_adapters,
                max_upload_bytes=self.state.settings.max_upload_bytes,
                vocab_size=info.vocab_size,
            )

        return self._run(context, handle)

    def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.ServicerContext
    ) -> pb.TokenizeResponse:
        return self._run(context, lambda _: pb.TokenizeResponse(token_ids=self._prompt(request)))


class AdapterServicer(_Base, pb_grpc.AdapterServiceServicer):
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
        return self._adapter_info(record)

    def _exists(self, principal: Principal, name: str) -> None:
        try:
            self.state.registry.find(principal.tenant, name, for_write=True)
        except NotFound:
            return
        raise AlreadyExists(
            "name", f"adapter {name!r} exists; delete it first or pick another name"
        )

    def UploadAdapter(
        self, request_iterator: Iterator[pb.UploadAdapterRequest], context: grpc.ServicerContext
    ) -> pb.AdapterInfo:
        def handle(principal: Principal) -> pb.AdapterInfo:
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
            self._check_quota(principal, total)
            staged = self.state.registry.staging_dir()
            try:
                self._receive(request_iterator, declared, staged)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            return self._store(principal, name, staged, source="upload")

        return self._run(context, handle)

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

    def PullAdapter(
        self, request: pb.PullAdapterRequest, context: grpc.ServicerContext
    ) -> pb.AdapterInfo:
        def handle(principal: Principal) -> pb.AdapterInfo:
            name = check_name(request.name)
            if not request.repo_id or request.repo_id.count("/") != 1 or ".." in request.repo_id:
                raise InvalidArgument("repo_id", "must look like `owner/name`")
            self._exists(principal, name)
            self._check_quota(principal, 0)
            staged = self.state.registry.staging_dir()
            try:
                sha = download_from_hub(
                    request.repo_id,
                    request.revision or "main",
                    staged,
                    self.state.settings.max_upload_bytes,
                    self.state.settings.hub_endpoint,
                    token=request.hub_token or None,
                )
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            size = sum(p.stat().st_size for p in staged.iterdir() if p.is_file())
            limit = self.state.settings.max_upload_bytes
            try:
                if size > limit:  # the Hub's listing understated the sizes
                    raise ResourceExhausted(
                        "repo_id", f"adapter of {size} bytes exceeds the limit of {limit}"
                    )
                self._check_quota(principal, size)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            return self._store(
                principal, name, staged, source="hub", repo_id=request.repo_id, revision=sha
            )

        return self._run(context, handle)

    def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.ServicerContext
    ) -> pb.ListAdaptersResponse:
        def handle(principal: Principal) -> pb.ListAdaptersResponse:
            records = self.state.registry.visible_adapters(principal.tenant)
            return pb.ListAdaptersResponse(adapters=[self._adapter_info(r) for r in records])

        return self._run(context, handle)

    def GetAdapter(self, request: pb.AdapterRef, context: grpc.ServicerContext) -> pb.AdapterInfo:
        return self._run(
            context, lambda p: self._adapter_info(self.state.registry.find(p.tenant, request.name))
        )

    def DeleteAdapter(
        self, request: pb.AdapterRef, context: grpc.ServicerContext
    ) -> pb.DeleteAdapterResponse:
        def handle(principal: Principal) -> pb.DeleteAdapterResponse:
            record = self.state.registry.find(principal.tenant, request.name, for_write=True)
            # Engine first: requests already holding the adapter finish with it in memory,
            # new ones get NOT_FOUND; then the row and (if no one else shares them) the files.
            if record.engine_id in self.state.engine.adapters:
                self.state.engine.adapters.unregister(record.engine_id)
            self.state.registry.delete(record)
            return pb.DeleteAdapterResponse()

        return self._run(context, handle)

    def _engine_call(
        self, request: pb.AdapterRef, context: grpc.ServicerContext, action: str
    ) -> pb.AdapterInfo:
        def handle(principal: Principal) -> pb.AdapterInfo:
            record = self.state.registry.find(principal.tenant, request.name)
            if record.engine_id not in self.state.engine.adapters:
                register_record(self.state, record)
            remaining = time_left(context)
            getattr(self.state.engine.adapters, action)(
                record.engine_id, timeout=120.0 if remaining is None else remaining
            )
            return self._adapter_info(record)

        return self._run(context, handle)

    def LoadAdapter(self, request: pb.AdapterRef, context: grpc.ServicerContext) -> pb.AdapterInfo:
        return self._engine_call(request, context, "load")

    def UnloadAdapter(
        self, request: pb.AdapterRef, context: grpc.ServicerContext
    ) -> pb.AdapterInfo:
        return self._engine_call(request, context, "unload")


def download_from_hub(
    repo_id: str,
    revision: str,
    staged: Path,
    max_bytes: int,
    endpoint: str | None = None,
    *,
    token: str | None = None,
) -> str:
    """Fetch an adapter's files pinned to the commit `revision` resolves to; return the sha.

    Only the caller's `token` is sent; without one the pull is anonymous, so a tenant can
    never reach private repos through credentials the server process happens to hold.
    """
    credential: str | bool = token or False
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(endpoint=endpoint, token=credential)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True, token=credential)
        sha = info.sha
        if not sha:
            raise Unavailable("repo_id", "the Hub did not report a commit for this revision")
        files = {s.rfilename: s.size or 0 for s in info.siblings or []}
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            raise FailedPrecondition("repo_id", f"{repo_id}@{sha[:12]} has no {', '.join(missing)}")
        total = sum(size for name, size in files.items() if name in ALLOWED_FILES)
        if total > max_bytes:
            raise ResourceExhausted(
                "repo_id", f"adapter of {total} bytes exceeds the limit of {max_bytes}"
            )
        snapshot_download(
            repo_id,
            revision=sha,
            allow_patterns=list(ALLOWED_FILES),
            local_dir=str(staged),
            endpoint=endpoint,
            token=credential,
        )
    except LoramuxError:
        raise
    except HFValidationError as exc:
        raise InvalidArgument("repo_id", f"not a valid Hub repo id or revision: {exc}") from exc
    except RevisionNotFoundError as exc:
        raise NotFound("revision", f"{repo_id} has no revision {revision!r}") from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise NotFound("repo_id", f"no accessible Hub repo {repo_id!r}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise PermissionDenied("repo_id", f"the Hub refused access to {repo_id}") from exc
        raise Unavailable("repo_id", f"the Hub answered {status or 'with an error'}") from exc
    except Exception as exc:  # connection refused, DNS, timeouts, offline mode
        raise Unavailable("repo_id", f"the Hub is unreachable ({type(exc).__name__})") from exc
    shutil.rmtree(staged / ".cache", ignore_errors=True)
    return sha


class AdminServicer(_Base, pb_grpc.AdminServiceServicer):
    def _admin(self, context: grpc.ServicerContext, handler: Callable[[Principal], T]) -> T:
        def checked(principal: Principal) -> T:
            Authenticator.require_admin(principal)
            return handler(principal)

        return self._run(context, checked)

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
            ),
        )

    def CreateTenant(
        self, request: pb.CreateTenantRequest, context: grpc.ServicerContext
    ) -> pb.Tenant:
        def handle(_: Principal) -> pb.Tenant:
            default = self.state.registry.default_quota
            q = request.quota
            quota = Quota(
                q.max_concurrent or default.max_concurrent,
                q.max_queued or default.max_queued,
                q.max_adapters or default.max_adapters,
                q.max_bytes or default.max_bytes,
            )
            record = self.state.registry.create_tenant(
                request.name, admin=request.admin, quota=quota
            )
            return self._tenant(record.name)

        return self._admin(context, handle)

    def ListTenants(
        self, request: pb.ListTenantsRequest, context: grpc.ServicerContext
    ) -> pb.ListTenantsResponse:
        return self._admin(
            context,
            lambda _: pb.ListTenantsResponse(
                tenants=[self._tenant(t.name) for t in self.state.registry.tenants()]
            ),
        )

    def CreateKey(
        self, request: pb.CreateKeyRequest, context: grpc.ServicerContext
    ) -> pb.CreateKeyResponse:
        def handle(_: Principal) -> pb.CreateKeyResponse:
            key_id, key = self.state.registry.create_key(check_name(request.tenant, "tenant"))
            return pb.CreateKeyResponse(key_id=key_id, key=key)

        return self._admin(context, handle)

    def RevokeKey(
        self, request: pb.RevokeKeyRequest, context: grpc.ServicerContext
    ) -> pb.RevokeKeyResponse:
        def handle(_: Principal) -> pb.RevokeKeyResponse:
            self.state.registry.revoke_key(request.key_id)
            return pb.RevokeKeyResponse()

        return self._admin(context, handle)

    def SetAdapterPublic(
        self, request: pb.SetAdapterPublicRequest, context: grpc.ServicerContext
    ) -> pb.AdapterInfo:
        def handle(_: Principal) -> pb.AdapterInfo:
            record = self.state.registry.set_public(request.owner, request.name, request.public)
            return self._adapter_info(record)

        return self._admin(context, handle)
