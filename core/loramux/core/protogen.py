"""Generate the Python protobuf/gRPC code in clients/python/loramux/v1 from proto/.

`python -m loramux.core.protogen` rewrites the generated files; `--check` only compares
and exits 1 when the checked-in code is stale (the test suite runs it).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PROTO_ROOT = REPO / "proto"
OUT_ROOT = REPO / "clients" / "python"  # the client package holds the generated code
PACKAGE_DIR = Path("loramux") / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc into `out_root`; return the generated files relative to it."""
    from grpc_tools import protoc

    files = proto_files()
    if not files:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    (out_root / PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(f.relative_to(PROTO_ROOT)) for f in files],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = out_root / PACKAGE_DIR / "__init__.py"
    init.write_text('"""Generated from proto/loramux/v1 by `make proto`; do not edit."""\n')
    return sorted(
        p.relative_to(out_root) for p in (out_root / PACKAGE_DIR).iterdir() if p.is_file()
    )


def stale_files() -> list[str]:
    """Generated files that differ from (or are missing in) the checked-in tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        current = {
            p.relative_to(OUT_ROOT)
            for p in (OUT_ROOT / PACKAGE_DIR).glob("*")
            if p.is_file() and p.suffix in (".py", ".pyi")
        }
        stale = [
            str(rel)
            for rel in fresh
            if not (OUT_ROOT / rel).is_file()
            or not filecmp.cmp(Path(tmp) / rel, OUT_ROOT / rel, shallow=False)
        ]
        stale += [str(rel) for rel in current - set(fresh)]
    return sorted(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale generated files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: clients/python/{name} (run `make proto`)")
        return 1 if stale else 0
    for rel in generate(OUT_ROOT):
        print(f"wrote clients/python/{rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
