"""ListAdapters at scale: the first page and a walk over every page, at two registry sizes.

A registry is filled with N adapter names (one version each, a third of them public, the
rest spread over 100 tenants; rows written in one transaction, no files: listing reads
rows only), then one tenant lists as ListAdapters does (`Registry.list_names` + the
versions its default aliases serve): the first page's latency (median of --repeats, the
sizes timed in turns) and the time to walk every page. On a shared machine the median
carries other processes' time slices; the minimum is the listing's own cost. The sizes run
side by side in one process, so the ratio of first-page latencies says whether the first
page grows with the registry.

    python -m bench.listing                                   # SQLite, 1,000 vs 100,000
    python -m bench.listing --registry postgresql://.../postgres  # a database per size made there
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from loramux.server.listing import AdapterQuery
from loramux.server.registry import AdapterRecord, Quota, Registry

QUOTA = Quota(max_concurrent=1, max_queued=1, max_adapters=10**9, max_bytes=10**18)
TENANTS = 100


def fill(registry: Registry, count: int) -> None:
    """`count` names over TENANTS tenants (every third public), one version each."""
    now = int(time.time())
    names = [(f"t{i % TENANTS:03d}", f"adapter-{i:06d}", int(i % 3 == 0)) for i in range(count)]
    with registry._db.transaction() as tx:  # one transaction: the bench measures reads
        for owner, name, public in names:
            tx.execute(
                "INSERT INTO adapter_names (owner, name, public, created_at, next_version) "
                "VALUES (?, ?, ?, ?, 2)",
                (owner, name, public, now),
            )
            tx.execute(
                "INSERT INTO adapter_versions (owner, name, version, digest, source, sha256, "
                "rank, alpha, use_rslora, target_modules, size_bytes, created_at) "
                "VALUES (?, ?, 1, ?, 'upload', ?, 8, 16.0, 0, ?, 1000, ?)",
                (owner, name, "0" * 64, "0" * 64, '["q_proj"]', now),
            )
            tx.execute(
                "INSERT INTO adapter_aliases VALUES (?, ?, 'default', '[[1, 100]]', NULL, ?)",
                (owner, name, now),
            )


def page(
    registry: Registry, query: AdapterQuery, size: int, after: tuple[str, str] | None
) -> tuple[list[tuple[str, str]], list[AdapterRecord]]:
    names = registry.list_names(query, size, after)
    return names, registry.served_versions(names)


def first_page_ms(registry: Registry, query: AdapterQuery, page_size: int) -> float:
    started = time.perf_counter()
    page(registry, query, page_size, None)
    return 1000 * (time.perf_counter() - started)


def walk(registry: Registry, query: AdapterQuery, page_size: int) -> tuple[int, int, float]:
    """(adapters seen, pages, seconds) listing every page."""
    started = time.perf_counter()
    seen = pages = 0
    after: tuple[str, str] | None = None
    while True:
        names, records = page(registry, query, page_size, after)
        if not names:
            return seen, pages, time.perf_counter() - started
        seen, pages, after = seen + len(records), pages + 1, names[-1]


def measure(
    registry_urls: Sequence[str], counts: Sequence[int], page_size: int, repeats: int
) -> list[dict[str, object]]:
    """Every size filled first, then the first pages timed in turns (size after size, each
    repeat), so a machine that gets busier or quieter meanwhile weighs on every size alike."""
    query = AdapterQuery("t000")
    registries = []
    try:
        for url, count in zip(registry_urls, counts, strict=True):
            root = Path(tempfile.mkdtemp(prefix="loramux-listing-"))
            registries.append(Registry(root, QUOTA, url, root / "adapters"))
            fill(registries[-1], count)
        first: list[list[float]] = [[] for _ in counts]
        for _ in range(repeats):
            for i, registry in enumerate(registries):
                first[i].append(first_page_ms(registry, query, page_size))
        walks = [walk(registry, query, page_size) for registry in registries]
    finally:
        for registry in registries:
            registry.close()
    return [
        {
            "backend": url.split(":", 1)[0],
            "adapters": count,
            "visible": seen,
            "page_size": page_size,
            "first_page_ms": statistics.median(times),
            "first_page_min_ms": min(times),  # the cost itself, with no other process between
            "pages": pages,
            "walk_s": seconds,
        }
        for url, count, times, (seen, pages, seconds) in zip(
            registry_urls, counts, first, walks, strict=True
        )
    ]


def fresh(registry_url: str) -> str:
    """`sqlite` (a new temporary folder each time), or a new database on the PostgreSQL
    server that `registry_url` reaches."""
    if registry_url == "sqlite":
        return registry_url
    import uuid

    import psycopg

    name = f"loramux_listing_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(registry_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return registry_url.rsplit("/", 1)[0] + f"/{name}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.listing", description=__doc__)
    parser.add_argument("--registry", default="sqlite", help="sqlite, or an EMPTY postgresql:// db")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    urls = [fresh(args.registry) for _ in args.sizes]
    results = measure(urls, args.sizes, args.page_size, args.repeats)
    for result in results:
        print(json.dumps(result))
    for key in ("first_page_ms", "first_page_min_ms"):
        base = float(results[0][key])  # type: ignore[arg-type]
        for result in results[1:]:
            ratio = float(result[key]) / base  # type: ignore[arg-type]
            print(f"{key} at {result['adapters']} / at {results[0]['adapters']}: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
