"""Which base-model modules a LoRA config wraps, and with which rank/alpha pattern key.

PEFT's rules (0.21 and 0.22), restated (`check_target_module_exists`, `get_pattern_key` and
`LoraModel._create_and_replace`), for one config and the names of every module of the base
model (`model.named_modules()`, before any wrapping):

* `exclude_modules`: a string is `re.fullmatch`ed against the name; a list matches the name
  itself or any `.`-suffix of it. Excluded modules are never wrapped.
* `target_modules`: a string is `re.fullmatch`ed (and "all-linear", any case, means every
  linear layer but the output head); a list matches the name or a `.`-suffix, and only that
  suffix form is then narrowed by `layers_to_transform` (an int or a list; the layer index is
  the first `.<pattern>.<digits>.` in the name, `<pattern>` from `layers_pattern` or any
  segment).
* `rank_pattern` / `alpha_pattern`: the first key, in file order, for which
  `re.match(rf"(.*\\.)?({key})$", name)` matches gives the module's rank / alpha.

Everything but a string in those fields is plain string work. A string is a tenant's regular
expression, and Python's `re` backtracks: `"(.|.)*y"` takes 2^n steps on an n-character
name, holding the GIL all along, so one such config would freeze every thread of the server.
Those configs are matched by this same file run as a child process (stdlib only, `-I -S`)
under a CPU-time limit: exactly PEFT's semantics (the same `re`), the server's interpreter
never blocked, and a pattern that does not finish is refused naming its field (the child
reports each field before it starts on it).
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

# Fields whose strings are regular expressions written by the tenant.
REGEX_FIELDS = (
    "exclude_modules",
    "target_modules",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
)
ALL_LINEAR = "all-linear"
CPU_SECONDS = 3  # a real config (hundreds of keys x thousands of modules) takes milliseconds
WALL_SECONDS = 20.0  # the CPU limit is what bounds the child; this only guards a stuck one
MEMORY_BYTES = 1 << 30
# PEFT's own expression for the layer index when no layers_pattern is given (ours, not a tenant's).
_DEFAULT_LAYER = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


class TargetError(Exception):
    """A field that PEFT would refuse, or that could not be matched in time."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def needs_child(targeting: Mapping[str, Any]) -> bool:
    """Whether the config holds any tenant-written regular expression."""
    target = targeting.get("target_modules")
    return (
        (isinstance(target, str) and target.lower() != ALL_LINEAR)
        or isinstance(targeting.get("exclude_modules"), str)
        or bool(targeting.get("layers_pattern"))
        or bool(targeting.get("rank_pattern"))
        or bool(targeting.get("alpha_pattern"))
    )


def _compile(field: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise TargetError(field, f"{pattern!r} is not a regular expression ({exc})") from exc


def _suffix_match(name: str, keys: frozenset[str]) -> bool:
    """PEFT's `name in keys or any(name.endswith(f".{key}") for key in keys)`, in time that
    grows with the name's segments, not with the number of keys (a 1 MiB config holds
    100,000 of them): `name` ends with ".key" exactly when key is what follows one of its dots."""
    if name in keys:
        return True
    return any(name[i + 1 :] in keys for i, char in enumerate(name) if char == ".")


def _layer_index(name: str, patterns: list[re.Pattern[str]]) -> int | None:
    match = None
    if not patterns:
        match = _DEFAULT_LAYER.match(name)
    for pattern in patterns:
        match = pattern.match(name)
        if match is not None:
            break
    return int(match["idx"]) if match is not None else None


def match_modules(
    targeting: Mapping[str, Any],
    names: Sequence[str],
    linears: Sequence[str],
    progress: Any = None,
) -> dict[str, Any]:
    """PEFT's matching for one config: which modules it wraps, and why others are not.

    Returns {"wrapped": {name: [rank key index or None, alpha key index or None]},
    "excluded": [...], "other_layers": [...]} (the last two: names the target_modules alone
    would have wrapped). `progress(field)` is called before each field is evaluated.
    """

    def step(field: str) -> None:
        if progress is not None:
            progress(field)

    exclude = targeting.get("exclude_modules")
    target = targeting["target_modules"]
    excluded: set[str] = set()
    if exclude:
        step("exclude_modules")
        if isinstance(exclude, str):
            pattern = _compile("exclude_modules", exclude)
            excluded = {n for n in names if pattern.fullmatch(n)}
        else:
            excluded_keys = frozenset(exclude)
            excluded = {n for n in names if _suffix_match(n, excluded_keys)}

    step("target_modules")
    exact: set[str] = set()  # matched outright
    by_suffix: set[str] = set()  # matched by a `.`-suffix: narrowed by layers_to_transform
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        exact = set(linears) & set(names)
    elif isinstance(target, str):
        pattern = _compile("target_modules", target)
        exact = {n for n in names if pattern.fullmatch(n)}
    else:
        target_keys = frozenset(target)
        exact = {n for n in names if n in target_keys}
        by_suffix = {n for n in names if n not in exact and _suffix_match(n, target_keys)}
    excluded_targets = sorted((exact | by_suffix) & excluded)
    exact -= excluded
    by_suffix -= excluded

    other_layers: list[str] = []
    indexes: Any = targeting.get("layers_to_transform")
    using = indexes is not None and (len(indexes) != 0 if isinstance(indexes, list) else True)
    if using and by_suffix:
        step("layers_pattern")
        raw = targeting.get("layers_pattern") or []
        raw = [raw] if isinstance(raw, str) else list(raw)
        patterns = [_compile("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in raw]
        wanted = {indexes} if isinstance(indexes, int) else set(indexes)
        for name in sorted(by_suffix):
            if _layer_index(name, patterns) not in wanted:
                by_suffix.discard(name)
                other_layers.append(name)
    chosen = exact | by_suffix
    wrapped = [n for n in names if n in chosen]

    keys: dict[str, list[int | None]] = {n: [None, None] for n in wrapped}
    for slot, field in enumerate(("rank_pattern", "alpha_pattern")):
        pattern_keys = list(targeting.get(field) or {})
        if not pattern_keys:
            continue
        step(field)
        compiled = [_compile(field, rf"(.*\.)?({key})$") for key in pattern_keys]
        for name in wrapped:
            keys[name][slot] = next((i for i, c in enumerate(compiled) if c.match(name)), None)
    return {"wrapped": keys, "excluded": excluded_targets, "other_layers": other_layers}


# At most two children at once (each may burn CPU_SECONDS): a flood of hostile uploads
# queues here instead of taking every core from the engine.
_CHILDREN = threading.BoundedSemaphore(2)


class Busy(Exception):
    """Every child slot stayed taken for WALL_SECONDS."""


def plan_targets(
    targeting: Mapping[str, Any], names: Sequence[str], linears: Sequence[str]
) -> dict[str, Any]:
    """`match_modules` in bounded time: in this process when the config holds no tenant
    regex, else in a child (results cached: the loader reads the same config again)."""
    if not needs_child(targeting):
        result = match_modules(targeting, names, linears)
    else:
        result = _in_child(json.dumps(targeting), tuple(names), tuple(linears))
    if "error" in result:
        raise TargetError(*result["error"])
    return result


@functools.lru_cache(maxsize=256)
def _in_child(targeting: str, names: tuple[str, ...], linears: tuple[str, ...]) -> dict[str, Any]:
    job = json.dumps({"targeting": json.loads(targeting), "names": names, "linears": linears})
    if not _CHILDREN.acquire(timeout=WALL_SECONDS):
        raise Busy
    try:
        # vfork + exec: safe from a threaded process; nothing of ours runs in the child
        # before exec. -I -S: no site, no environment, no current folder on the path.
        proc = subprocess.run(
            [sys.executable, "-I", "-S", __file__],
            input=job,
            capture_output=True,
            text=True,
            timeout=WALL_SECONDS,
            check=False,
        )
        out = proc.stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
    finally:
        _CHILDREN.release()
    lines = out.splitlines()
    if lines and lines[-1].startswith("RESULT "):
        result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
        return result
    fields = [line.removeprefix("FIELD ") for line in lines if line.startswith("FIELD ")]
    field = fields[-1] if fields else "target_modules"
    return {
        "error": [
            field,
            f"took too long to match against the base model's module names (over "
            f"{CPU_SECONDS} s of CPU): a regular expression that backtracks catastrophically? "
            "Name the modules (a list of names or name suffixes) instead",
        ]
    }


def _child_main() -> None:
    """Run as a child: limits first, then the matching; one line per field, then the result."""
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 1))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    job = json.loads(sys.stdin.read())

    def progress(field: str) -> None:
        sys.stdout.write(f"FIELD {field}\n")
        sys.stdout.flush()

    try:
        result = match_modules(job["targeting"], job["names"], job["linears"], progress)
    except TargetError as exc:
        result = {"error": [exc.field, str(exc)]}
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _child_main()
