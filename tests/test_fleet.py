"""Issue 14, points 3-5: LoRAMux replicas behind nginx with one shared registry.

Real parts only: a PostgreSQL cluster (Debian's package) started in a temporary folder as
an unprivileged user, two `loramux serve` processes on the tiny random Llama that share
one data dir (the shared volume) and the database, and nginx (Debian's package) with
the configuration rendered from deploy/nginx/loramux.conf.template, which hashes
`loramux-adapter` consistently. A second test runs two replicas on the SQLite default and
shows what they share and what they do not (docs/scale-out.md).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from api_helpers import ServerProcess, eventually, linear_shapes
from fleet_helpers import (
    Nginx,
    Postgres,
    adapter_states,
    find_nginx,
    find_postgres_bin,
    request_counts,
    scrape,
)

from loramux.client import AsyncLoramuxClient, LoramuxClient, NotFound
from loramux.core.errors import ResourceExhausted, Unauthenticated
from loramux.core.models import ResolvedModel
from loramux.server.synthetic import write_random_adapter
from loramux.v1 import loramux_pb2 as pb
from loramux.v1 import loramux_pb2_grpc as pb_grpc

ADMIN_KEY = "fleet-admin-key"
ADAPTERS = 20
PROPAGATION_SECONDS = 2.0  # the promise: a change on one replica holds on all within this

pytestmark = pytest.mark.skipif(
    find_postgres_bin("initdb") is None or find_nginx() is None,
    reason="PostgreSQL and nginx are not installed (make test installs them)",
)


@pytest.fixture(scope="module")
def adapters(tiny_llama: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("fleet-adapters")
    shapes = linear_shapes(tiny_llama.path)
    return [
        write_random_adapter(root / f"a{i}", shapes, rank=4, alpha=8, seed=i, scale=0.2)
        for i in range(ADAPTERS)
    ]


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    server = Postgres().start()
    try:
        yield server
    finally:
        server.stop()


def replicas(homes: list[Path], tiny: ResolvedModel, *extra: str) -> list[ServerProcess]:
    """A `loramux serve` process for each data dir (one may appear twice), started at once."""
    args = ["--base-model", str(tiny.path), "--device", "cpu", "--lora-kernel", "eager"]
    args += ["--admin-keys", ADMIN_KEY, "--grpc-workers", "16", "--compute-threads", "1"]
    servers = [ServerProcess(home, *args, *extra) for home in homes]
    count = len(servers)
    try:
        with ThreadPoolExecutor(count) as pool:
            # Generous: two model loads at once on a shared, loaded machine (not a speed check).
            list(pool.map(lambda s: s.start(timeout=900), servers))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def device_slots_used(server: ServerProcess) -> float:
    text = scrape(server.metrics_port)
    for line in text.splitlines():
        if line.startswith('loramux_memory_bytes{part="adapters_device_used"}'):
            return float(line.split()[-1])
    raise AssertionError("no adapters_device_used series")


def test_two_replicas_behind_nginx_share_a_postgres_registry(
    home: Path, tiny_llama: ResolvedModel, adapters: list[Path], postgres: Postgres
) -> None:
    """A data dir each (as pods have), one database and one shared --adapter-dir."""
    homes = [home.parent / "home-a", home.parent / "home-b"]
    for own in homes:
        own.mkdir()
        (own / "models").symlink_to(home / "models", target_is_directory=True)
    shared = home.parent / "shared-volume"
    a, b = replicas(homes, tiny_llama, "--registry", postgres.url, "--adapter-dir", str(shared))
    nginx = Nginx([a.address, b.address])
    try:
        nginx.start()
        names = [f"fleet-{i}" for i in range(ADAPTERS)]
        with LoramuxClient(a.address, ADMIN_KEY) as via_a:
            for folder, name in zip(adapters, names, strict=True):
                via_a.upload_adapter(folder, name)

        # Generate through nginx: each adapter's requests land on one replica.
        with LoramuxClient(nginx.address, ADMIN_KEY) as client:
            for _ in range(3):
                for name in names:
                    reply = client.generate("Hi", adapter=name, max_new_tokens=2, ignore_eos=True)
                    assert reply.completion_tokens == 2
        served = {s.port: request_counts(scrape(s.metrics_port)) for s in (a, b)}
        home_of = {}
        for name in names:
            counts = {port: served[port].get(f"admin/{name}@v1", 0.0) for port in served}
            assert sorted(counts.values()) == [0.0, 3.0], (name, counts)
            home_of[name] = max(counts, key=lambda p: counts[p])
        assert set(home_of.values()) == {a.port, b.port}  # the hash spreads the adapters

        # The async client sends the header too: an adapter homed on each replica, so a
        # call without it (the empty key hashes to one replica) would miss one of them.
        pair = [next(n for n in names if home_of[n] == s.port) for s in (a, b)]

        def logged(name: str) -> int:
            lines = nginx.access_log.read_text().splitlines()
            return sum(1 for line in lines if line.split(" ", 1)[0] == name)

        # nginx writes a request's log line after the response has gone out, so a client
        # can be done before the line is: wait for the lines of the calls made so far.
        assert eventually(lambda: sum(logged(name) for name in names) == 3 * len(names), 10)
        before = [logged(name) for name in pair]

        async def through_async() -> None:
            async with AsyncLoramuxClient(nginx.address, ADMIN_KEY) as aclient:
                await aclient.generate("Hi", adapter=pair[0], max_new_tokens=2)
                async for _ in aclient.generate_stream("Hi", adapter=pair[1], max_new_tokens=2):
                    pass

        asyncio.run(through_async())
        expected = [n + 1 for n in before]
        assert eventually(lambda: [logged(name) for name in pair] == expected, 10), (
            [logged(name) for name in pair],
            expected,
        )
        after = {s.port: request_counts(scrape(s.metrics_port)) for s in (a, b)}
        for name in pair:
            assert after[home_of[name]][f"admin/{name}@v1"] == 4.0

        # Delete through B an adapter that A serves from a device slot: A refuses it and
        # frees the slot within 2 s.
        on_a = next(n for n in names if home_of[n] == a.port)
        with (
            LoramuxClient(a.address, ADMIN_KEY) as via_a,
            LoramuxClient(b.address, ADMIN_KEY) as via_b,
        ):
            assert via_a.get_adapter(on_a).state == "device"
            slots_before = device_slots_used(a)
            via_b.delete_adapter(on_a)

            def gone_from_a() -> bool:
                try:
                    via_a.generate("Hi", adapter=on_a, max_new_tokens=1)
                except NotFound:
                    return True
                return False

            assert eventually(gone_from_a, PROPAGATION_SECONDS)
            assert eventually(lambda: device_slots_used(a) < slots_before, PROPAGATION_SECONDS)

            # Publish and key revocation on A hold on B within 2 s.
            via_a.create_tenant("guest")
            key_id, key = via_a.create_key("guest")
            with LoramuxClient(b.address, key) as guest_on_b:
                target = next(n for n in names if n != on_a)
                with pytest.raises(NotFound):
                    guest_on_b.get_adapter(f"admin/{target}")
                via_a.set_adapter_public("admin", target)
                assert eventually(
                    lambda: guest_on_b.get_adapter(f"admin/{target}").public,
                    PROPAGATION_SECONDS,
                )
                via_a.revoke_key(key_id)

                def refused() -> bool:
                    try:
                        guest_on_b.list_adapters()
                    except Unauthenticated:
                        return True
                    return False

                assert eventually(refused, PROPAGATION_SECONDS)

            # A tenant's quota holds across replicas: two uploads at once, one through each.
            via_a.create_tenant("small", max_adapters=1)
            _, small_key = via_a.create_key("small")
            barrier = threading.Barrier(2)

            def upload(address: str, name: str) -> object:
                with LoramuxClient(address, small_key) as client:
                    barrier.wait()
                    try:
                        return client.upload_adapter(adapters[0], name)
                    except ResourceExhausted as exc:
                        return exc

            with ThreadPoolExecutor(2) as pool:
                outcomes = list(pool.map(upload, (a.address, b.address), ("first", "second")))
            assert sorted(type(o).__name__ for o in outcomes) == ["Adapter", "ResourceExhausted"]

        # Issue 28: an alias moved through one replica holds on both for every request that
        # starts after the move returned (each request reads the registry at admission).
        with (
            LoramuxClient(a.address, ADMIN_KEY) as via_a,
            LoramuxClient(b.address, ADMIN_KEY) as via_b,
        ):
            for folder in adapters[:2]:
                via_a.upload_adapter(folder, "canaried")

            def tokens(client: LoramuxClient, ref: str) -> list[int]:
                reply = client.generate("Hi", adapter=ref, max_new_tokens=4, ignore_eos=True)
                return reply.token_ids

            want = {v: tokens(via_a, f"canaried@{v}") for v in ("v1", "v2")}
            assert want["v1"] != want["v2"]
            via_b.set_alias("canaried", "prod", "v1")
            assert [tokens(c, "canaried@prod") for c in (via_a, via_b)] == [want["v1"]] * 2
            via_b.set_alias("canaried", "prod", "v2")
            for client in (via_a, via_b, via_a, via_b):
                assert tokens(client, "canaried@prod") == want["v2"]
            assert via_a.rollback_alias("canaried", "prod") == {"v1": 100}
            assert [tokens(c, "canaried@prod") for c in (via_b, via_a)] == [want["v1"]] * 2
            via_b.delete_adapter("canaried")  # what follows counts the 19 fleet adapters

        # Stop A: every adapter still answers through nginx, now from B.
        a.stop()
        with LoramuxClient(nginx.address, ADMIN_KEY) as client:
            for name in names:
                if name == on_a:
                    continue
                reply = client.generate("Hi", adapter=name, max_new_tokens=2, ignore_eos=True)
                assert reply.completion_tokens == 2
        with LoramuxClient(b.address, ADMIN_KEY) as via_b:
            digests = {adapter.id for adapter in via_b.list_adapters()}
        assert len(digests) == ADAPTERS - 1
        assert digests <= {p.name for p in shared.iterdir()}  # the files: on the shared volume
        assert not any(
            (own / "adapters").exists() and any((own / "adapters").iterdir()) for own in homes
        )
        final = request_counts(scrape(b.metrics_port))
        moved = [n for n in names if home_of[n] == a.port and n != on_a]
        assert moved and all(final.get(f"admin/{n}@v1", 0.0) >= 1.0 for n in moved)

    finally:
        nginx.stop()
        for server in (a, b):
            server.stop()


def test_two_replicas_on_the_sqlite_default(
    home: Path, tiny_llama: ResolvedModel, adapters: list[Path]
) -> None:
    """Replicas on one host sharing a data dir share the SQLite registry and the adapter
    files (and see each other's deletes within 2 s); device slots, the per-tenant limits
    on running requests and the metrics stay per replica."""
    a, b = replicas([home, home], tiny_llama)
    try:
        with (
            LoramuxClient(a.address, ADMIN_KEY) as via_a,
            LoramuxClient(b.address, ADMIN_KEY) as via_b,
        ):
            via_a.upload_adapter(adapters[0], "shared")
            reply = via_b.generate("Hi", adapter="shared", max_new_tokens=2, ignore_eos=True)
            assert reply.completion_tokens == 2
            # Not shared: which adapters sit in device slots.
            assert via_b.get_adapter("shared").state == "device"
            assert via_a.get_adapter("shared").state == "stored"
            assert request_counts(scrape(a.metrics_port)).get("admin/shared@v1", 0.0) == 0.0

            slots_before = device_slots_used(b)
            via_a.delete_adapter("shared")
            with pytest.raises(NotFound):
                via_b.get_adapter("shared")
            assert eventually(lambda: device_slots_used(b) < slots_before, PROPAGATION_SECONDS)
            assert adapter_states(scrape(b.metrics_port)).get("device", 0.0) == 0.0
    finally:
        for server in (a, b):
            server.stop()


def test_adapter_named_by_metadata(
    home: Path, tiny_llama: ResolvedModel, adapters: list[Path]
) -> None:
    """`multiplexed_model_id` (Ray Serve) and `loramux-adapter` name the adapter of a message
    that names none; a message and metadata that disagree are refused, naming the field."""
    (server,) = replicas([home], tiny_llama)
    try:
        with LoramuxClient(server.address, ADMIN_KEY) as client:
            client.upload_adapter(adapters[1], "by-meta")
            expected = client.generate("Hi", adapter="by-meta", max_new_tokens=6, ignore_eos=True)
            base = client.generate("Hi", max_new_tokens=6, ignore_eos=True)
            assert expected.token_ids != base.token_ids  # the adapter changes the output
        auth = ("authorization", f"Bearer {ADMIN_KEY}")
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            request = pb.GenerateRequest(prompt="Hi", max_new_tokens=6, ignore_eos=True)
            for key in ("multiplexed_model_id", "loramux-adapter"):
                reply = stub.Generate(request, metadata=(auth, (key, "by-meta")), timeout=60)
                assert list(reply.token_ids) == expected.token_ids, key
            named = pb.GenerateRequest(prompt="Hi", adapter="by-meta", max_new_tokens=2)
            for metadata, field in (
                ((("multiplexed_model_id", "other"),), "adapter"),
                ((("loramux-adapter", "other"),), "adapter"),
                (
                    (("loramux-adapter", "by-meta"), ("multiplexed_model_id", "x")),
                    "multiplexed_model_id",
                ),
            ):
                with pytest.raises(grpc.RpcError) as error:
                    stub.Generate(named, metadata=(auth, *metadata), timeout=60)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                trailing = dict(error.value.trailing_metadata() or ())
                assert trailing.get("loramux-error-field") == field, metadata
            same = stub.Generate(
                named, metadata=(auth, ("multiplexed_model_id", "by-meta")), timeout=60
            )
            assert len(same.token_ids) == 2
    finally:
        server.stop()
