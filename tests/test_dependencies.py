"""Issue 22: the dependency set is a decision, not whatever a fresh machine happens to get.

- the lock (requirements/lock.txt) pins every requirement of pyproject.toml within its range,
  so a dependency added to pyproject.toml without `make lock` fails here, not on a new clone;
- the ranges admit no grpcio or protobuf older than the generated code in
  clients/python/loramux/v1 refuses to run on;
- every field of the installed PEFT's LoraConfig is applied, kept as metadata or refused by
  the adapter-config allow-list: a field a new PEFT brings fails here until it is decided.

All of it reads files and the installed packages: fast, and `make test-latest` runs it too.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from loramux.core import protogen
from loramux.server.adapters import unclassified_config_fields

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
GENERATED = REPO / "clients" / "python" / "loramux" / "v1"


def locked_versions(lock: Path = LOCK) -> dict[str, list[tuple[Version, str]]]:
    """name -> [(version, marker text)] for every pin of the lock (a name may be pinned
    twice, once per Python range)."""
    pins: dict[str, list[tuple[Version, str]]] = {}
    for line in lock.read_text().splitlines():
        found = re.match(r"^([A-Za-z0-9._-]+)==(\S+)(?:\s*;\s*([^\\]+))?", line)
        if found:
            name, version, marker = found.groups()
            pins.setdefault(canonicalize_name(name), []).append(
                (Version(version), (marker or "").strip())
            )
    return pins


def project_requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for the server's and the client's dependencies and extras."""
    found: list[tuple[str, Requirement]] = []
    for pyproject in (REPO / "pyproject.toml", REPO / "clients" / "python" / "pyproject.toml"):
        project = tomllib.loads(pyproject.read_text())["project"]
        where = str(pyproject.relative_to(REPO))
        found += [(where, Requirement(text)) for text in project.get("dependencies", [])]
        for extra, texts in project.get("optional-dependencies", {}).items():
            found += [(f"{where}[{extra}]", Requirement(text)) for text in texts]
    return found


# torch is installed from TORCH_SPEC (CPU or CUDA build), the two packages are the project's own
OUTSIDE_THE_LOCK = {"torch", "loramux", "loramux-client"}


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_the_lock_pins_every_requirement_within_its_range(python: str) -> None:
    pins = locked_versions()
    environment = {**default_environment(), "python_version": python}
    environment["python_full_version"] = f"{python}.0"
    missing, outside = [], []
    for where, requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        if name in OUTSIDE_THE_LOCK:
            continue
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        versions = [
            version
            for version, marker in pins.get(name, [])
            if not marker or Requirement(f"x; {marker}").marker.evaluate(environment)  # type: ignore[union-attr]
        ]
        if not versions:
            missing.append(f"{where}: {requirement}")
        elif not all(requirement.specifier.contains(v, prereleases=True) for v in versions):
            outside.append(f"{where}: {requirement} but the lock has {versions}")
    assert missing == [], "not in requirements/lock.txt: run `make lock`"
    assert outside == [], "the lock is outside the range: run `make lock`"


def test_a_requirement_missing_from_the_lock_is_found(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(re.sub(r"(?m)^peft==.*$", "", LOCK.read_text()))
    assert "peft" in locked_versions(LOCK)
    assert "peft" not in locked_versions(lock)


def _lower_bound(requirement: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    return max(bounds) if bounds else None


def test_ranges_admit_no_grpcio_or_protobuf_the_generated_code_refuses() -> None:
    grpc_code = (GENERATED / "loramux_pb2_grpc.py").read_text()
    grpc_needs = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_code).group(1))  # type: ignore[union-attr]
    pb2 = (GENERATED / "loramux_pb2.py").read_text()
    gencode = re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),"
        r"\s*(\d+),",
        pb2,
    )
    assert gencode is not None
    protobuf_needs = Version(".".join(gencode.groups()))
    needs = {"grpcio": grpc_needs, "protobuf": protobuf_needs}
    too_low = [
        f"{where}: {requirement} (the generated code needs >= {needs[requirement.name]})"
        for where, requirement in project_requirements()
        if requirement.name in needs
        and (_lower_bound(requirement) or Version("0")) < needs[requirement.name]
    ]
    assert too_low == []


def test_the_generated_code_comes_from_the_locked_grpcio_tools() -> None:
    grpc_code = (GENERATED / "loramux_pb2_grpc.py").read_text()
    assert f"GRPC_GENERATED_VERSION = '{protogen.locked_tools_version()}'" in grpc_code


def test_every_lora_config_field_of_the_installed_peft_is_decided() -> None:
    """A field PEFT's LoraConfig has and the allow-list does not know would pass through
    unchecked (or be refused as unknown without a reason): each must be applied, kept as
    metadata, or refused with what it is (server/loramux/server/adapters.py)."""
    from peft import LoraConfig

    assert unclassified_config_fields(LoraConfig) == []


def test_a_lora_config_field_the_allow_list_does_not_know_is_reported() -> None:
    from peft import LoraConfig

    @dataclasses.dataclass
    class NextLoraConfig(LoraConfig):
        brand_new_option: bool = False

    assert unclassified_config_fields(NextLoraConfig) == ["brand_new_option"]
