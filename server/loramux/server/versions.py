"""Adapter references, versions and aliases: what `name@selector` means.

An adapter name holds immutable versions `v1`, `v2`, ... (each one set of files, by
digest). An alias names either one version or a weighted split of versions
(`prod = v3: 90, v4: 10`); it never names another alias, so chains and cycles cannot
exist. A reference is `[owner/]name[@selector]`, the selector a version (`v3`), an alias,
or nothing (the name's `default` alias). `latest` is the highest version and cannot be set.

A split is resolved once per request, at admission: with a caller-supplied key, by a hash
of (adapter, alias, key), so every request of one key lands on one version while the
split stays as it is; without one, at random. Weights are integers summing to 100.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from loramux.core.errors import InvalidArgument

DEFAULT_ALIAS = "default"  # what a bare name resolves to; set to v1 when a name is created
LATEST = "latest"  # the highest version: computed, never stored
VERSION_PATTERN = re.compile(r"^v([1-9][0-9]{0,8})\Z")
ALIAS_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]{0,63}\Z")  # \Z: "$" accepts a final "\n"
MAX_REF_CHARS = 200  # owner (64) + "/" + name (64) + "@" + selector (64), with room
MAX_SPLIT = 8  # versions in one weighted alias
TOTAL_WEIGHT = 100
MAX_KEY_CHARS = 256  # a caller's sticky key
MAX_DESCRIPTION_CHARS = 4096
MAX_TAGS = 32
MAX_TAG_CHARS = 64
MAX_BASE_MODEL_CHARS = 256


@dataclass(frozen=True)
class Ref:
    """A parsed adapter reference: owner (None: the caller's), name, selector (None: default)."""

    owner: str | None
    name: str
    selector: str | None


def parse_ref(ref: str, pattern: re.Pattern[str]) -> Ref | None:
    """`[owner/]name[@selector]`, each part checked; None when it cannot name an adapter."""
    if not isinstance(ref, str) or len(ref) > MAX_REF_CHARS:
        return None
    base, at, selector = ref.partition("@")
    owner, slash, name = base.rpartition("/")
    if not pattern.match(name) or (slash and not pattern.match(owner)):
        return None
    if at and not (VERSION_PATTERN.match(selector) or ALIAS_PATTERN.match(selector)):
        return None
    return Ref(owner if slash else None, name, selector if at else None)


def version_number(selector: str) -> int | None:
    match = VERSION_PATTERN.match(selector)
    return int(match[1]) if match else None


def check_alias(alias: str, field: str = "alias") -> str:
    """An alias that can be set: a name that is not a version and not `latest`."""
    if not isinstance(alias, str) or not ALIAS_PATTERN.match(alias):
        raise InvalidArgument(
            field, "must be 1-64 of [A-Za-z0-9._-], starting with a letter or '_'"
        )
    if re.fullmatch(r"v[0-9]+", alias):  # v0 and v007 too: they read as versions
        raise InvalidArgument(field, f"{alias!r} is a version, not an alias name")
    if alias == LATEST:
        raise InvalidArgument(field, "'latest' is the highest version and cannot be set")
    return alias


@dataclass(frozen=True)
class Split:
    """An alias's targets: (version, weight) pairs, weights summing to 100, in order."""

    targets: tuple[tuple[int, int], ...]

    @staticmethod
    def parse(entries: Sequence[tuple[str, int]], field: str = "targets") -> Split:
        """Targets as a request gives them: version refs (`v3`) with integer weights."""
        if not entries:
            raise InvalidArgument(field, "give at least one version")
        if len(entries) > MAX_SPLIT:
            raise InvalidArgument(field, f"at most {MAX_SPLIT} versions in one alias")
        seen: set[int] = set()
        targets = []
        for i, (version_ref, weight) in enumerate(entries):
            number = version_number(version_ref)
            if number is None:
                raise InvalidArgument(
                    f"{field}[{i}].version",
                    f"{version_ref!r} is not a version like 'v3' (an alias points at "
                    "versions, never at another alias: no chains, no cycles)",
                )
            if number in seen:
                raise InvalidArgument(f"{field}[{i}].version", f"{version_ref} is listed twice")
            if not 0 < weight <= TOTAL_WEIGHT:
                raise InvalidArgument(f"{field}[{i}].weight", f"must be in 1..100, got {weight}")
            seen.add(number)
            targets.append((number, int(weight)))
        total = sum(w for _, w in targets)
        if total != TOTAL_WEIGHT:
            raise InvalidArgument(f"{field}", f"the weights sum to {total}, not 100")
        return Split(tuple(targets))

    @staticmethod
    def of(version: int) -> Split:
        return Split(((version, TOTAL_WEIGHT),))

    def dumps(self) -> str:
        return json.dumps([list(t) for t in self.targets])

    @staticmethod
    def loads(text: str) -> Split:
        return Split(tuple((int(v), int(w)) for v, w in json.loads(text)))

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(v for v, _ in self.targets)

    def describe(self) -> str:
        return ", ".join(f"v{v}: {w}" for v, w in self.targets)

    def pick(self, scope: str, key: str | None, rng: random.Random) -> int:
        """One version: by a hash of (scope, key) when a key is given, else at random."""
        if len(self.targets) == 1:
            return self.targets[0][0]
        if key:
            digest = hashlib.sha256(f"{scope}\0{key}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") % TOTAL_WEIGHT
        else:
            point = rng.randrange(TOTAL_WEIGHT)
        for version, weight in self.targets:
            if point < weight:
                return version
            point -= weight
        raise AssertionError("weights sum to 100")


@dataclass(frozen=True)
class VersionMetadata:
    """What a version's uploader says of it: kept with the version, shown by the API."""

    description: str = ""
    tags: tuple[str, ...] = ()
    base_model: str = ""  # the base model it was trained on (default: its adapter_config's)

    def checked(self, field: str = "metadata") -> VersionMetadata:
        if len(self.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgument(
                f"{field}.description", f"at most {MAX_DESCRIPTION_CHARS} characters"
            )
        if len(self.tags) > MAX_TAGS:
            raise InvalidArgument(f"{field}.tags", f"at most {MAX_TAGS} tags")
        for i, tag in enumerate(self.tags):
            if not 0 < len(tag) <= MAX_TAG_CHARS or not tag.isprintable():
                raise InvalidArgument(
                    f"{field}.tags[{i}]", f"1..{MAX_TAG_CHARS} printable characters"
                )
        if len(self.base_model) > MAX_BASE_MODEL_CHARS or not self.base_model.isprintable():
            raise InvalidArgument(
                f"{field}.base_model", f"at most {MAX_BASE_MODEL_CHARS} printable characters"
            )
        return self


EVALUATION_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,63}\Z")
MAX_EVALUATIONS = 64


def check_evaluations(
    entries: Sequence[tuple[str, float]], field: str = "evaluations"
) -> list[tuple[str, float]]:
    if not entries:
        raise InvalidArgument(field, "give at least one evaluation result")
    if len(entries) > MAX_EVALUATIONS:
        raise InvalidArgument(field, f"at most {MAX_EVALUATIONS} results in one call")
    seen: set[str] = set()
    for i, (name, value) in enumerate(entries):
        if not EVALUATION_NAME.match(name):
            raise InvalidArgument(f"{field}[{i}].name", "1-64 of [A-Za-z0-9._/-]")
        if name in seen:
            raise InvalidArgument(f"{field}[{i}].name", f"{name!r} is listed twice")
        if not math.isfinite(value):
            raise InvalidArgument(f"{field}[{i}].value", "must be a finite number")
        seen.add(name)
    return list(entries)


def check_key(key: str | None, field: str) -> str | None:
    if key is not None and len(key) > MAX_KEY_CHARS:
        raise InvalidArgument(field, f"at most {MAX_KEY_CHARS} characters")
    return key or None
