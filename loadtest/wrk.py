"""Drive a server with wrk (Debian's ``wrk``) and read what it measured.

wrk is a C load generator on one event-loop thread: at 32 connections it costs far less CPU per
request than any Python client, so it is not what limits the servers measured. Its Lua ``done``
hook prints one JSON line with the counts and the latency distribution in microseconds;
``parse`` reads that line (wrk's own text report rounds and mixes units). The CPU a run cost wrk
itself comes from ``wait4``'s rusage, so every result says whether the client could have been
the bottleneck.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

MARK = "WRK_JSON "
LUA = """\
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"duration_us": %%d, "requests": %%d, "bytes": %%d, "connect": %%d, "read": %%d, "write": %%d, ' ..
    '"status": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d, "mean_us": %%.1f}\\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: ``requests`` counts every response, ``non_2xx`` those with a status >= 300."""

    seconds: float
    requests: int
    bytes: int
    non_2xx: int
    socket_errors: int  # connect + read + write + timeout
    timeouts: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    wrk_cpu_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def lua_script(body: bytes, headers: dict[str, str]) -> str:
    """A wrk script that POSTs ``body`` with ``headers`` and prints the ``MARK`` line when done."""
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the body may not contain ]==]")
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    return LUA % {"body": text, "headers": lines, "mark": MARK}


def parse(stdout: str, wrk_cpu_s: float = 0.0) -> WrkResult:
    """The ``MARK`` line of wrk's output as a WrkResult; ValueError if wrk printed none."""
    for line in stdout.splitlines():
        if line.startswith(MARK):
            d = json.loads(line[len(MARK) :])
            break
    else:
        raise ValueError(f"no {MARK.strip()} line in wrk's output: {stdout[-500:]!r}")
    socket = d["connect"] + d["read"] + d["write"] + d["timeout"]
    return WrkResult(
        seconds=d["duration_us"] / 1e6,
        requests=d["requests"],
        bytes=d["bytes"],
        non_2xx=d["status"],
        socket_errors=socket,
        timeouts=d["timeout"],
        p50_ms=d["p50_us"] / 1e3,
        p90_ms=d["p90_us"] / 1e3,
        p99_ms=d["p99_us"] / 1e3,
        max_ms=d["max_us"] / 1e3,
        mean_ms=d["mean_us"] / 1e3,
        wrk_cpu_s=wrk_cpu_s,
    )


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def run(
    url: str,
    body: bytes,
    *,
    connections: int,
    seconds: float,
    timeout_s: float = 10.0,
    headers: dict[str, str] | None = None,
) -> WrkResult:
    """One wrk run on one thread; its own CPU time (user + system) is in ``wrk_cpu_s``."""
    binary = wrk_binary()
    if binary is None:
        raise FileNotFoundError("wrk is not installed (apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="stopgate-wrk-", delete=False) as f:
        f.write(lua_script(body, {"Content-Type": "application/json", **(headers or {})}))
        script = f.name
    try:
        cmd = [binary, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout_s:g}s"]
        proc = subprocess.Popen([*cmd, "-s", script, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        out = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of wrk alone
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        os.unlink(script)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {out[-500:]!r}")
    return parse(out, usage.ru_utime + usage.ru_stime)
