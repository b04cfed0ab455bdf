"""Drive docker/compose.yaml with a real container engine: Podman + podman-compose here, Docker elsewhere.

``Stack`` wraps the compose CLI and the engine CLI for the compose project; everything it waits for
has a generous deadline and, when that passes, an error that says what did not happen and shows the
service's last log lines. tests/deploy/run.sh (``make test-deploy``) sets the environment:

    STOPGATE_DEPLOY_DIR   scratch directory outside the clone (env files, stand-in images, storage)
    CONTAINER_ENGINE      podman (default) or docker
    COMPOSE               the compose command, e.g. ``.../podman-compose`` or ``docker compose``

Podman 4.3 (Debian 12) runs healthchecks from systemd timers, and this machine has no systemd; podman-compose
also skips ``depends_on: service_healthy`` before Podman 4.6. ``HealthScheduler`` stands in for the timer:
it runs each container's own healthcheck (``podman healthcheck run``) on an interval, so the status the
tests read is still the one the image's HEALTHCHECK command reports. Docker schedules its own.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
SCALE_FILE = REPO / "docker" / "compose.scale.yaml"  # issue 18's replicas, Redis and HAProxy (profile `scale`)
PROJECT = "stopgate"


class DeployError(AssertionError):
    """A deployment step failed or a condition was not reached in time."""


def run(args: list[str], *, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise DeployError(f"`{shlex.join(args)}` exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
    return done.stdout


class Stack:
    """The compose project of docker/compose.yaml with one env file and the CPU profile."""

    def __init__(self, env_file: Path, services: list[str], *, scale: bool = False) -> None:
        self.engine = os.environ.get("CONTAINER_ENGINE", "podman")
        self.compose = shlex.split(os.environ.get("COMPOSE", "podman-compose"))
        if shutil.which(self.engine) is None or shutil.which(self.compose[0]) is None:
            raise DeployError(f"{self.engine} / {self.compose[0]} not found: run `make test-deploy`")
        self.env_file = env_file
        self.services = services
        # With ``scale``, compose.scale.yaml on top and its profile too: the same project, one more file.
        self.files = [COMPOSE_FILE, SCALE_FILE] if scale else [COMPOSE_FILE]
        self.profiles = ["cpu", "scale"] if scale else ["cpu"]
        self.health: HealthScheduler | None = None

    # -- the compose CLI --------------------------------------------------------------------------------

    def compose_cmd(self, *args: str, timeout: float = 900) -> str:
        base = [*self.compose, "--env-file", str(self.env_file)]
        base += [arg for f in self.files for arg in ("-f", str(f))]
        base += [arg for p in self.profiles for arg in ("--profile", p)]
        return run([*base, *args], timeout=timeout, env=compose_environment())

    def build(self, service: str) -> None:
        self.compose_cmd("build", service, timeout=1800)

    def up(self, *services: str, no_deps: bool = False) -> None:
        self.compose_cmd("up", "-d", *(["--no-deps"] if no_deps else []), *(services or self.services))

    def down(self, *services: str, volumes: bool = False) -> None:
        self.compose_cmd("down", "-t", "5", *(["-v"] if volumes else []), *services)

    # -- the engine CLI ---------------------------------------------------------------------------------

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return run([self.engine, *args], timeout=timeout, check=check)

    def containers(self, service: str | None = None, *, all_states: bool = True) -> list[str]:
        args = ["ps", "-q", "--no-trunc", "--filter", f"label=com.docker.compose.project={PROJECT}"]
        if all_states:
            args.append("-a")
        if service is not None:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        return self.podman(*args).split()

    def container(self, service: str) -> str:
        found = self.containers(service)
        if len(found) != 1:
            raise DeployError(f"expected one {service} container, found {found}")
        return found[0]

    def inspect(self, service: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.podman("inspect", self.container(service)))
        return data[0]

    def image_inspect(self, image: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.podman("image", "inspect", image))
        return data[0]

    def exec_ok(self, service: str, *command: str) -> bool:
        """Whether ``command`` exits 0 inside the service's container."""
        done = subprocess.run([self.engine, "exec", self.container(service), *command], capture_output=True, timeout=60)
        return done.returncode == 0

    def exec_output(self, service: str, *command: str) -> str:
        return self.podman("exec", self.container(service), *command)

    def logs(self, service: str, lines: int = 40) -> str:
        try:
            container = self.container(service)
        except DeployError as exc:
            return str(exc)
        done = subprocess.run([self.engine, "logs", "--tail", str(lines), container], capture_output=True, text=True)
        return (done.stdout + done.stderr)[-6000:]

    def health_status(self, service: str) -> str:
        state = self.inspect(service)["State"]
        health = state.get("Health") or state.get("Healthcheck") or {}
        return str(health.get("Status", "none"))

    def wait(self, what: str, predicate: Callable[[], bool], timeout_s: float, service: str | None = None) -> None:
        """Poll ``predicate`` until true; on timeout a DeployError naming ``what`` with the service's logs."""
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while True:
            try:
                if predicate():
                    return
            except AssertionError:
                raise  # a check inside the predicate failed: that is the answer, not a retry
            except Exception as exc:  # noqa: BLE001 - a connection refused while starting; shown on timeout
                last = exc
            if time.monotonic() > deadline:
                detail = f" (last error: {last!r})" if last else ""
                logs = f"\n--- {service} logs ---\n{self.logs(service)}" if service else ""
                raise DeployError(f"timed out after {timeout_s:.0f} s waiting for {what}{detail}{logs}")
            time.sleep(1.0)

    def wait_healthy(self, service: str, timeout_s: float) -> None:
        # "unhealthy" is not final (a slow engine start can outlast its start_period): wait for healthy.
        seen: list[str] = []

        def healthy() -> bool:
            seen.append(self.health_status(service))
            return seen[-1] == "healthy"

        try:
            self.wait(f"{service}'s healthcheck to report healthy", healthy, timeout_s, service)
        except DeployError as exc:
            raise DeployError(f"{exc}\nhealth states seen: {sorted(set(seen))}") from None


def compose_environment() -> dict[str, str]:
    """This process's environment without the variables compose.yaml reads.

    Compose lets the shell's environment override the env file, and tests/conftest.py sets
    STOPGATE_AUTH=off and STOPGATE_EVAL_SHARE=0 for the in-process tests: passed on, they would
    silently turn the stack's authentication off (found by the first run of these tests).
    """
    names = {n for f in (COMPOSE_FILE, SCALE_FILE) for n in re.findall(r"\$\{(\w+)", f.read_text())} | {
        "COMPOSE_PROFILES",
        "COMPOSE_PROJECT_NAME",
    }
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith("STOPGATE_")}


class HealthScheduler:
    """Runs each running container's own healthcheck every ``interval_s`` (Podman without systemd)."""

    def __init__(self, stack: Stack, interval_s: float = 3.0) -> None:
        self.stack = stack
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="healthchecks", daemon=True)

    def __enter__(self) -> HealthScheduler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                containers = self.stack.containers(all_states=False)
            except (DeployError, subprocess.TimeoutExpired):
                continue
            for container in containers:
                # Exit status 1 is "unhealthy"; podman records the result either way. A container
                # without a healthcheck or one that just stopped is an error here, which is fine.
                subprocess.run(
                    [self.stack.engine, "healthcheck", "run", container], capture_output=True, timeout=60, check=False
                )


def needs_health_scheduler(engine: str) -> bool:
    """Podman runs healthchecks from systemd timers; with no systemd nothing runs them."""
    if engine != "podman":
        return False
    try:
        return Path("/proc/1/comm").read_text().strip() != "systemd"
    except OSError:
        return True
