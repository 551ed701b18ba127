"""Issue 14, point 7: the files in deploy/ are what the tests and the docs say they are.

No Docker engine or Kubernetes cluster runs on the development machines, so the compose
file and the manifests are checked as data: YAML that parses, references that meet (labels
and selectors, named ports and probes, volumes and the adapter dir), and every LORAMUX_*
variable they set accepted by `loramux.core.config.load_settings`, which validates it as
the server would at start. The nginx configuration is the template tests/test_fleet.py
runs; here it is rendered with the compose file's values and checked by `nginx -t`. The
Deployment's own arguments and probes are run against a real `loramux serve`.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_helpers import ServerProcess, free_port, health_status
from fleet_helpers import NGINX_TEMPLATE, REPO, Nginx, find_nginx
from grpc_health.v1 import health_pb2

from loramux.core.config import Settings, env_name, load_settings
from loramux.core.models import ResolvedModel

DEPLOY = REPO / "deploy"
SAMPLE_SECRETS = {
    "POSTGRES_PASSWORD": "sample-password",
    "LORAMUX_ADMIN_KEYS": "sample-admin-key",
}


def server_settings(env: dict[str, str]) -> Settings:
    """Settings from a deployment's environment; every LORAMUX_* variable must be one."""
    known = {env_name(f.name) for f in dataclasses.fields(Settings)}
    unknown = {k for k in env if k.startswith("LORAMUX_")} - known
    assert not unknown, f"not LoRAMux settings: {unknown}"
    return load_settings(environ=env)  # validated as `loramux serve` would


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def interpolate(value: str) -> str:
    """Compose's ${VAR:?message} with the sample secrets."""
    return re.sub(r"\$\{(\w+)(:\?[^}]*)?\}", lambda m: SAMPLE_SECRETS[m.group(1)], value)


def manifests(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def template_variables() -> set[str]:
    return set(re.findall(r"\$\{(LORAMUX_\w+)\}", NGINX_TEMPLATE.read_text()))


def test_compose_two_replicas_share_postgres_and_a_volume_behind_nginx() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {"postgres", "replica-a", "replica-b", "nginx"}
    replicas = [services["replica-a"], services["replica-b"]]
    for replica in replicas:
        env = {k: interpolate(str(v)) for k, v in replica["environment"].items()}
        settings = server_settings(env)
        assert settings.registry.startswith("postgresql://")
        assert "@postgres:5432/" in settings.registry  # the compose service
        assert settings.adapter_dir is not None
        mounts = {m.split(":")[1]: m.split(":")[0] for m in replica["volumes"]}
        assert mounts[str(settings.adapter_dir)] in spec["volumes"]  # a named, shared volume
        assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert replicas[0]["environment"] == replicas[1]["environment"]
    assert replicas[0]["volumes"] == replicas[1]["volumes"]

    postgres = services["postgres"]["environment"]
    url = interpolate(replicas[0]["environment"]["LORAMUX_REGISTRY"])
    assert url.endswith(f"/{postgres['POSTGRES_DB']}")
    assert f"//{postgres['POSTGRES_USER']}:" in url

    nginx = services["nginx"]
    mounted = {m.split(":")[0]: m.split(":")[1] for m in nginx["volumes"]}
    source, target = next(iter(mounted.items()))
    assert (DEPLOY / source).resolve() == NGINX_TEMPLATE
    assert target.startswith("/etc/nginx/templates/") and target.endswith(".template")
    variables = {k for k in nginx["environment"] if k.startswith("LORAMUX_")}
    assert variables == template_variables()
    upstreams = re.findall(
        r"server ([\w.-]+):(\d+);", nginx["environment"]["LORAMUX_UPSTREAM_SERVERS"]
    )
    assert sorted(host for host, _ in upstreams) == ["replica-a", "replica-b"]
    assert {int(port) for _, port in upstreams} == {Settings().port}
    listen = nginx["environment"]["LORAMUX_NGINX_LISTEN"]
    assert nginx["ports"] == [f"{listen}:{listen}"]


@pytest.mark.skipif(find_nginx() is None, reason="nginx is not installed (make test does)")
def test_compose_nginx_config_passes_nginx_t() -> None:
    """The template rendered with the compose file's values (replica hosts as 127.0.0.1,
    since `nginx -t` resolves them) is a configuration nginx accepts."""
    env = compose()["services"]["nginx"]["environment"]
    upstreams = re.findall(r"server ([\w.-]+:\d+);", env["LORAMUX_UPSTREAM_SERVERS"])
    local = [re.sub(r"^replica-[ab]", "127.0.0.1", u) for u in upstreams]
    proxy = Nginx(local)
    try:
        report = proxy.check()
        assert "syntax is ok" in report and "test is successful" in report
    finally:
        proxy.stop()


def test_kubernetes_manifests_fit_together() -> None:
    docs = manifests("loramux.yaml")
    deployment, service = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    claim = by_kind(docs, "PersistentVolumeClaim")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)

    env = {e["name"]: e.get("value", "postgresql://u:p@db/loramux") for e in container["env"]}
    env["LORAMUX_ADMIN_KEYS"] = "sample-admin-key"
    settings = server_settings(env)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = mounts[str(settings.adapter_dir)]
    (source,) = [v for v in pod["spec"]["volumes"] if v["name"] == volume]
    assert source["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pod["spec"]["securityContext"]["fsGroup"] == 10001  # the image's user

    args = container["args"]
    assert int(args[args.index("--http-port") + 1]) == ports["http"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["grpc"]["port"] == ports["grpc"] == Settings().port
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > Settings().drain_seconds  # the drain finishes before SIGKILL

    pool_docs = manifests("inference-pool.yaml")
    pool, route = by_kind(pool_docs, "InferencePool"), by_kind(pool_docs, "HTTPRoute")
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [ports["http"]]
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])
    config = yaml.safe_load(by_kind(pool_docs, "ConfigMap")["data"]["config.yaml"])
    assert "lora-affinity-scorer" in {p["type"] for p in config["plugins"]}
    assert labels["llm-d.ai/engine-type"] == "vllm"


def test_deployment_args_and_probes_on_a_real_server(home: Path, tiny_llama: ResolvedModel) -> None:
    """The Deployment's arguments start a server whose readiness and liveness probes pass."""
    container = by_kind(manifests("loramux.yaml"), "Deployment")["spec"]["template"]["spec"][
        "containers"
    ][0]
    args = list(container["args"])
    assert args[args.index("--metrics-host") + 1] == "0.0.0.0"  # the picker scrapes it
    for host in ("--host", "--metrics-host"):
        args[args.index(host) + 1] = "127.0.0.1"  # not 0.0.0.0 on a shared machine
    http_port = free_port()
    args[args.index("--http-port") + 1] = str(http_port)
    args += ["--base-model", str(tiny_llama.path), "--device", "cpu", "--lora-kernel", "eager"]
    server = ServerProcess(home, *args, "--admin-keys", "sample-admin-key")
    try:
        server.start()
        probe = container["readinessProbe"]["httpGet"]
        url = f"http://127.0.0.1:{http_port}{probe['path']}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200
        assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()
