"""Issue 18's deployment files, checked without a cluster or a container engine: the Kubernetes manifests
against the Kubernetes API's JSON schemas (kubernetes-validate ships them; offline), how the objects refer to
each other, the routes ConfigMap as the gateway reads it, and the compose scale-out file against the
compose-spec schema with its HAProxy config checked by a real ``haproxy -c``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.settings import Settings, load_routes
from tests.support.deploy import load_scale_compose

REPO = Path(__file__).resolve().parent.parent
KUBE = REPO / "deploy" / "kubernetes"
DOCKER = REPO / "docker"
KUBERNETES_VERSION = "1.30.0"


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def gateway_container() -> dict[str, Any]:
    container: dict[str, Any] = one("Deployment", "stopgate")["spec"]["template"]["spec"]["containers"][0]
    return container


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_every_manifest_is_valid_against_the_kubernetes_api_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # strict: unknown fields are errors too


def test_the_schema_check_catches_a_misspelt_field() -> None:
    bad = json.loads(json.dumps(one("Deployment", "stopgate")))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = bad["spec"]["template"]["spec"]["containers"][
        0
    ].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_gateway_runs_several_replicas_on_the_shared_redis_with_health_and_readiness_probes() -> None:
    deployment = one("Deployment", "stopgate")
    assert deployment["spec"]["replicas"] >= 2
    container = gateway_container()
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    variables = env(container)
    redis_service = one("Service", "stopgate-redis")
    port = redis_service["spec"]["ports"][0]["port"]
    assert variables["STOPGATE_STATE_URL"] == f"redis://stopgate-redis:{port}/0"
    settings = Settings(**{k.removeprefix("STOPGATE_").lower(): v for k, v in variables.items() if isinstance(v, str)})
    assert settings.state_url is not None and settings.state_lease_ms == 3000
    # Kubernetes waits this long after SIGTERM; the gateway drains its requests within the drain timeout.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.drain_timeout_s


def test_services_and_the_disruption_budget_select_the_pods_they_mean() -> None:
    pods = one("Deployment", "stopgate")["spec"]["template"]["metadata"]["labels"]
    redis_pods = one("StatefulSet", "stopgate-redis")["spec"]["template"]["metadata"]["labels"]
    assert one("Service", "stopgate")["spec"]["selector"].items() <= pods.items()
    assert one("Service", "stopgate-redis")["spec"]["selector"].items() <= redis_pods.items()
    pdb = one("PodDisruptionBudget", "stopgate")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pods.items()
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= redis_pods.items()
    assert 1 <= pdb["spec"]["minAvailable"] < one("Deployment", "stopgate")["spec"]["replicas"]


def test_the_routes_configmap_and_the_key_secret_are_mounted_where_the_settings_point() -> None:
    container = gateway_container()
    variables = env(container)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in one("Deployment", "stopgate")["spec"]["template"]["spec"]["volumes"]}
    assert mounts["routes"]["mountPath"] == variables["STOPGATE_ROUTES_FILE"]
    assert volumes["routes"]["configMap"]["name"] == one("ConfigMap", "stopgate-routes")["metadata"]["name"]
    secret = one("Secret", "stopgate-keys")
    keys_dir = mounts["keys"]["mountPath"]
    items = {i["path"]: i["key"] for i in volumes["keys"]["secret"]["items"]}
    assert variables["STOPGATE_API_KEYS_FILE"].startswith(keys_dir + "/")
    assert items[variables["STOPGATE_API_KEYS_FILE"].removeprefix(keys_dir + "/")] in secret["stringData"]
    assert variables["STOPGATE_ADMIN_KEY"]["secretKeyRef"]["key"] in secret["stringData"]


def test_the_routes_configmap_is_a_routes_file_the_gateway_loads(tmp_path: Path) -> None:
    text = one("ConfigMap", "stopgate-routes")["data"]["routes.yaml"]
    # The image keeps references/ under /app (docker/Dockerfile); here they are in the checkout.
    path = tmp_path / "routes.yaml"
    path.write_text(text.replace("/app/references/", f"{REPO}/references/"))
    routes = load_routes(path)
    assert [r.name for r in routes.routes] == ["arith"]
    assert all(Path(ref).is_file() for route in routes.routes for ref in route.evaluation.references)


def test_compose_scale_file_is_valid_against_the_compose_spec_schema() -> None:
    schema = json.loads((DOCKER / "compose-spec.schema.json").read_text())
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(load_scale_compose())
    ]
    assert not errors, "\n".join(errors)


def test_compose_scale_runs_two_replicas_on_one_redis_behind_haproxy() -> None:
    services = load_scale_compose()["services"]
    replicas = [name for name, s in services.items() if s.get("environment", {}).get("STOPGATE_STATE_URL")]
    assert len(replicas) == 2
    for name in replicas:
        assert services[name]["environment"]["STOPGATE_STATE_URL"] == "redis://redis:6379/0"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--appendonly" in services["redis"]["command"]  # a Redis restart keeps the fleet's state
    config = (DOCKER / "haproxy.cfg").read_text()
    assert {f"server {name} {name}:8000" for name in replicas} <= {line.strip() for line in config.splitlines()}
    assert "option httpchk GET /ready" in config


def test_haproxy_accepts_the_scale_config() -> None:
    binary = shutil.which("haproxy")
    assert binary is not None, "haproxy is not installed (make test installs Debian's package)"
    result = subprocess.run([binary, "-c", "-f", str(DOCKER / "haproxy.cfg")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# What a scale-out replica adds to compose.yaml's gateway, and what it leaves out. YAML anchors do not cross
# files, so compose.scale.yaml repeats the gateway's settings; everything else must stay as the CPU profile has it.
REPLICA_ONLY_ENV = {"STOPGATE_STATE_URL", "STOPGATE_STATE_LEASE_MS"}
STATE_VOLUME = "gateway-state:/var/lib/stopgate"  # the SQLite state, which Redis replaces


def replica_drift(gateway: dict[str, Any], replica: dict[str, Any]) -> list[str]:
    """How a replica's service differs from the single gateway's beyond the documented differences."""
    drift = []
    env = {k: v for k, v in replica.get("environment", {}).items() if k not in REPLICA_ONLY_ENV}
    if env != gateway["environment"]:
        drift.append(f"environment: {env} != {gateway['environment']}")
    if set(replica.get("environment", {})) < REPLICA_ONLY_ENV:
        drift.append("environment: no shared store")
    volumes = [v for v in gateway["volumes"] if v != STATE_VOLUME]
    if replica.get("volumes") != volumes:
        drift.append(f"volumes: {replica.get('volumes')} != {volumes}")
    depends = {k: v for k, v in replica.get("depends_on", {}).items() if k != "redis"}
    if depends != gateway["depends_on"]:
        drift.append(f"depends_on: {depends} != {gateway['depends_on']}")
    for key in sorted((set(gateway) | set(replica)) - {"environment", "volumes", "depends_on", "ports", "profiles"}):
        if gateway.get(key) != replica.get(key):
            drift.append(f"{key}: {replica.get(key)!r} != {gateway.get(key)!r}")
    return drift


def test_compose_scale_replicas_run_the_cpu_profiles_gateway_plus_only_the_shared_store() -> None:
    gateway = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["gateway"]
    assert STATE_VOLUME in gateway["volumes"]
    services = load_scale_compose()["services"]
    replicas = [n for n, s in services.items() if (s.get("build") or {}).get("dockerfile") == "docker/Dockerfile"]
    assert replicas == ["gateway-1", "gateway-2"]
    for name in replicas:
        assert replica_drift(gateway, services[name]) == [], name
        assert services[name]["profiles"] == ["scale"] and "ports" not in services[name]  # reached through HAProxy
    # The check can fail: a routes file mounted where the image does not read it is drift.
    moved = json.loads(json.dumps(services["gateway-1"]))
    moved["volumes"] = [v.replace("/app/gateway/routes.yaml", "/srv/routes.yaml") for v in moved["volumes"]]
    assert replica_drift(gateway, moved) != []
