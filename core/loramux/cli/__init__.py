"""The `loramux` command: one entry point, a subcommand per job.

Each part of LoRAMux registers its own subcommands (server: `serve`; trainer: `train`,
`publish`; client: `generate`, `adapters`, `tenants`; core: `models`). Registration
imports nothing heavy, so `loramux --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from loramux.core.errors import LoramuxError

# Modules exposing `register(subparsers)`, in the order their commands are listed.
COMMAND_MODULES = (
    "loramux.server.cli",
    "loramux.cli.client",
    "loramux.trainer.cli",
    "loramux.cli.models",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramux",
        description=(
            "LoRAMux: train LoRA adapters with QLoRA, publish them, and serve many of them "
            "at once on one 4-bit base model over gRPC."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", None) or "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (LoramuxError, ValueError) as exc:
        print(f"loramux {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
