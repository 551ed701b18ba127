"""Issue 11, "secure by default": no anonymous access unless asked for with --dev, admin keys
from a file, native TLS (and mutual TLS), and /metrics on loopback with private labels.

Real servers over the tiny random Llama on 127.0.0.1, real SQLite, real certificates made
here by a private CA, real `loramux serve` and `make -n serve`.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sqlite3
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import ServerProcess, free_port, linear_shapes
from prometheus_client.parser import text_string_to_metric_families
from security_helpers import ANY, Pem, Pki, listening_addresses, make_pki

from loramux.client import (
    AsyncLoramuxClient,
    LoramuxClient,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from loramux.core.config import Settings, load_settings
from loramux.core.errors import FailedPrecondition
from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer, start_server
from loramux.server.db.migrations import MIGRATIONS
from loramux.server.registry import Quota, Registry, hash_key
from loramux.server.synthetic import write_random_adapter

REPO = Path(__file__).resolve().parent.parent
QUOTA = Quota(max_concurrent=4, max_queued=4, max_adapters=10, max_bytes=10**9)
ADMIN_KEY = "lmx_security-test-admin-key-0123456789"


def _start(home: Path, tiny: ResolvedModel, **settings: Any) -> RunningServer:
    values: dict[str, Any] = {
        "home": home,
        "base_model": str(tiny.path),
        "device": "cpu",
        "port": 0,
        "metrics_port": 0,
        "lora_kernel": "eager",
        "grpc_workers": 8,
        **settings,
    }
    return start_server(Settings(**values))


def _tiny_args(tiny: ResolvedModel) -> tuple[str, ...]:
    return ("--base-model", str(tiny.path), "--device", "cpu", "--lora-kernel", "eager")


def _keys_file(path: Path, *keys: str, mode: int = 0o600) -> Path:
    path.write_text("# LoRAMux admin keys\n\n" + "".join(f"  {k}  \n" for k in keys))
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("security-adapter") / "adapter"
    return write_random_adapter(
        folder, linear_shapes(tiny_llama.path), rank=4, alpha=8, seed=11, scale=0.2
    )


# -- no anonymous access unless asked for ---------------------------------------------------


def test_serve_on_all_interfaces_without_a_key_refuses_to_start(
    tiny_llama: ResolvedModel, home: Path
) -> None:
    server = ServerProcess(home, "--host", "0.0.0.0", *_tiny_args(tiny_llama))
    try:
        with pytest.raises(RuntimeError, match="server exited") as exited:
            server.start()
        message = str(exited.value)
        assert "no admin API key" in message
        assert "--admin-keys-file" in message and "--dev" in message  # says how
        assert server.wait() == 2
        assert listening_addresses(server.port) == set()
    finally:
        server.stop()


def _make_serve_args() -> list[str]:
    """The arguments `make serve` gives `loramux serve` (from `make -n`, which runs nothing)."""
    dry = subprocess.run(
        ["make", "-n", "serve"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for line in dry.splitlines():
        words = shlex.split(line)
        if len(words) >= 2 and words[0].endswith("loramux") and words[1] == "serve":
            return words[2:]
    raise AssertionError(f"no `loramux serve` line in `make -n serve`:\n{dry}")


def test_make_serve_is_a_development_server_on_loopback_only(
    tiny_llama: ResolvedModel, home: Path
) -> None:
    args = _make_serve_args()
    assert "--dev" in args
    server = ServerProcess(home, *args, *_tiny_args(tiny_llama)).start()
    try:
        assert listening_addresses(server.port) == {"127.0.0.1"}
        assert listening_addresses(server.metrics_port) == {"127.0.0.1"}
        with LoramuxClient(server.address, retries=0) as anonymous:  # usable without a key
            assert anonymous.generate("Hi", max_new_tokens=2, ignore_eos=True).completion_tokens
            assert anonymous.list_tenants()  # every caller is an admin in development mode
        assert "--dev: DEVELOPMENT MODE, every caller is an admin" in server.log.read_text()
    finally:
        server.stop()


def test_dev_binds_another_address_only_when_told(
    tiny_llama: ResolvedModel, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = _start(home, tiny_llama, dev=True, host="0.0.0.0")
    try:
        assert listening_addresses(server.port) == {ANY}
        assert "DEVELOPMENT MODE ON 0.0.0.0, NOT LOOPBACK" in caplog.text
    finally:
        server.close()
    with pytest.raises(ValueError, match=r"--dev .* cannot be combined"):
        Settings(dev=True, admin_keys=[ADMIN_KEY]).validate()


def test_revoking_the_last_admin_key_never_turns_on_development_mode(
    tiny_llama: ResolvedModel, home: Path
) -> None:
    registry = Registry(home, QUOTA)
    registry.ensure_tenant("ops", admin=True)
    key_id, admin_key = registry.create_key("ops")
    registry.close()
    server = _start(home, tiny_llama)  # the registry's admin key is enough to start
    try:
        address = f"127.0.0.1:{server.port}"
        with LoramuxClient(address, retries=0) as anonymous, pytest.raises(Unauthenticated):
            anonymous.model_info()
        with LoramuxClient(address, admin_key, retries=0) as admin:
            admin.create_tenant("acme")
            admin.create_key("acme")  # a tenant key stays; it is no admin key
            admin.revoke_key(key_id)
            with pytest.raises(Unauthenticated):
                admin.model_info()
    finally:
        server.close()
    with pytest.raises(FailedPrecondition, match="no admin API key") as refused:
        _start(home, tiny_llama)
    assert refused.value.field == "admin_keys"


def test_tenant_default_is_not_an_admin(
    tiny_llama: ResolvedModel, home: Path, tiny_adapter: Path, tmp_path: Path
) -> None:
    server = _start(home, tiny_llama, dev=True)
    try:  # docs/api.md: work in --dev, then create a key for `default` to keep its adapters
        with LoramuxClient(f"127.0.0.1:{server.port}", retries=0) as dev:
            dev.upload_adapter(tiny_adapter, "mine")
            _, default_key = dev.create_key("default")
            assert not {t.name: t.admin for t in dev.list_tenants()}["default"]
    finally:
        server.close()
    keys = _keys_file(tmp_path / "admin-keys", ADMIN_KEY)
    server = _start(home, tiny_llama, admin_keys_file=keys)
    try:
        with LoramuxClient(f"127.0.0.1:{server.port}", default_key, retries=0) as tenant:
            assert [a.name for a in tenant.list_adapters()] == ["mine"]
            reply = tenant.generate("Hi", adapter="mine", max_new_tokens=2, ignore_eos=True)
            assert reply.completion_tokens == 2
            with pytest.raises(PermissionDenied):
                tenant.list_tenants()
            with pytest.raises(PermissionDenied):
                tenant.create_key("default")
    finally:
        server.close()


def test_a_registry_from_older_development_mode_loses_its_admin_default(
    tiny_llama: ResolvedModel, home: Path
) -> None:
    """Older versions made `default` an admin tenant; a key made for it must not stay admin."""
    default_key = "lmx_made-for-default-by-an-older-version"
    db = sqlite3.connect(home / "registry.sqlite3")  # the schema before migrations existed
    for statement in MIGRATIONS[0].statements:
        db.execute(statement)
    db.execute("INSERT INTO tenants VALUES ('default', 1, 4, 4, 10, 1000000000, 0)")
    db.execute("INSERT INTO api_keys VALUES ('k1', 'default', ?, 0, 0)", (hash_key(default_key),))
    db.commit()
    db.close()
    with pytest.raises(FailedPrecondition, match="no admin API key"):
        _start(home, tiny_llama)  # its only key is no admin key any more
    server = _start(home, tiny_llama, admin_keys=[ADMIN_KEY])
    try:
        with LoramuxClient(f"127.0.0.1:{server.port}", default_key, retries=0) as tenant:
            tenant.model_info()
            with pytest.raises(PermissionDenied):
                tenant.list_tenants()
    finally:
        server.close()


# -- admin keys from a file -----------------------------------------------------------------


def test_admin_keys_file(tiny_llama: ResolvedModel, home: Path, tmp_path: Path) -> None:
    second = "lmx_second-admin-key-abcdefghijklmnop"
    keys = _keys_file(tmp_path / "admin-keys", ADMIN_KEY, second)
    settings = load_settings(environ={"LORAMUX_ADMIN_KEYS_FILE": str(keys)})
    assert settings.admin_keys_file == keys
    server = _start(home, tiny_llama, admin_keys_file=keys)
    try:
        address = f"127.0.0.1:{server.port}"
        for key in (ADMIN_KEY, second):
            with LoramuxClient(address, key, retries=0) as admin:
                admin.create_tenant(f"t{len(key)}")
        for wrong in ("lmx_not-a-key", "# LoRAMux admin keys"):
            with (
                LoramuxClient(address, wrong, retries=0) as stranger,
                pytest.raises(Unauthenticated),
            ):
                stranger.model_info()
    finally:
        server.close()


@pytest.mark.parametrize(
    ("content", "mode", "complaint"),
    [
        (ADMIN_KEY, 0o644, "chmod 600"),
        (ADMIN_KEY, 0o606, "chmod 600"),
        ("# only a comment\n\n", 0o600, "holds no key"),
        ("lmx_one two", 0o600, "contains whitespace"),
    ],
    ids=["world-readable", "world-writable", "empty", "space-in-key"],
)
def test_unsafe_or_empty_admin_keys_file_is_refused(
    tiny_llama: ResolvedModel, home: Path, tmp_path: Path, content: str, mode: int, complaint: str
) -> None:
    keys = tmp_path / "admin-keys"
    keys.write_text(content)
    keys.chmod(mode)
    with pytest.raises(FailedPrecondition, match=complaint) as refused:
        _start(home, tiny_llama, admin_keys_file=keys)
    assert refused.value.field == "admin_keys_file"
    with pytest.raises(FailedPrecondition, match="cannot read"):
        _start(home, tiny_llama, admin_keys_file=tmp_path / "missing")


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(
    tiny_llama: ResolvedModel, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("tls-home")
    server = _start(
        home,
        tiny_llama,
        admin_keys=[ADMIN_KEY],
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        http_port=free_port(),
    )
    yield server
    server.close()


def test_tls_clients_reach_a_tls_server(tls_server: RunningServer, pki: Pki) -> None:
    address = f"127.0.0.1:{tls_server.port}"
    with LoramuxClient(address, ADMIN_KEY, ca_file=pki.ca, retries=0) as client:
        reply = client.generate("Hi", max_new_tokens=3, ignore_eos=True)
        assert reply.completion_tokens == 3

    async def async_call() -> int:
        async with AsyncLoramuxClient(address, ADMIN_KEY, ca_file=pki.ca, retries=0) as client:
            assert await client.health() == "SERVING"
            reply = await client.generate("Hi", max_new_tokens=2, ignore_eos=True)
            return reply.completion_tokens

    assert asyncio.run(async_call()) == 2
    command = [sys.executable, "-m", "loramux.cli", "generate", "Hi", "--max-new-tokens", "2"]
    command += ["--address", address, "--tls-ca-file", str(pki.ca), "--no-stream"]
    env = dict(os.environ, LORAMUX_API_KEY=ADMIN_KEY)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # The image's HEALTHCHECK, over TLS configured by env vars alone (no key needed).
    health = [sys.executable, "-m", "loramux.cli", "health", "--address", address]
    env = dict(os.environ, LORAMUX_TLS_CA_FILE=str(pki.ca))
    done = subprocess.run(health, env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr


def test_the_http_api_is_served_over_tls_too(tls_server: RunningServer, pki: Pki) -> None:
    assert tls_server.http is not None
    port, auth = tls_server.http.port, {"authorization": f"Bearer {ADMIN_KEY}"}
    reply = httpx.get(f"https://127.0.0.1:{port}/v1/models", headers=auth, verify=str(pki.ca))
    assert reply.status_code == 200 and reply.json()["data"]
    with pytest.raises(httpx.TransportError):  # the key never crosses the wire in plaintext
        httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=auth)
    with pytest.raises(httpx.TransportError):  # nor to a client that does not trust the CA
        httpx.get(f"https://127.0.0.1:{port}/v1/models", headers=auth)


def test_publishing_to_a_tls_server(
    tls_server: RunningServer, pki: Pki, tiny_adapter: Path
) -> None:
    address = f"127.0.0.1:{tls_server.port}"
    command = [sys.executable, "-m", "loramux.cli", "publish", str(tiny_adapter)]
    command += ["--publish-to", address, "--adapter-name", "published-over-tls"]
    env = dict(os.environ, LORAMUX_API_KEY=ADMIN_KEY, LORAMUX_TLS_CA_FILE=str(pki.ca))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with LoramuxClient(address, ADMIN_KEY, ca_file=pki.ca, retries=0) as client:
        assert "published-over-tls" in [a.name for a in client.list_adapters()]


def test_the_certificate_must_name_the_server(tls_server: RunningServer, pki: Pki) -> None:
    address = f"127.0.0.1:{tls_server.port}"
    for name, works in (("localhost", True), ("loramux.example.com", False)):
        client = LoramuxClient(address, ca_file=pki.ca, server_name=name, retries=0)
        with client:
            if works:
                assert client.health() == "SERVING"
            else:
                with pytest.raises(Unavailable):
                    client.health()


def test_plaintext_or_untrusting_clients_fail_against_a_tls_server(
    tls_server: RunningServer, pki: Pki
) -> None:
    address = f"127.0.0.1:{tls_server.port}"
    # Plaintext, and TLS trusting only the system's CAs (the private CA is not among them).
    for tls in (False, True):
        client = LoramuxClient(address, ADMIN_KEY, tls=tls, retries=0)
        with client, pytest.raises(Unavailable):
            client.model_info()
    command = [sys.executable, "-m", "loramux.cli", "adapters", "list", "--address", address]
    env = dict(os.environ, LORAMUX_API_KEY=ADMIN_KEY)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error" in done.stderr, done.stderr
    health = [sys.executable, "-m", "loramux.cli", "health", "--address", address]
    done = subprocess.run(health, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout  # unhealthy, as Docker reads it


def _tls_context(pki: Pki, client: Pem | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    return context


def test_mutual_tls_refuses_a_client_without_a_certificate(
    tiny_llama: ResolvedModel, home: Path, pki: Pki, tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other", "other")  # a client certificate from another CA
    server = _start(
        home,
        tiny_llama,
        admin_keys=[ADMIN_KEY],
        tls_cert=pki.server.cert,
        tls_key=pki.server.key,
        tls_client_ca=pki.ca,
        http_port=free_port(),
    )
    try:
        address = f"127.0.0.1:{server.port}"
        mine = {"client_cert": pki.client.cert, "client_key": pki.client.key}
        with LoramuxClient(address, ADMIN_KEY, ca_file=pki.ca, retries=0, **mine) as client:
            assert client.model_info().base_model
        theirs = {"client_cert": other.client.cert, "client_key": other.client.key}
        for options in ({}, theirs):
            client = LoramuxClient(address, ADMIN_KEY, ca_file=pki.ca, retries=0, **options)
            with client, pytest.raises(Unavailable):
                client.model_info()
        assert server.http is not None  # the HTTP API asks for the certificate too
        url = f"https://127.0.0.1:{server.http.port}/health"
        assert httpx.get(url, verify=_tls_context(pki, pki.client)).status_code == 200
        for wrong in (None, other.client):
            with pytest.raises(httpx.TransportError):
                httpx.get(url, verify=_tls_context(pki, wrong))
    finally:
        server.close()


def test_a_renewed_certificate_is_served_without_a_restart(
    tiny_llama: ResolvedModel, home: Path, tmp_path: Path
) -> None:
    old, new = make_pki(tmp_path / "old", "old"), make_pki(tmp_path / "new", "new")
    cert, key = tmp_path / "server.pem", tmp_path / "server-key.pem"
    cert.write_bytes(old.server.cert.read_bytes())
    key.write_bytes(old.server.key.read_bytes())
    server = _start(home, tiny_llama, admin_keys=[ADMIN_KEY], tls_cert=cert, tls_key=key)

    def answers(ca: Path) -> bool:
        with LoramuxClient(f"127.0.0.1:{server.port}", ADMIN_KEY, ca_file=ca, retries=0) as c:
            try:
                return bool(c.model_info().base_model)
            except Unavailable:
                return False

    try:
        assert answers(old.ca) and not answers(new.ca)
        key.write_bytes(new.server.key.read_bytes())  # as a renewal tool rewrites the pair
        cert.write_bytes(new.server.cert.read_bytes())
        assert answers(new.ca) and not answers(old.ca)
    finally:
        server.close()


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    for bad in ({"tls_cert": tmp_path / "c.pem"}, {"tls_client_ca": tmp_path / "ca.pem"}):
        with pytest.raises(ValueError, match="--tls-"):
            Settings(**bad).validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--tls-client-cert and --tls-client-key"):
        Settings(tls_client_cert=tmp_path / "c.pem").validate()
    client = load_settings(environ={"LORAMUX_TLS_CA_FILE": str(tmp_path / "ca.pem")})
    assert client.client_tls and not Settings().client_tls
    assert load_settings(environ={"LORAMUX_TLS": "1"}).client_tls
    with pytest.raises(ValueError, match="switch"):
        load_settings(environ={"LORAMUX_TLS": "maybe"})


def test_unusable_tls_files_are_refused_before_serving(
    tiny_llama: ResolvedModel, home: Path, pki: Pki, tmp_path: Path
) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cases = [
        ({"tls_cert": tmp_path / "missing.pem", "tls_key": pki.server.key}, "tls_cert"),
        ({"tls_cert": pki.server.cert, "tls_key": not_pem}, "tls_key"),
        ({"tls_cert": pki.server.key, "tls_key": pki.server.key}, "tls_cert"),
    ]
    for settings, field in cases:
        with pytest.raises(FailedPrecondition) as refused:
            _start(home, tiny_llama, dev=True, **settings)
        assert refused.value.field == field


# -- /metrics --------------------------------------------------------------------------------


def test_metrics_stay_on_loopback_unless_exposed(tiny_llama: ResolvedModel, home: Path) -> None:
    metrics_port = free_port()
    server = _start(
        home, tiny_llama, admin_keys=[ADMIN_KEY], host="0.0.0.0", metrics_port=metrics_port
    )
    try:
        assert listening_addresses(server.port) == {ANY}
        assert listening_addresses(metrics_port) == {"127.0.0.1"}
    finally:
        server.close()
    metrics_port = free_port()
    server = _start(
        home, tiny_llama, admin_keys=[ADMIN_KEY], metrics_host="0.0.0.0", metrics_port=metrics_port
    )
    try:
        assert listening_addresses(server.port) == {"127.0.0.1"}
        assert listening_addresses(metrics_port) == {ANY}
    finally:
        server.close()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _served(text: str) -> list[dict[str, str]]:
    """The labels (less `status`) of each request series that counted one OK request."""
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loramux_requests_total" and sample.value == 1.0:
                assert sample.labels.pop("status") == "OK"
                found.append(sample.labels)
    return found


def _one_request(server: RunningServer, adapter: Path) -> None:
    with LoramuxClient(f"127.0.0.1:{server.port}", ADMIN_KEY, retries=0) as admin:
        admin.create_tenant("acme-secret")
        _, key = admin.create_key("acme-secret")
    with LoramuxClient(f"127.0.0.1:{server.port}", key, retries=0) as tenant:
        tenant.upload_adapter(adapter, "private-bot")
        tenant.generate("Hi", adapter="private-bot", max_new_tokens=2, ignore_eos=True)


@pytest.mark.parametrize("mode", ["plain", "hashed", "off"])
def test_metrics_labels_name_hash_or_omit_tenants(
    tiny_llama: ResolvedModel, home: Path, tiny_adapter: Path, mode: str
) -> None:
    metrics_port = free_port()
    settings = {"admin_keys": [ADMIN_KEY], "metrics_port": metrics_port, "metrics_labels": mode}
    server = _start(home, tiny_llama, **settings)
    try:
        _one_request(server, tiny_adapter)
        text = _scrape(metrics_port)
    finally:
        server.close()
    served = _served(text)
    assert len(served) == 1, text
    if mode == "plain":
        assert served[0] == {"tenant": "acme-secret", "adapter": "acme-secret/private-bot@v1"}
        return
    assert "acme-secret" not in text and "private-bot" not in text
    if mode == "off":
        assert served[0] == {}
        assert "tenant=" not in text and "adapter=" not in text
        return
    assert re.fullmatch(r"t-[0-9a-f]{12}", served[0]["tenant"]), served
    assert re.fullmatch(r"a-[0-9a-f]{12}", served[0]["adapter"]), served
    assert (home / "metrics-label-salt").stat().st_mode & 0o077 == 0
    # The same names give the same labels after a restart (dashboards keep their series).
    server = _start(home, tiny_llama, **{**settings, "metrics_port": free_port()})
    try:
        with LoramuxClient(f"127.0.0.1:{server.port}", ADMIN_KEY, retries=0) as admin:
            _, key = admin.create_key("acme-secret")
        with LoramuxClient(f"127.0.0.1:{server.port}", key, retries=0) as tenant:
            tenant.generate("Hi", adapter="private-bot", max_new_tokens=2, ignore_eos=True)
        again = _scrape(server.metrics_port)
    finally:
        server.close()
    assert _served(again) == served
