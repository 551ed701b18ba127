"""The one typed place for LoRAMux's settings.

Every field of :class:`Settings` is reachable three ways, in this order of precedence:
a CLI flag (``--max-batch-size``), an environment variable (``LORAMUX_MAX_BATCH_SIZE``)
and the default written here. Subcommands pick the groups of fields they use, so the
flags a command accepts are exactly the settings it honours.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "LORAMUX_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")
DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 9090
# Prompt tokens per step while other requests decode, on the CPU: see docs/engine.md
# ("Chunked prefill") and docs/performance.md (issue 12) for the measurement behind it.
CPU_PREFILL_TOKENS_WHILE_DECODING = 64
# Query-key pairs of a chunk per step while other requests decode, on the CPU (same docs).
CPU_PREFILL_ATTENTION_WHILE_DECODING = 65_536  # 64 tokens x 1,024 of context


LOOPBACK = "127.0.0.1"


class MetricsLabels(enum.StrEnum):
    """How tenant and adapter names appear as labels of the Prometheus series."""

    PLAIN = "plain"  # the names themselves (first 100 distinct, then "other")
    HASHED = "hashed"  # a keyed hash per name: series stay apart, names stay private
    OFF = "off"  # no tenant or adapter label at all


def _default_home() -> Path:
    return Path.home() / ".cache" / "loramux"


def setting(default: Any, help: str, group: str, *, choices: Iterable[str] | None = None) -> Any:
    """A dataclass field that carries its CLI help, its group and its allowed values."""
    meta = {"help": help, "group": group, "choices": tuple(choices) if choices else None}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    # -- model: shared by server, trainer and `models` --
    home: Path = setting(
        _default_home(), "data dir: prepared models, adapter registry, uploads", "model"
    )
    base_model: str = setting(
        DEFAULT_BASE_MODEL,
        "base model: built-in name, Hugging Face repo id, or local HF folder",
        "model",
    )
    base_model_revision: str | None = setting(
        None, "revision (branch, tag or commit) of a Hub base model", "model"
    )
    quantization: str = setting(
        "nf4", "weight quantization of the base model", "model", choices=("nf4", "fp4", "none")
    )
    device: str = setting(
        "auto", "torch device: auto (CUDA when present), cpu, cuda, cuda:N", "model"
    )

    # -- server network --
    host: str = setting(LOOPBACK, "address the gRPC server binds", "server")
    port: int = setting(DEFAULT_GRPC_PORT, "gRPC port", "server")
    metrics_host: str = setting(
        LOOPBACK,
        "address the /metrics endpoint binds (0.0.0.0 exposes it; its labels name tenants "
        "unless --metrics-labels hashed or off)",
        "server",
    )
    metrics_port: int = setting(
        DEFAULT_METRICS_PORT, "HTTP port of the Prometheus /metrics endpoint (0 disables)", "server"
    )
    metrics_labels: MetricsLabels = setting(
        MetricsLabels.PLAIN,
        "tenant and adapter labels of /metrics: plain names, hashed (keyed, per data dir), off",
        "server",
        choices=[m.value for m in MetricsLabels],
    )
    tls_cert: Path | None = setting(
        None, "PEM certificate chain: serve gRPC over TLS (with --tls-key)", "server"
    )
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert", "server")
    tls_client_ca: Path | None = setting(
        None, "PEM CA bundle: require client certificates signed by it (mutual TLS)", "server"
    )
    grpc_workers: int = setting(
        192,
        "threads for gRPC calls' blocking work (authentication, admission, unary bodies, "
        "upload chunk writes), each held only for that: calls are served from an event loop "
        "(grpc.aio), a generation holds none while it waits for a tenant slot, for tokens or "
        "for a slow reader; health checks need none",
        "server",
    )
    http_port: int = setting(
        0, "port of the OpenAI-compatible HTTP API (/v1/..., /health, /ready; 0 disables)", "server"
    )
    http_workers: int = setting(
        64,
        "threads for HTTP generations' admission work (adapter lookup, tokenising, grammar "
        "compile), each held only for that: a generation holds none while it waits for a "
        "tenant slot, for tokens or for a slow reader; /health and /ready need none",
        "server",
    )
    served_model_name: str | None = setting(
        None,
        "the base model's id in the HTTP API's `model` field and /v1/models "
        "(default: the base model's name)",
        "server",
    )
    drain_seconds: float = setting(
        30.0, "on SIGTERM, how long in-flight requests may run before exit", "server"
    )
    dev: bool = setting(
        False,
        "development mode: no keys, every caller is an admin; binds 127.0.0.1 unless --host "
        "is given. Never expose it",
        "server",
    )
    admin_keys: list[str] = setting(
        [],
        "bootstrap admin API keys, comma separated (visible in `ps`: prefer --admin-keys-file "
        "or the env var)",
        "server",
    )
    admin_keys_file: Path | None = setting(
        None,
        "file of bootstrap admin API keys, one per line, '#' comments; must not be readable "
        "by others (chmod 600)",
        "server",
    )
    registry: str = setting(
        "sqlite",
        "adapter registry database: sqlite (a file in the data dir) or a postgresql:// URL "
        "that replicas share (with one --adapter-dir on a shared volume)",
        "server",
    )
    adapter_dir: Path | None = setting(
        None,
        "folder of stored adapter files, which replicas share (a shared volume); "
        "default: adapters/ in the data dir",
        "server",
    )
    registry_poll_seconds: float = setting(
        0.5,
        "how often a replica checks the registry for other replicas' changes "
        "(PostgreSQL also notifies at once)",
        "server",
    )

    # -- engine --
    max_batch_size: int = setting(32, "most requests decoding together", "engine")
    max_batch_tokens: int = setting(2048, "most tokens (prefill + decode) in one step", "engine")
    max_prefill_tokens_while_decoding: int = setting(
        0,
        "most tokens of a longer prompt prefilled in a step that also decodes running "
        "requests, so a long prompt arriving costs their inter-token latency little (0: "
        f"auto, {CPU_PREFILL_TOKENS_WHILE_DECODING} on the CPU, --max-batch-tokens on CUDA); "
        "prompts that fit it whole join such a step whole, all that wait, within "
        "--max-batch-tokens; a step with no decoding request takes up to --max-batch-tokens",
        "engine",
    )
    max_prefill_attention_while_decoding: int = setting(
        0,
        "most query-key pairs (chunk tokens x tokens they attend to) of a prompt's chunk in a "
        "step that also decodes running requests: deep into a long prompt each chunk token "
        "attends to the whole prompt so far, so with a limit the chunks shrink there: "
        "steadier inter-token latency for a later first token of the long prompt (0: auto, "
        f"{CPU_PREFILL_ATTENTION_WHILE_DECODING} on the CPU, no limit on CUDA; a larger "
        "value favours the long prompt)",
        "engine",
    )
    kv_cache_bytes: int = setting(
        0,
        "KV cache pool, preallocated at start (0: auto, 1 GiB on the CPU capped at what "
        "--max-batch-size full context windows need; on CUDA what --gpu-memory-fraction "
        "leaves after the weights, the adapter slots at their largest and a pass's "
        "activations)",
        "engine",
    )
    gpu_memory_fraction: float = setting(
        0.9,
        "share of the CUDA device's memory this server may hold (weights, adapter slots, "
        "activations and the KV pool, which gets the rest; docs/engine.md)",
        "engine",
    )
    pinned_host_bytes: int = setting(
        0,
        "CUDA: most bytes of page-locked (pinned) host memory the CPU tier of adapters "
        "holds, so their copies into device slots run asynchronously on a side stream; "
        "adapters past it stay in ordinary memory and copy synchronously (0: auto, half "
        "the host memory available at start; the CPU tier on a CPU device is ordinary "
        "memory and ignores it)",
        "engine",
    )
    cuda_graphs: bool = setting(
        False,
        "capture decode steps as CUDA graphs for padded batch sizes: not available yet "
        "(refused at start on every device, saying why; docs/engine.md, CUDA graphs)",
        "engine",
    )
    kv_block_size: int = setting(16, "token positions per KV cache block", "engine")
    prefix_caching: bool = setting(
        True, "keep full KV blocks after a request ends and reuse them for equal prefixes", "engine"
    )
    max_new_tokens_limit: int = setting(1024, "largest max_new_tokens a request may ask", "engine")
    max_n: int = setting(
        16,
        "most samples (`n`) one completion request may ask; the samples share one prefill "
        "through the prefix cache",
        "engine",
    )
    max_queued_requests: int = setting(1024, "requests waiting for a batch slot", "engine")
    max_rank: int = setting(64, "largest LoRA rank accepted", "engine")
    grammar_cache_size: int = setting(
        256, "compiled structured-output grammars kept per tokenizer (LRU)", "engine"
    )
    grammar_compile_seconds: float = setting(
        10.0,
        "longest a JSON schema, regex or grammar may take to compile in its worker process "
        "before it is killed and the request refused (400 naming the field)",
        "engine",
    )
    grammar_compile_threads: int = setting(
        2,
        "threads that compile structured-output grammars, apart from the engine's, each "
        "with a worker process that tries the compile first (killed when it overruns)",
        "engine",
    )
    grammar_compile_memory_bytes: int = setting(
        1 << 30,
        "memory a structured-output grammar's compile may take in its worker process "
        "(RLIMIT_AS over what the worker has mapped when the compile starts); more is "
        "refused (400 naming the field)",
        "engine",
    )
    grammar_mask_overlap: bool = setting(
        True,
        "fill the constrained rows' token masks on a helper thread while the step's forward "
        "pass runs (off: after it, on the engine thread)",
        "engine",
    )
    compute_threads: int = setting(
        0, "torch threads of the engine's passes (0: every CPU this process may use)", "engine"
    )
    stream_interval: int = setting(
        1,
        "tokens per streamed message: 1 sends each token as soon as it is made; N wakes a "
        "stream's reader once per N tokens (or at the end) and sends them together, fewer "
        "thread wake-ups and messages for throughput (docs/performance.md, gRPC server)",
        "engine",
    )
    max_loaded_adapters: int = setting(32, "adapter slots on the device", "engine")
    max_cpu_adapters: int = setting(256, "adapters kept in CPU memory (LRU)", "engine")
    max_trainable_tokens: int = setting(
        64,
        "most embedding rows one adapter may bring (PEFT's trainable_token_indices); each "
        "costs a row of the embedding on the device while the adapter is loaded (0: refuse "
        "adapters with trainable tokens)",
        "engine",
    )
    max_composed_adapters: int = setting(
        4, "most adapters one request may combine (GenerateRequest.adapters)", "engine"
    )
    max_adapter_weight: float = setting(
        4.0, "largest |weight| of an adapter in GenerateRequest.adapters", "engine"
    )
    lora_kernel: str = setting(
        "auto",
        "LoRA kernel: triton (explicit Triton SGMV/BGMV kernels: compiled on CUDA, through "
        "Triton's interpreter on the CPU, slow, for tests), compiled (torch.compile'd "
        "gather-reduce, dense GEMMs for few adapters), eager (the same uncompiled), native "
        "(hand-written AVX-512 BF16 kernel, CPU with bf16 slots; built at start with g++ or "
        "$CXX), auto (CUDA: triton where installed, else compiled; CPU: native where the "
        "CPU, bf16 slots and the compiler allow it, else compiled)",
        "engine",
        choices=("auto", "native", "triton", "compiled", "eager"),
    )
    attention_kernel: str = setting(
        "auto",
        "paged attention for decoding rows and chunks over long contexts: native (hand-"
        "written kernel reading the KV block pool directly, CPU with AVX-512 BF16 or AVX2 + "
        "FMA; built at start with g++ or $CXX), triton (Triton kernel over the same pool: "
        "compiled on CUDA, through Triton's interpreter on the CPU, slow, for tests); both "
        "compute sliding windows and logit soft-capping, not attention sinks; torch (each "
        "row's blocks gathered, then SDPA; every attention variant), auto (where the model's "
        "attention allows: on CUDA triton where installed, on a CPU native's AVX-512 build "
        "where the CPU and the compiler allow it; else torch)",
        "engine",
        choices=("auto", "native", "triton", "torch"),
    )
    nf4_kernel: str = setting(
        "auto",
        "the 4-bit base model's matmul on the CPU: native (hand-written AVX2 kernel reading "
        "bitsandbytes' packed NF4 codes and scales in place, the same dequantised values "
        "bit for bit; built at start with g++ or $CXX), bnb (bitsandbytes' own layers: "
        "dequantise the whole weight, then a bf16 GEMM), auto (native where the CPU, the "
        "compiler and the model's 4-bit layers allow it, else bnb); CUDA always runs bnb",
        "engine",
        choices=("auto", "native", "bnb"),
    )
    lora_slot_dtype: str = setting(
        "bf16",
        "adapter weights in device slots: bf16 (exact) or int8 (per-row scales, half the bytes)",
        "engine",
        choices=("bf16", "int8"),
    )

    hub_endpoint: str | None = setting(
        None,
        "Hugging Face Hub URL for adapter pulls (default: huggingface_hub's, HF_ENDPOINT)",
        "server",
    )

    # -- tenants and limits --
    max_upload_bytes: int = setting(512 * 1024 * 1024, "largest adapter upload", "server")
    tenant_max_calls: int = setting(
        0,
        "most calls one tenant may have in flight and queued, any method, gRPC and HTTP counted "
        "together (0: half of --grpc-workers); below --grpc-workers, so one tenant's blocking "
        "work (uploads, unary calls) never takes every thread of the pool from the others",
        "server",
    )
    tenant_max_concurrent: int = setting(16, "default per-tenant running requests", "server")
    tenant_max_queued: int = setting(64, "default per-tenant queued requests", "server")
    tenant_requests_per_minute: int = setting(
        0,
        "default per-tenant generation requests per minute, per replica (0: no limit; a "
        "tenant's own budget from the admin API comes first)",
        "server",
    )
    tenant_tokens_per_minute: int = setting(
        0,
        "default per-tenant generated tokens per minute, per replica (0: no limit; a tenant's "
        "own budget from the admin API comes first)",
        "server",
    )
    tenant_rate_window_seconds: float = setting(
        60.0,
        "the window the per-minute budgets count over (a minute; shorter only for tests)",
        "server",
    )
    tenant_max_adapters: int = setting(100, "default per-tenant stored adapter versions", "server")
    tenant_max_bytes: int = setting(
        10 * 1024 * 1024 * 1024, "default per-tenant stored adapter bytes", "server"
    )

    # -- client --
    address: str = setting(f"127.0.0.1:{DEFAULT_GRPC_PORT}", "server address host:port", "client")
    api_key: str | None = setting(None, "API key sent as `authorization: Bearer <key>`", "client")
    tls: bool = setting(
        False, "connect over TLS (trusting the system's CAs unless --tls-ca-file)", "client"
    )
    tls_ca_file: Path | None = setting(
        None, "PEM CA bundle that signed the server's certificate (implies --tls)", "client"
    )
    tls_client_cert: Path | None = setting(
        None, "PEM client certificate for mutual TLS (implies --tls)", "client"
    )
    tls_client_key: Path | None = setting(None, "PEM private key of --tls-client-cert", "client")
    tls_server_name: str | None = setting(
        None,
        "name the server's certificate must carry (default: the host of --address)",
        "client",
    )

    log_level: str = setting(
        "INFO", "log level", "common", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser()
        for name, annotation in _field_types().items():  # Settings(tls_cert="x.pem") works too
            value, kind = getattr(self, name), _base_type(annotation)
            if isinstance(value, str) and kind is Path:
                setattr(self, name, Path(value).expanduser())
            elif _is_enum(kind) and value in {m.value for m in kind}:
                setattr(self, name, kind(value))  # otherwise validate() names the choices

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def calls_per_tenant(self) -> int:
        """The effective --tenant-max-calls: one count over gRPC and HTTP, below gRPC's pool.

        A call holds a thread of its front's pool only for its blocking work, never while
        it waits (tests/test_http_streams.py, tests/test_grpc_streams.py); the cap keeps one
        tenant's blocking work (an upload flood) from taking all of gRPC's pool.
        """
        return self.tenant_max_calls or max(1, self.grpc_workers // 2)

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the flag."""
        positive = (
            "max_batch_size",
            "max_batch_tokens",
            "max_new_tokens_limit",
            "max_n",
            "max_rank",
            "kv_block_size",
            "max_loaded_adapters",
            "max_cpu_adapters",
            "max_composed_adapters",
            "grpc_workers",
            "http_workers",
            "stream_interval",
            "grammar_cache_size",
            "grammar_compile_threads",
            "grammar_compile_memory_bytes",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prefill_tokens_while_decoding", "max_prefill_attention_while_decoding"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"--{_flag(name)} must be >= 0 (0: auto), got {getattr(self, name)}"
                )
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(
                f"--gpu-memory-fraction must be in (0, 1], got {self.gpu_memory_fraction}"
            )
        if not 0 < self.grammar_compile_seconds <= 600:
            raise ValueError(
                f"--grammar-compile-seconds must be in (0, 600], got {self.grammar_compile_seconds}"
            )
        if self.pinned_host_bytes < 0:
            raise ValueError(
                f"--pinned-host-bytes must be >= 0 (0: auto), got {self.pinned_host_bytes}"
            )
        if self.kv_cache_bytes < 0:
            raise ValueError(f"--kv-cache-bytes must be >= 0, got {self.kv_cache_bytes}")
        if not 0 <= self.tenant_max_calls < self.grpc_workers:
            raise ValueError(
                f"--tenant-max-calls must be in 0..{self.grpc_workers - 1} (below "
                "--grpc-workers, so one tenant cannot take every thread of its pool), "
                f"got {self.tenant_max_calls}"
            )
        for name in ("tenant_requests_per_minute", "tenant_tokens_per_minute"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0 (0: no limit)")
        if not 0 < self.tenant_rate_window_seconds <= 3600:
            raise ValueError(
                "--tenant-rate-window-seconds must be in (0, 3600], "
                f"got {self.tenant_rate_window_seconds}"
            )
        if self.compute_threads < 0:
            raise ValueError(f"--compute-threads must be >= 0, got {self.compute_threads}")
        if self.max_trainable_tokens < 0:
            raise ValueError(
                f"--max-trainable-tokens must be >= 0 (0: none), got {self.max_trainable_tokens}"
            )
        if self.max_cpu_adapters < self.max_loaded_adapters:
            raise ValueError("--max-cpu-adapters must be >= --max-loaded-adapters")
        if not 0 < self.max_adapter_weight < float("inf"):
            raise ValueError(
                f"--max-adapter-weight must be finite and > 0, got {self.max_adapter_weight}"
            )
        for f in dataclasses.fields(self):
            allowed = f.metadata["choices"]
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(
                    f"--{_flag(f.name)} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, f.name)!r}"
                )
        if self.registry != "sqlite" and not self.registry.startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError(
                f"--registry must be sqlite or a postgresql:// URL, got {self.registry!r}"
            )
        if not 0 < self.registry_poll_seconds <= 60:
            raise ValueError(
                f"--registry-poll-seconds must be in (0, 60], got {self.registry_poll_seconds}"
            )
        for name in ("port", "metrics_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"--{_flag(name)} must be a TCP port, got {getattr(self, name)}")
        self._validate_security()

    def _validate_security(self) -> None:
        for name in ("host", "metrics_host"):
            if not getattr(self, name).strip():
                raise ValueError(f"--{_flag(name)} must be an address, got an empty string")
        for first, second in (("tls_cert", "tls_key"), ("tls_client_cert", "tls_client_key")):
            if (getattr(self, first) is None) != (getattr(self, second) is None):
                raise ValueError(f"--{_flag(first)} and --{_flag(second)} go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        if self.dev and (self.admin_keys or self.admin_keys_file is not None):
            raise ValueError(
                "--dev serves every caller as an admin without a key; it cannot be combined "
                "with --admin-keys or --admin-keys-file (drop one of them)"
            )

    @property
    def client_tls(self) -> bool:
        """Whether a client connects over TLS: --tls, or any TLS file given."""
        return self.tls or self.tls_ca_file is not None or self.tls_client_cert is not None


def _flag(name: str) -> str:
    return name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int, `list[str]` -> list."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return list
    return annotation


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, enum.Enum)


def _convert(name: str, raw: str) -> Any:
    kind = _base_type(_field_types()[name])
    if kind is list:
        return [p.strip() for p in raw.split(",") if p.strip()]
    if kind is bool:
        word = raw.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(f"{name}: cannot read {raw!r} as a switch (1/0, true/false, on/off)")
        return word in TRUE_WORDS
    if _is_enum(kind):
        return raw  # Settings turns a valid value into the enum; validate() names the choices
    if kind is Path:
        return Path(raw)
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{name}: cannot read {raw!r} as {kind.__name__}") from exc


def add_settings_arguments(parser: argparse.ArgumentParser, groups: Iterable[str]) -> None:
    """Add a flag for every setting in `groups`; defaults stay None so env vars can apply."""
    wanted = set(groups) | {"common"}
    arg_group = parser.add_argument_group("settings (flag > LORAMUX_* env var > default)")
    for f in dataclasses.fields(Settings):
        if f.metadata["group"] not in wanted:
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        shown = ",".join(default) if isinstance(default, list) else default
        if _base_type(_field_types()[f.name]) is bool:
            # A switch both ways, `--dev` / `--no-dev` (not `--dev true`): a setting that is
            # on by default must be possible to turn off by flag too.
            state = "on" if default else "off"
            arg_group.add_argument(
                f"--{_flag(f.name)}",
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=f"{f.metadata['help']} [env {env_name(f.name)}=1/0; default {state}]",
            )
            continue
        arg_group.add_argument(
            f"--{_flag(f.name)}",
            dest=f.name,
            default=None,
            choices=f.metadata["choices"],
            metavar=None if f.metadata["choices"] else f.name.upper(),
            help=f"{f.metadata['help']} [env {env_name(f.name)}; default {shown}]",
        )


def load_settings(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings from CLI args (strings), then env vars, then defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        values[f.name] = _convert(f.name, raw) if isinstance(raw, str) else raw
    settings = Settings(**values)
    settings.validate()
    return settings
