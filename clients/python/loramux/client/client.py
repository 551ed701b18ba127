"""Synchronous and asyncio clients for a LoRAMux server.

Failures come back as the same exception classes the server raises
(`loramux.errors`), with the offending request field in `.field`. Calls that a
draining or restarting server answers with UNAVAILABLE are retried with backoff.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from loramux.errors import ERRORS_BY_CODE, Internal, LoramuxError
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

T = TypeVar("T")
CHUNK_BYTES = 1 << 20
# The adapter again as metadata, for balancers that route by header (nginx
# `hash $http_loramux_adapter consistent`, Envoy ring_hash): one adapter stays on few
# replicas and keeps its device slot warm there.
ADAPTER_METADATA = "loramux-adapter"
UPLOAD_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
}
STATES = {
    pb.ADAPTER_STATE_STORED: "stored",
    pb.ADAPTER_STATE_CPU: "cpu",
    pb.ADAPTER_STATE_DEVICE: "device",
}


def to_error(error: grpc.RpcError) -> LoramuxError:
    """A gRPC failure as the shared exception class for its status."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    field_name = None
    for key, value in (
        (error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else ()
    ):
        if key == "loramux-error-field":
            field_name = value
    cls = ERRORS_BY_CODE.get(code.name, Internal)
    message = details or code.name
    if field_name and message.startswith(f"{field_name}: "):
        message = message[len(field_name) + 2 :]
    return cls(field_name, message)


@dataclass(frozen=True)
class Logprob:
    """A token's log-probability where it stands (the model's raw log_softmax) and, when
    asked, the most likely tokens there (best first, without `top` of their own)."""

    token_id: int
    logprob: float
    text: str
    top: list[Logprob] = field(default_factory=list)

    @classmethod
    def from_pb(cls, message: pb.TokenLogprob) -> Logprob:
        return cls(
            message.token_id,
            message.logprob,
            message.text,
            [cls(t.token_id, t.logprob, t.text) for t in message.top],
        )


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    request_id: str
    logprobs: list[Logprob] = field(default_factory=list)  # per token_ids entry, when asked
    # the prompt's tokens from the second on, when asked (prompt_logprobs=)
    prompt_logprobs: list[Logprob] = field(default_factory=list)


@dataclass(frozen=True)
class Chunk:
    """One streamed piece; the last one has `finish_reason` and the token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob] = field(default_factory=list)


@dataclass(frozen=True)
class Adapter:
    id: str
    name: str
    owner: str
    source: str
    repo_id: str
    revision: str
    sha256: str
    rank: int
    alpha: float
    target_modules: list[str] = field(default_factory=list)
    size_bytes: int = 0
    state: str = "stored"
    public: bool = False
    use_rslora: bool = False
    version: int = 1
    aliases: list[str] = field(default_factory=list)  # the name's aliases serving this version
    description: str = ""
    tags: list[str] = field(default_factory=list)
    base_model: str = ""
    evaluations: dict[str, float] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """`owner/name@vN`: this very version, whatever the aliases do later."""
        return f"{self.owner}/{self.name}@v{self.version}"

    @classmethod
    def from_pb(cls, info: pb.AdapterInfo) -> Adapter:
        return cls(
            id=info.id,
            name=info.name,
            owner=info.owner,
            source="hub" if info.source == pb.ADAPTER_SOURCE_HUB else "upload",
            repo_id=info.repo_id,
            revision=info.revision,
            sha256=info.sha256,
            rank=info.rank,
            alpha=info.alpha,
            target_modules=list(info.target_modules),
            size_bytes=info.size_bytes,
            state=STATES.get(info.state, "stored"),
            public=info.public,
            use_rslora=info.use_rslora,
            version=info.version,
            aliases=list(info.aliases),
            description=info.metadata.description,
            tags=list(info.metadata.tags),
            base_model=info.metadata.base_model,
            evaluations={e.name: e.value for e in info.evaluations},
        )


def _constraint(
    json_schema: Mapping[str, Any] | str | None,
    json_object: bool,
    regex: str | None,
    choice: Sequence[str] | None,
    grammar: str | None,
) -> pb.Constraint | None:
    given = {
        "json_schema": json_schema,
        "json_object": json_object or None,
        "regex": regex,
        "choice": choice,
        "grammar": grammar,
    }
    named = [name for name, value in given.items() if value is not None]
    if len(named) > 1:
        raise ValueError(f"one constraint per request; got {', '.join(named)}")
    if json_schema is not None:
        text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        return pb.Constraint(json_schema=text)
    if json_object:
        return pb.Constraint(json_object=True)
    if regex is not None:
        return pb.Constraint(regex=regex)
    if choice is not None:
        return pb.Constraint(choice=pb.Choices(choices=list(choice)))
    if grammar is not None:
        return pb.Constraint(grammar=grammar)
    return None


def build_request(
    prompt: str | None = None,
    *,
    messages: Sequence[tuple[str, str]] | Sequence[dict[str, str]] | None = None,
    adapter: str = "",
    adapters: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    request_id: str = "",
    token_ids: Sequence[int] | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    min_tokens: int = 0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    json_schema: Mapping[str, Any] | str | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    grammar: str | None = None,
) -> pb.GenerateRequest:
    """A GenerateRequest from plain arguments: give `prompt` (raw text), chat `messages`
    or `token_ids`.

    `adapters` (instead of `adapter`): adapter names with weights, e.g. {"tone": 0.5} for
    half strength or {"tone": 0.7, "facts": 0.3} for their weighted sum. `logprobs=k`:
    each generated token's log-probability and its k most likely alternatives;
    `prompt_logprobs=k` the same for the prompt's tokens (max_new_tokens=0: only those).
    Structured output, at most one of: `json_schema` (a dict or JSON text), `json_object`,
    `regex`, `choice` (strings), `grammar` (xgrammar EBNF).
    """
    sampling = pb.SamplingParameters(
        temperature=temperature,
        top_k=top_k,
        min_tokens=min_tokens,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=dict(logit_bias or {}),
    )
    if logprobs is not None:
        sampling.logprobs = logprobs
    if prompt_logprobs is not None:
        sampling.prompt_logprobs = prompt_logprobs
    if top_p is not None:
        sampling.top_p = top_p
    if repetition_penalty is not None:
        sampling.repetition_penalty = repetition_penalty
    if seed is not None:
        sampling.seed = seed
    request = pb.GenerateRequest(
        adapter=adapter,
        sampling=sampling,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        request_id=request_id,
    )
    constraint = _constraint(json_schema, json_object, regex, choice, grammar)
    if constraint is not None:
        request.constraint.CopyFrom(constraint)
    if adapters is not None:
        weighted = adapters.items() if isinstance(adapters, Mapping) else adapters
        request.adapters.extend(pb.WeightedAdapter(name=n, weight=w) for n, w in weighted)
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    if messages is not None:
        pairs = [(m["role"], m["content"]) if isinstance(m, dict) else m for m in messages]
        request.chat.CopyFrom(
            pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in pairs])
        )
    elif token_ids is not None:
        request.token_ids.CopyFrom(pb.TokenIds(ids=list(token_ids)))
    elif prompt is not None:
        request.prompt = prompt
    return request


def _completion(response: pb.GenerateResponse) -> Completion:
    return Completion(
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=FINISH_REASONS.get(response.finish_reason, ""),
        prompt_tokens=response.usage.prompt_tokens,
        completion_tokens=response.usage.completion_tokens,
        request_id=response.request_id,
        logprobs=[Logprob.from_pb(m) for m in response.logprobs],
        prompt_logprobs=[Logprob.from_pb(m) for m in response.prompt_logprobs],
    )


def _chunk(message: pb.GenerateStreamResponse) -> Chunk:
    return Chunk(
        text=message.text,
        token_ids=list(message.token_ids),
        finish_reason=FINISH_REASONS.get(message.finish_reason),
        prompt_tokens=message.usage.prompt_tokens,
        completion_tokens=message.usage.completion_tokens,
        logprobs=[Logprob.from_pb(m) for m in message.logprobs],
        prompt_logprobs=[Logprob.from_pb(m) for m in message.prompt_logprobs],
    )


def upload_messages(folder: Path, name: str) -> Iterator[pb.UploadAdapterRequest]:
    """Header (sizes and sha256 of each file) then the files' bytes in chunks."""
    folder = Path(folder)
    files = [folder / f for f in UPLOAD_FILES if (folder / f).is_file()]
    entries = []
    for path in files:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
                digest.update(block)
        entries.append(
            pb.FileEntry(path=path.name, size=path.stat().st_size, sha256=digest.hexdigest())
        )
    yield pb.UploadAdapterRequest(header=pb.UploadHeader(name=name, files=entries))
    for path in files:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
                yield pb.UploadAdapterRequest(chunk=pb.FileChunk(path=path.name, data=block))


def _messages(stream: Iterator[T]) -> Iterator[T]:
    """A server stream's messages, its failure as LoRAMux's typed error."""
    try:
        yield from stream
    except grpc.RpcError as error:
        raise to_error(error) from None


def _tokenize_request(
    text: str | None, messages: Sequence[tuple[str, str]] | None
) -> pb.TokenizeRequest:
    request = pb.TokenizeRequest()
    if messages is not None:
        request.chat.CopyFrom(
            pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])
        )
    else:
        request.text = text or ""
    return request


def _pull_request(
    repo_id: str, revision: str, name: str | None, hub_token: str | None
) -> pb.PullAdapterRequest:
    return pb.PullAdapterRequest(
        repo_id=repo_id,
        revision=revision,
        name=name or repo_id.rsplit("/", 1)[-1],
        hub_token=hub_token or "",
    )


class _Settings:
    """Address, key, default deadline and retry policy shared by both clients."""

    def __init__(
        self, address: str, api_key: str | None, timeout: float | None, retries: int
    ) -> None:
        self.address = address
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout
        self.retries = retries

    def backoff(self, attempt: int) -> float:
        """Exponential with jitter, so clients of a restarting server do not return in step."""
        return min(5.0, 0.2 * 2**attempt) * (0.5 + random.random() / 2)

    def for_request(self, request: pb.GenerateRequest) -> tuple[tuple[str, str], ...]:
        """The call's metadata: the key, and the adapter for header-hashing balancers."""
        # With weighted adapters, the first one: its requests go where it is resident.
        adapter = request.adapter or (request.adapters[0].name if request.adapters else "")
        if adapter and adapter.isascii() and adapter.isprintable():
            return (*self.metadata, (ADAPTER_METADATA, adapter))
        return self.metadata  # the base model, or a name the server will refuse anyway

    def should_retry(self, error: grpc.RpcError, attempt: int) -> bool:
        return bool(error.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries)


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]


def channel_options(server_name: str | None) -> list[tuple[str, Any]]:
    if server_name is None:
        return CHANNEL_OPTIONS
    return [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_name)]


def _read(path: Path | str | None) -> bytes | None:
    return None if path is None else Path(path).expanduser().read_bytes()


def channel_credentials(
    tls: bool = False,
    ca_file: Path | str | None = None,
    client_cert: Path | str | None = None,
    client_key: Path | str | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext.

    `tls=True` trusts the system's CAs; `ca_file` (a PEM bundle, e.g. of a private CA or a
    self-signed server certificate) trusts those instead. `client_cert` + `client_key`
    (PEM) answer a server that asks for a client certificate (mutual TLS). Giving any file
    implies TLS. The clients' `server_name` checks the certificate for that name instead of
    the address's host (connecting by IP to a certificate issued for a DNS name).
    """
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together")
    if not (tls or ca_file is not None or client_cert is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(client_key),
        certificate_chain=_read(client_cert),
    )


class LoramuxClient:
    """Blocking client. `LoramuxClient("127.0.0.1:50051", api_key="lmx_...")`.

    Over TLS: `LoramuxClient("host:50051", api_key=..., tls=True)` (system CAs), or
    `ca_file="ca.pem"` for a private CA; `client_cert=`/`client_key=` for mutual TLS.

    `timeout` is the default deadline of each call in seconds (None: no deadline); every
    call also takes its own `timeout=`. UNAVAILABLE answers (a draining or restarting
    server) are retried `retries` times with backoff; a stream only before its first chunk.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        api_key: str | None = None,
        *,
        timeout: float | None = 300.0,
        retries: int = 3,
        tls: bool = False,
        ca_file: Path | str | None = None,
        client_cert: Path | str | None = None,
        client_key: Path | str | None = None,
        server_name: str | None = None,
    ) -> None:
        self._cfg = _Settings(address, api_key, timeout, retries)
        credentials = channel_credentials(tls, ca_file, client_cert, client_key)
        self._channel = (
            grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
            if credentials is None
            else grpc.secure_channel(address, credentials, options=channel_options(server_name))
        )
        self.inference = pb_grpc.InferenceServiceStub(self._channel)
        self.adapters = pb_grpc.AdapterServiceStub(self._channel)
        self.admin = pb_grpc.AdminServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> LoramuxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: Callable[..., T],
        request: Callable[[], Any],
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> T:
        """One call with retries; `request` builds the request (again for each attempt)."""
        attempt = 0
        while True:
            try:
                return method(
                    request(),
                    metadata=self._cfg.metadata if metadata is None else metadata,
                    timeout=timeout or self._cfg.timeout,
                )
            except grpc.RpcError as error:
                if self._cfg.should_retry(error, attempt):
                    time.sleep(self._cfg.backoff(attempt))
                    attempt += 1
                    continue
                raise to_error(error) from None

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        return self._call(method, lambda: request, timeout)

    # -- inference --
    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Completion:
        """Generate a whole completion: give `prompt` (raw text) or `messages` (chat)."""
        request = build_request(prompt, **kwargs)
        metadata = self._cfg.for_request(request)
        return _completion(self._call(self.inference.Generate, lambda: request, timeout, metadata))

    def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[Chunk]:
        """Yields chunks as tokens are generated. Closing the iterator cancels the request."""
        request = build_request(prompt, **kwargs)
        attempt = 0
        while True:
            call = self.inference.GenerateStream(
                request,
                metadata=self._cfg.for_request(request),
                timeout=timeout or self._cfg.timeout,
            )
            received = False
            try:
                for message in call:
                    received = True
                    yield _chunk(message)
                return
            except grpc.RpcError as error:
                if not received and self._cfg.should_retry(error, attempt):
                    time.sleep(self._cfg.backoff(attempt))
                    attempt += 1
                    continue
                raise to_error(error) from None
            finally:
                call.cancel()

    def score(
        self,
        prompt: str,
        continuations: Sequence[str],
        *,
        adapter: str = "",
        timeout: float | None = None,
    ) -> list[float]:
        """The loglikelihood of each continuation after `prompt`: the sum of its tokens'
        log-probabilities (the primitive of multiple-choice evaluation, as lm-eval's).

        The text is tokenised as a whole and split where the prompt's own tokens end
        (lm-eval's rule; where the two do not line up, prompt and continuation are
        tokenised apart); one scoring call per continuation, no token generated.
        """
        context = self.tokenize(prompt)
        out = []
        for continuation in continuations:
            whole = self.tokenize(prompt + continuation)
            if whole[: len(context)] == context and len(whole) > len(context):
                ids, count = whole, len(whole) - len(context)
            else:
                tail = self.tokenize(continuation)
                ids, count = context + tail, len(tail)
            if count == 0 or not context:
                raise ValueError("prompt and continuation must each have tokens")
            done = self.generate(
                token_ids=ids,
                adapter=adapter,
                max_new_tokens=0,
                prompt_logprobs=0,
                timeout=timeout,
            )
            out.append(sum(lp.logprob for lp in done.prompt_logprobs[-count:]))
        return out

    def model_info(self) -> pb.ModelInfoResponse:
        return self._unary(self.inference.ModelInfo, pb.ModelInfoRequest())

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The standard gRPC health status ("SERVING", "NOT_SERVING", ...); needs no key."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._unary(stub.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def tokenize(
        self, text: str | None = None, *, messages: Sequence[tuple[str, str]] | None = None
    ) -> list[int]:
        response = self._unary(self.inference.Tokenize, _tokenize_request(text, messages))
        return list(response.token_ids)

    # -- adapters --
    def upload_adapter(
        self, folder: Path | str, name: str, *, timeout: float | None = None
    ) -> Adapter:
        """Upload a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
        info = self._call(
            self.adapters.UploadAdapter, lambda: upload_messages(Path(folder), name), timeout
        )
        return Adapter.from_pb(info)

    def pull_adapter(
        self,
        repo_id: str,
        revision: str = "main",
        name: str | None = None,
        *,
        hub_token: str | None = None,
        timeout: float | None = None,
    ) -> Adapter:
        """Have the server fetch `repo_id` from the Hub, pinned to the commit of `revision`.

        `hub_token` (for private repos) is used by the server for this pull only.
        """
        request = _pull_request(repo_id, revision, name, hub_token)
        return Adapter.from_pb(self._unary(self.adapters.PullAdapter, request, timeout))

    def list_adapters(self, page_size: int = 1000, **filters: Any) -> list[Adapter]:
        """Every adapter name the caller may use, page by page (filters: name_prefix,
        owner, public), each at the version its default alias serves."""
        found: list[Adapter] = []
        token = ""
        while True:
            response = self._unary(
                self.adapters.ListAdapters,
                pb.ListAdaptersRequest(page_size=page_size, page_token=token, **filters),
            )
            found += [Adapter.from_pb(a) for a in response.adapters]
            token = response.next_page_token
            if not token:
                return found

    def list_versions(self, name: str) -> tuple[list[Adapter], dict[str, dict[str, int]]]:
        """A name's versions (oldest first) and its aliases ({alias: {"v3": weight}})."""
        versions: list[Adapter] = []
        token = ""
        while True:
            response = self._unary(
                self.adapters.ListAdapterVersions,
                pb.ListAdapterVersionsRequest(name=name, page_size=1000, page_token=token),
            )
            versions += [Adapter.from_pb(a) for a in response.versions]
            token = response.next_page_token
            if not token:
                aliases = {
                    a.name: {t.version: t.weight for t in a.targets} for a in response.aliases
                }
                return versions, aliases

    def set_alias(self, name: str, alias: str, targets: str | Mapping[str, int]) -> dict[str, int]:
        """Point `alias` at a version ("v3") or a split ({"v3": 90, "v4": 10}); what it
        pointed at before ({} when new)."""
        split = {targets: 100} if isinstance(targets, str) else dict(targets)
        request = pb.SetAliasRequest(
            name=name,
            alias=alias,
            targets=[pb.AliasTarget(version=v, weight=w) for v, w in split.items()],
        )
        response = self._unary(self.adapters.SetAlias, request)
        return {t.version: t.weight for t in response.previous.targets}

    def rollback_alias(self, name: str, alias: str) -> dict[str, int]:
        """Point `alias` back where it was before its last move; where that is."""
        response = self._unary(self.adapters.RollbackAlias, pb.AliasRef(name=name, alias=alias))
        return {t.version: t.weight for t in response.alias.targets}

    def delete_alias(self, name: str, alias: str) -> None:
        self._unary(self.adapters.DeleteAlias, pb.AliasRef(name=name, alias=alias))

    def add_evaluations(self, name: str, results: Mapping[str, float]) -> Adapter:
        request = pb.AddEvaluationsRequest(
            name=name, evaluations=[pb.Evaluation(name=k, value=v) for k, v in results.items()]
        )
        return Adapter.from_pb(self._unary(self.adapters.AddEvaluations, request))

    def download_adapter(self, name: str, folder: Path | str) -> Adapter:
        """Write a stored version's files (a PEFT folder) into `folder`, each checked
        against the sha256 the server sent; `name` may carry `@v3` or `@alias`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        info: Adapter | None = None
        expected: dict[str, pb.FileEntry] = {}
        digests: dict[str, Any] = {}
        handle = None
        stream = self.adapters.DownloadAdapter(
            pb.AdapterRef(name=name), metadata=self._cfg.metadata, timeout=self._cfg.timeout
        )
        try:
            for message in _messages(stream):
                part = message.WhichOneof("part")
                if part == "info":
                    info = Adapter.from_pb(message.info)
                elif part == "file":
                    if handle is not None:
                        handle.close()
                    entry = message.file
                    if entry.path not in UPLOAD_FILES:
                        raise ValueError(f"the server sent an unexpected file {entry.path!r}")
                    expected[entry.path] = entry
                    digests[entry.path] = hashlib.sha256()
                    handle = (folder / entry.path).open("wb")
                elif part == "chunk" and handle is not None:
                    handle.write(message.chunk.data)
                    digests[message.chunk.path].update(message.chunk.data)
        finally:
            if handle is not None:
                handle.close()
        for path, entry in expected.items():
            if digests[path].hexdigest() != entry.sha256:
                raise ValueError(f"{path}: sha256 does not match what the server sent")
        if info is None:
            raise ValueError("the server sent no adapter")
        return info

    def get_adapter(self, name: str) -> Adapter:
        return Adapter.from_pb(self._unary(self.adapters.GetAdapter, pb.AdapterRef(name=name)))

    def delete_adapter(self, name: str) -> None:
        self._unary(self.adapters.DeleteAdapter, pb.AdapterRef(name=name))

    def load_adapter(self, name: str) -> Adapter:
        return Adapter.from_pb(self._unary(self.adapters.LoadAdapter, pb.AdapterRef(name=name)))

    def unload_adapter(self, name: str) -> Adapter:
        return Adapter.from_pb(self._unary(self.adapters.UnloadAdapter, pb.AdapterRef(name=name)))

    # -- administration (admin keys only) --
    def create_tenant(self, name: str, *, admin: bool = False, **quota: int) -> pb.Tenant:
        request = pb.CreateTenantRequest(name=name, admin=admin, quota=pb.TenantQuota(**quota))
        return self._unary(self.admin.CreateTenant, request)

    def list_tenants(self) -> list[pb.Tenant]:
        return list(self._unary(self.admin.ListTenants, pb.ListTenantsRequest()).tenants)

    def create_key(self, tenant: str) -> tuple[str, str]:
        response = self._unary(self.admin.CreateKey, pb.CreateKeyRequest(tenant=tenant))
        return response.key_id, response.key

    def revoke_key(self, key_id: str) -> None:
        self._unary(self.admin.RevokeKey, pb.RevokeKeyRequest(key_id=key_id))

    def set_adapter_public(self, owner: str, name: str, public: bool = True) -> Adapter:
        request = pb.SetAdapterPublicRequest(owner=owner, name=name, public=public)
        return Adapter.from_pb(self._unary(self.admin.SetAdapterPublic, request))


class AsyncLoramuxClient:
    """asyncio client with the calls of `LoramuxClient`: `await c.generate(...)`,
    `async for chunk in c.generate_stream(...)`. Same errors, deadlines and retries."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        api_key: str | None = None,
        *,
        timeout: float | None = 300.0,
        retries: int = 3,
        tls: bool = False,
        ca_file: Path | str | None = None,
        client_cert: Path | str | None = None,
        client_key: Path | str | None = None,
        server_name: str | None = None,
    ) -> None:
        self._cfg = _Settings(address, api_key, timeout, retries)
        credentials = channel_credentials(tls, ca_file, client_cert, client_key)
        self._channel = (
            grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            if credentials is None
            else grpc.aio.secure_channel(address, credentials, options=channel_options(server_name))
        )
        self.inference = pb_grpc.InferenceServiceStub(self._channel)
        self.adapters = pb_grpc.AdapterServiceStub(self._channel)
        self.admin = pb_grpc.AdminServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncLoramuxClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(
        self,
        method: Callable[..., Any],
        request: Callable[[], Any],
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Any:
        attempt = 0
        while True:
            try:
                return await method(
                    request(),
                    metadata=self._cfg.metadata if metadata is None else metadata,
                    timeout=timeout or self._cfg.timeout,
                )
            except grpc.aio.AioRpcError as error:
                if self._cfg.should_retry(error, attempt):
                    await asyncio.sleep(self._cfg.backoff(attempt))
                    attempt += 1
                    continue
                raise to_error(error) from None

    async def _unary(
        self, method: Callable[..., Any], request: Any, timeout: float | None = None
    ) -> Any:
        return await self._call(method, lambda: request, timeout)

    # -- inference --
    async def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Completion:
        request = build_request(prompt, **kwargs)
        metadata = self._cfg.for_request(request)
        return _completion(
            await self._call(self.inference.Generate, lambda: request, timeout, metadata)
        )

    async def generate_stream(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[Chunk]:
        """Yields chunks as tokens are generated. Closing the iterator cancels the request."""
        request = build_request(prompt, **kwargs)
        attempt = 0
        while True:
            call = self.inference.GenerateStream(
                request,
                metadata=self._cfg.for_request(request),
                timeout=timeout or self._cfg.timeout,
            )
            received = False
            try:
                async for message in call:
                    received = True
                    yield _chunk(message)
                return
            except grpc.aio.AioRpcError as error:
                if not received and self._cfg.should_retry(error, attempt):
                    await asyncio.sleep(self._cfg.backoff(attempt))
                    attempt += 1
                    continue
                raise to_error(error) from None
            finally:
                call.cancel()

    async def model_info(self) -> pb.ModelInfoResponse:
        return await self._unary(self.inference.ModelInfo, pb.ModelInfoRequest())

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The standard gRPC health status ("SERVING", "NOT_SERVING", ...); needs no key."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._unary(stub.Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def tokenize(
        self, text: str | None = None, *, messages: Sequence[tuple[str, str]] | None = None
    ) -> list[int]:
        response = await self._unary(self.inference.Tokenize, _tokenize_request(text, messages))
        return list(response.token_ids)

    # -- adapters --
    async def upload_adapter(
        self, folder: Path | str, name: str, *, timeout: float | None = None
    ) -> Adapter:
        info = await self._call(
            self.adapters.UploadAdapter, lambda: upload_messages(Path(folder), name), timeout
        )
        return Adapter.from_pb(info)

    async def pull_adapter(
        self,
        repo_id: str,
        revision: str = "main",
        name: str | None = None,
        *,
        hub_token: str | None = None,
        timeout: float | None = None,
    ) -> Adapter:
        request = _pull_request(repo_id, revision, name, hub_token)
        return Adapter.from_pb(await self._unary(self.adapters.PullAdapter, request, timeout))

    async def list_adapters(self) -> list[Adapter]:
        response = await self._unary(self.adapters.ListAdapters, pb.ListAdaptersRequest())
        return [Adapter.from_pb(a) for a in response.adapters]

    async def get_adapter(self, name: str) -> Adapter:
        info = await self._unary(self.adapters.GetAdapter, pb.AdapterRef(name=name))
        return Adapter.from_pb(info)

    async def delete_adapter(self, name: str) -> None:
        await self._unary(self.adapters.DeleteAdapter, pb.AdapterRef(name=name))

    async def load_adapter(self, name: str) -> Adapter:
        info = await self._unary(self.adapters.LoadAdapter, pb.AdapterRef(name=name))
        return Adapter.from_pb(info)

    async def unload_adapter(self, name: str) -> Adapter:
        info = await self._unary(self.adapters.UnloadAdapter, pb.AdapterRef(name=name))
        return Adapter.from_pb(info)

    # -- administration (admin keys only) --
    async def create_tenant(self, name: str, *, admin: bool = False, **quota: int) -> pb.Tenant:
        request = pb.CreateTenantRequest(name=name, admin=admin, quota=pb.TenantQuota(**quota))
        return await self._unary(self.admin.CreateTenant, request)

    async def list_tenants(self) -> list[pb.Tenant]:
        response = await self._unary(self.admin.ListTenants, pb.ListTenantsRequest())
        return list(response.tenants)

    async def create_key(self, tenant: str) -> tuple[str, str]:
        response = await self._unary(self.admin.CreateKey, pb.CreateKeyRequest(tenant=tenant))
        return response.key_id, response.key

    async def revoke_key(self, key_id: str) -> None:
        await self._unary(self.admin.RevokeKey, pb.RevokeKeyRequest(key_id=key_id))

    async def set_adapter_public(self, owner: str, name: str, public: bool = True) -> Adapter:
        request = pb.SetAdapterPublicRequest(owner=owner, name=name, public=public)
        return Adapter.from_pb(await self._unary(self.admin.SetAdapterPublic, request))
