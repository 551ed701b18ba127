"""How soon a registry change made by one replica reaches another.

Two registries on one database (two replicas' views) and a `RegistryWatcher` on the second:
the first commits a change (a new tenant: one write transaction, as a delete or a key
revocation is), and the time until the watcher's callback runs is recorded. On PostgreSQL
the watcher wakes on NOTIFY; on SQLite it polls the change counter every
--registry-poll-seconds.

    python -m bench.propagation                              # SQLite in a temporary folder
    python -m bench.propagation --registry postgresql://...  # an empty PostgreSQL database
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from loramux.server.changes import RegistryWatcher
from loramux.server.registry import Quota, Registry

QUOTA = Quota(max_concurrent=1, max_queued=1, max_adapters=1, max_bytes=1)


def measure(registry_url: str, changes: int, poll_seconds: float) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="loramux-propagation-"))
    writer = Registry(root, QUOTA, registry_url, root / "shared")
    reader = Registry(root, QUOTA, registry_url, root / "shared")
    seen = threading.Event()
    watcher = RegistryWatcher(reader, seen.set, poll_seconds).start()
    seconds = []
    try:
        time.sleep(poll_seconds * 2)  # the watcher is waiting (and LISTENing) before we write
        for _ in range(changes):
            seen.clear()
            started = time.perf_counter()
            writer.ensure_tenant(f"p{uuid.uuid4().hex[:12]}")
            if not seen.wait(10):
                raise RuntimeError("the change did not arrive within 10 s")
            seconds.append(time.perf_counter() - started)
    finally:
        watcher.stop()
        writer.close()
        reader.close()
    return {
        "backend": registry_url.split(":", 1)[0],
        "changes": changes,
        "poll_seconds": poll_seconds,
        "median_s": statistics.median(seconds),
        "p90_s": statistics.quantiles(seconds, n=10)[-1],
        "max_s": max(seconds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registry", default="sqlite")
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--poll-seconds", type=float, default=0.5)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.registry, args.changes, args.poll_seconds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
