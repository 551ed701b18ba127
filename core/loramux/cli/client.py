"""Client commands: `loramux generate`, `loramux adapters ...`, `loramux tenants ...`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loramux.core.config import add_settings_arguments, load_settings
from loramux.core.errors import FailedPrecondition

# `tenants create` flags, TenantQuota's fields (0: the server's default)
QUOTA_FIELDS = (
    "max_concurrent",
    "max_queued",
    "max_adapters",
    "max_bytes",
    "requests_per_minute",
    "tokens_per_minute",
)


def _client(args: argparse.Namespace) -> Any:
    from loramux.client import LoramuxClient

    settings = load_settings(args)
    return LoramuxClient(
        settings.address,
        settings.api_key,
        tls=settings.client_tls,
        ca_file=settings.tls_ca_file,
        client_cert=settings.tls_client_cert,
        client_key=settings.tls_client_key,
        server_name=settings.tls_server_name,
    )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    generate = sub.add_parser(
        "generate",
        help="generate text on a running server",
        description="Send a prompt (raw, or as a chat user message with --chat) to a LoRAMux "
        "server and print the reply as it streams.",
    )
    generate.add_argument("prompt", help="prompt text")
    generate.add_argument("--adapter", default="", help="adapter name (default: the base model)")
    generate.add_argument(
        "--weighted",
        action="append",
        default=[],
        metavar="NAME=WEIGHT",
        help="adapter with a weight, instead of --adapter (repeatable: their weighted sum; "
        "one at weight 0.5 is half strength, 0 the base model)",
    )
    generate.add_argument(
        "--chat", action="store_true", help="send as a chat user message (chat template)"
    )
    generate.add_argument("--system", default=None, help="system message (with --chat)")
    generate.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.add_argument(
        "--no-stream", action="store_true", help="one unary call, print at the end"
    )
    generate.add_argument(
        "--logprobs",
        type=int,
        default=None,
        metavar="K",
        help="after the text, each generated token's log-probability (the model's raw "
        "log_softmax) and its K (0..20) most likely alternatives, one line a token",
    )
    shape = generate.add_mutually_exclusive_group()
    shape.add_argument(
        "--json-schema",
        type=Path,
        default=None,
        metavar="FILE",
        help="structured output: the reply is JSON valid against the JSON schema in FILE",
    )
    shape.add_argument(
        "--json-object", action="store_true", help="structured output: any JSON object"
    )
    shape.add_argument("--regex", default=None, help="structured output: a match of REGEX")
    shape.add_argument(
        "--choice",
        action="append",
        default=None,
        help="structured output: exactly one of these strings (repeatable)",
    )
    shape.add_argument(
        "--grammar",
        type=Path,
        default=None,
        metavar="FILE",
        help="structured output: a context-free grammar in xgrammar's EBNF, from FILE",
    )
    add_settings_arguments(generate, ["client"])
    generate.set_defaults(func=_generate)

    health = sub.add_parser(
        "health",
        help="check that a server is serving (exit 0) or not (exit 1)",
        description="Ask a server's standard gRPC health service (no key needed; TLS as "
        "configured): exit 0 when SERVING, 1 otherwise. The Docker image's HEALTHCHECK.",
    )
    health.add_argument("--service", default="", help="service name (default: the server)")
    add_settings_arguments(health, ["client"])
    health.set_defaults(func=_health)

    adapters = sub.add_parser(
        "adapters",
        help="manage adapters on a server",
        description="Upload, pull, list and manage adapters.",
    )
    actions = adapters.add_subparsers(dest="action", metavar="ACTION", required=True)
    upload = actions.add_parser(
        "upload",
        help="upload a PEFT adapter folder",
        description="Upload a PEFT "
        "adapter folder (adapter_config.json + adapter_model.safetensors).",
    )
    upload.add_argument("folder", type=Path)
    upload.add_argument("--name", default=None, help="adapter name (default: the folder's name)")
    pull = actions.add_parser(
        "pull",
        help="pull an adapter from the Hugging Face Hub",
        description="Have the server fetch a Hub repo, pinned to the commit of the revision.",
    )
    pull.add_argument("repo_id")
    pull.add_argument("--revision", default="main")
    pull.add_argument("--name", default=None, help="adapter name (default: the repo's name)")
    pull.add_argument(
        "--hub-token",
        default=None,
        help="your Hub token, for a private repo (used by the server for this pull only)",
    )
    actions.add_parser(
        "list", help="list visible adapters", description="List your adapters and public ones."
    )
    download = actions.add_parser(
        "download",
        help="download a stored version as a PEFT folder",
        description="Write a stored version's files (checked against their sha256) into DIR: "
        "a folder PeftModel.from_pretrained loads. NAME may carry @v3 or @alias.",
    )
    download.add_argument("name", metavar="NAME[@VERSION]")
    download.add_argument("dir", type=Path)
    push = actions.add_parser(
        "push",
        help="publish a stored version to a Hugging Face Hub repo",
        description="Download NAME[@VERSION] from the server and push its files to REPO_ID "
        "on the Hub in one commit, printing the commit. The Hub token is yours (--hub-token, "
        "else HF_TOKEN or `hf auth login`) and never reaches the LoRAMux server.",
    )
    push.add_argument("name", metavar="NAME[@VERSION]")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--branch", default=None, help="push to this branch (default: main)")
    push.add_argument("--hub-token", default=None, help="your Hub token")
    push.add_argument("--hub-endpoint", default=None, help="the Hub (default: HF_ENDPOINT)")
    versions = actions.add_parser(
        "versions",
        help="list a name's versions and aliases",
        description="List a name's versions and aliases.",
    )
    versions.add_argument("name")
    alias = actions.add_parser(
        "alias",
        help="point an alias at a version or a weighted split",
        description="Point ALIAS of NAME at versions, atomically: `v3` or `v3:90 v4:10` "
        "(weights sum to 100). --rollback restores where it pointed before; --delete "
        "removes it.",
    )
    alias.add_argument("name")
    alias.add_argument("alias")
    alias.add_argument("targets", nargs="*", metavar="VERSION[:WEIGHT]")
    alias.add_argument("--rollback", action="store_true")
    alias.add_argument("--delete", action="store_true")
    for action, text in (
        ("show", "show one adapter"),
        ("rm", "delete an adapter name (all versions), or one version as NAME@v3"),
        ("load", "warm an adapter into a device slot"),
        ("unload", "evict an adapter from device and CPU memory"),
    ):
        parser = actions.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        parser.add_argument("name")
    for parser in actions.choices.values():
        add_settings_arguments(parser, ["client"])
        parser.add_argument("--json", action="store_true", help="print JSON")
    adapters.set_defaults(func=_adapters)

    tenants = sub.add_parser(
        "tenants",
        help="manage tenants and keys (admin)",
        description="Create tenants and API keys; needs an admin key.",
    )
    t_actions = tenants.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = t_actions.add_parser("create", help="create a tenant", description="Create a tenant.")
    create.add_argument("name")
    create.add_argument("--admin", action="store_true")
    for quota in QUOTA_FIELDS:
        create.add_argument(f"--{quota.replace('_', '-')}", dest=quota, type=int, default=0)
    t_actions.add_parser("list", help="list tenants", description="List tenants.")
    key = t_actions.add_parser(
        "key", help="create an API key for a tenant", description="Create an API key."
    )
    key.add_argument("tenant")
    revoke = t_actions.add_parser(
        "revoke", help="revoke an API key", description="Revoke an API key."
    )
    revoke.add_argument("key_id")
    publish = t_actions.add_parser(
        "publish",
        help="make an adapter public (or --private)",
        description="Mark an adapter public so every tenant can use it.",
    )
    publish.add_argument("owner")
    publish.add_argument("name")
    publish.add_argument("--private", action="store_true")
    for parser in t_actions.choices.values():
        add_settings_arguments(parser, ["client"])
    tenants.set_defaults(func=_tenants)


def _weighted(entries: list[str]) -> list[tuple[str, float]] | None:
    """NAME=WEIGHT pairs from --weighted (None when not given)."""
    if not entries:
        return None
    pairs = []
    for entry in entries:
        name, sep, weight = entry.rpartition("=")
        try:
            pairs.append((name, float(weight)))
        except ValueError:
            sep = ""
        if not sep or not name:
            raise SystemExit(f"--weighted takes NAME=WEIGHT, got {entry!r}")
    return pairs


def _generate(args: argparse.Namespace) -> int:
    kwargs: dict[str, Any] = {
        "adapter": args.adapter,
        "adapters": _weighted(args.weighted),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
        "logprobs": args.logprobs,
        "json_object": args.json_object,
        "regex": args.regex,
        "choice": args.choice,
    }
    try:
        if args.json_schema is not None:
            kwargs["json_schema"] = args.json_schema.read_text()
        if args.grammar is not None:
            kwargs["grammar"] = args.grammar.read_text()
    except OSError as exc:
        raise SystemExit(f"cannot read {exc.filename}: {exc.strerror}") from None
    if args.chat:
        messages = [("system", args.system)] if args.system else []
        kwargs["messages"] = [*messages, ("user", args.prompt)]
        prompt = None
    else:
        prompt = args.prompt
    with _client(args) as client:
        if args.no_stream or args.logprobs is not None:
            done = client.generate(prompt, **kwargs)
            print(done.text)
            for scored in done.logprobs:
                top = "  ".join(f"{t.text!r} {t.logprob:.4f}" for t in scored.top)
                print(f"{scored.text!r}\t{scored.logprob:.4f}\t{top}")
            return 0
        for chunk in client.generate_stream(prompt, **kwargs):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        print()
    return 0


def _health(args: argparse.Namespace) -> int:
    """Exit 1 for anything but SERVING (unreachable too): Docker's code for unhealthy."""
    from loramux.core.errors import LoramuxError

    try:
        with _client(args) as client:
            status = client.health(args.service)
    except LoramuxError as exc:
        print(f"loramux health: {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _print_adapter(adapter: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(asdict(adapter), indent=2))
    else:
        origin = (
            f"{adapter.repo_id}@{adapter.revision[:12]}"
            if adapter.source == "hub"
            else adapter.sha256[:12]
        )
        print(
            f"{adapter.owner}/{adapter.name:<24} r={adapter.rank:<3} {adapter.state:<7} "
            f"{adapter.size_bytes / 1e6:7.1f} MB  {adapter.source}:{origin}"
        )


def _adapters(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "upload":
            adapter = client.upload_adapter(args.folder, args.name or args.folder.resolve().name)
        elif args.action == "pull":
            adapter = client.pull_adapter(
                args.repo_id, args.revision, args.name, hub_token=args.hub_token
            )
        elif args.action == "list":
            adapters = client.list_adapters()
            if args.json:
                print(json.dumps([asdict(a) for a in adapters], indent=2))
            for a in adapters if not args.json else []:
                _print_adapter(a, False)
            return 0
        elif args.action == "download":
            adapter = client.download_adapter(args.name, args.dir)
            print(f"wrote {adapter.ref} to {args.dir}")
            return 0
        elif args.action == "push":
            return _push(client, args)
        elif args.action == "versions":
            found, aliases = client.list_versions(args.name)
            if args.json:
                print(json.dumps({"versions": [asdict(a) for a in found], "aliases": aliases}))
                return 0
            for a in found:
                print(f"v{a.version:<4} {a.id[:12]}  {a.size_bytes:>10} B  {' '.join(a.aliases)}")
            for name, split in aliases.items():
                print(f"{name} = {', '.join(f'{v}: {w}' for v, w in split.items())}")
            return 0
        elif args.action == "alias":
            return _alias(client, args)
        elif args.action == "rm":
            client.delete_adapter(args.name)
            print(f"deleted {args.name}")
            return 0
        else:
            adapter = {
                "show": client.get_adapter,
                "load": client.load_adapter,
                "unload": client.unload_adapter,
            }[args.action](args.name)
        _print_adapter(adapter, args.json)
    return 0


def _push(client: Any, args: argparse.Namespace) -> int:
    """The stored version, downloaded to a private folder, pushed as the trainer publishes."""
    import tempfile

    try:
        from loramux.trainer.publish import push_to_hub
    except ImportError as exc:  # the trainer's Hub upload is what pushes
        raise FailedPrecondition("push", f"the LoRAMux trainer is not installed: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="loramux-push-") as folder:
        adapter = client.download_adapter(args.name, folder)
        published = push_to_hub(
            Path(folder),
            args.repo_id,
            private=args.private,
            branch=args.branch,
            token=args.hub_token,
            endpoint=args.hub_endpoint,
            commit_message=f"Upload {adapter.ref} (LoRAMux)",
        )
    print(f"pushed {adapter.ref} to {published.url}")
    print(f"commit {published.commit_sha} {published.commit_url}")
    return 0


def _alias(client: Any, args: argparse.Namespace) -> int:
    if args.delete:
        client.delete_alias(args.name, args.alias)
        print(f"deleted alias {args.alias} of {args.name}")
        return 0
    if args.rollback:
        split = client.rollback_alias(args.name, args.alias)
    else:
        targets: dict[str, int] = {}
        for target in args.targets:
            version, _, weight = target.partition(":")
            try:
                targets[version] = int(weight) if weight else 100
            except ValueError:
                raise SystemExit(f"{target!r}: a weight is an integer (v3:90)") from None
        client.set_alias(args.name, args.alias, targets)
        split = targets
    print(f"{args.name}@{args.alias} = {', '.join(f'{v}: {w}' for v, w in split.items())}")
    return 0


def _tenants(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "create":
            quota = {q: getattr(args, q) for q in QUOTA_FIELDS}
            tenant = client.create_tenant(args.name, admin=args.admin, **quota)
            print(f"created tenant {tenant.name}")
        elif args.action == "list":
            for tenant in client.list_tenants():
                q = tenant.quota
                print(
                    f"{tenant.name:<24} admin={tenant.admin} concurrent={q.max_concurrent} "
                    f"queued={q.max_queued} adapters={q.max_adapters} bytes={q.max_bytes} "
                    f"requests/min={q.requests_per_minute} tokens/min={q.tokens_per_minute}"
                )
        elif args.action == "key":
            key_id, key = client.create_key(args.tenant)
            print(f"key_id {key_id}\nkey    {key}\n(shown once; the server keeps only its hash)")
        elif args.action == "revoke":
            client.revoke_key(args.key_id)
            print(f"revoked {args.key_id}")
        else:
            adapter = client.set_adapter_public(args.owner, args.name, not args.private)
            print(f"{adapter.owner}/{adapter.name} public={adapter.public}")
    return 0
