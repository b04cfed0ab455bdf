"""Engine client transports (issue 17): client CPU per streamed request, httpx against aiohttp under it or alone.

Against the peer upstream (``loadtest/peer_upstream.py``; ``--tokens`` chunks plus vLLM's usage
chunk per answer, asked for as the gateway asks), each variant streams the same request body in
a closed loop at ``--concurrency``, reads the SSE events and decodes every chunk. A variant is
``client:reader:decoder``:

- client ``httpx`` (``httpx.AsyncClient``, its own transport: httpcore, h11, anyio), ``httpx-aiohttp``
  (the same API over ``httpx_aiohttp.AiohttpTransport``, as the OpenAI SDK offers) or ``aiohttp``
  (``aiohttp.ClientSession`` directly);
- reader ``gateway`` (the gateway's engine client: ``gateway.openai.sse.SSEDecoder`` over
  ``aiter_bytes()``; httpx only; before the lean hot path it read text lines), ``lines`` (the
  library's line iterator: ``aiter_lines()``, or iterating aiohttp's ``StreamReader``), or ``bytes``
  (events split on blank lines from the raw byte pieces: ``aiter_raw()`` / ``iter_any()``);
- decoder ``json`` (``json.loads``) or ``msgspec`` (``msgspec.json.decode``).

Each run is a process of its own (``--worker VARIANT``), so no variant inherits another's
connections, caches or garbage; it reports its own CPU (``time.process_time``) over the measured
window after a warm-up. Variants run one after the other in an order rotated every round, and
the report gives medians over rounds, with the upstream's CPU per request beside them.

    python -m loadtest.transport [--rounds 3 --seconds 4 --concurrency 8 --out results/transport.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from loadtest import proc_cpu

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ("httpx", "httpx-aiohttp", "aiohttp")
READERS = ("gateway", "lines", "bytes")
DECODERS = ("json", "msgspec")
TODAY = "httpx:gateway:json"
Decode = Callable[[bytes | str], Any]


def variants() -> list[str]:
    """Every valid ``client:reader:decoder``; ``gateway`` reads as the gateway's client does, so httpx and json only."""
    out = [TODAY]
    out += [f"{c}:{r}:{d}" for c in CLIENTS for r in READERS[1:] for d in DECODERS]
    return out


def upstream_body(tokens: int) -> bytes:
    """What gateway/stopping/session.py sends the engine for a completion: streamed, usage in every chunk."""
    body = {
        "model": "tinyreason",
        "prompt": "What is 1+2?",
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    return json.dumps(body).encode()


def split_events(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete ``data:`` payloads in ``buffer`` (events end with a blank line), and the unfinished rest."""
    *events, rest = buffer.split(b"\n\n")
    return [e[5:].strip() for e in events if e.startswith(b"data:")], rest


def _decoder(name: str) -> Decode:
    if name == "msgspec":
        import msgspec

        decode: Decode = msgspec.json.decode
        return decode
    return json.loads


async def _payloads(client: Any, kind: str, reader: str, url: str, body: bytes) -> AsyncIterator[bytes | str]:
    """The ``data`` payloads of one streamed response, as the variant reads them."""
    headers = {"content-type": "application/json"}
    if kind == "aiohttp":
        async with client.post(url, data=body, headers=headers) as response:
            response.raise_for_status()
            if reader == "lines":
                async for line in response.content:
                    if line.startswith(b"data:"):
                        yield line[5:].strip()
            else:
                buffer = b""
                async for piece in response.content.iter_any():
                    events, buffer = split_events(buffer + piece)
                    for event in events:
                        yield event
        return
    async with client.stream("POST", url, content=body, headers=headers) as response:
        response.raise_for_status()
        if reader == "gateway":
            from gateway.openai.sse import SSEDecoder

            decoder = SSEDecoder()
            async for piece in response.aiter_bytes():
                for data in decoder.feed(piece):
                    yield data
            for data in decoder.flush():
                yield data
        elif reader == "lines":
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    yield line[5:].strip()
        else:
            buffer = b""
            async for piece in response.aiter_raw():
                events, buffer = split_events(buffer + piece)
                for event in events:
                    yield event


async def one_request(client: Any, kind: str, reader: str, decode: Decode, url: str, body: bytes) -> int:
    """Chunks decoded in one streamed request; ValueError unless it ended with ``[DONE]``."""
    chunks, done = 0, False
    async for data in _payloads(client, kind, reader, url, body):
        if data in ("[DONE]", b"[DONE]"):
            done = True
            continue
        chunk = decode(data)
        chunks += isinstance(chunk, dict)
    if not done:
        raise ValueError("the stream ended without [DONE]")
    return chunks


def _client(kind: str, concurrency: int) -> Any:
    """The client for ``kind``, with a pool of ``concurrency`` keep-alive connections and the gateway's timeouts."""
    if kind == "aiohttp":
        import aiohttp

        session_timeout = aiohttp.ClientTimeout(sock_connect=5.0, sock_read=120.0)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=session_timeout)
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=4.0)
    timeout = httpx.Timeout(connect=5.0, read=120.0, write=10.0, pool=120.0)
    transport: httpx.AsyncBaseTransport | None = None
    if kind == "httpx-aiohttp":
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport(limits=limits)
    return httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport)


async def worker(
    variant: str, url: str, tokens: int, concurrency: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` tasks stream requests until the time is up; CPU of this process over it."""
    kind, reader, decoder = variant.split(":")
    decode, body = _decoder(decoder), upstream_body(tokens)
    counts = {"requests": 0, "chunks": 0, "errors": 0, "bad_chunk_counts": 0}
    async with _client(kind, concurrency) as client:

        async def loop(until: float, count: bool) -> None:
            while time.perf_counter() < until:
                try:
                    n = await one_request(client, kind, reader, decode, url, body)
                except Exception:  # a benchmark counts failures; it does not stop at the first
                    counts["errors"] += count
                    await asyncio.sleep(0.01)  # a refused connection must not spin this loop
                    continue
                if count:
                    counts["requests"] += 1
                    counts["chunks"] += n
                    counts["bad_chunk_counts"] += n != tokens + 1

        await asyncio.gather(*(loop(time.perf_counter() + warmup, False) for _ in range(concurrency)))
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(loop(t0 + seconds, True) for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {"variant": variant, **counts, "cpu_s": cpu, "wall_s": wall}


def run_worker(variant: str, a: argparse.Namespace, url: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "loadtest.transport", "--worker", variant, "--url", url]
    cmd += ["--tokens", str(a.tokens), "--concurrency", str(a.concurrency), "--seconds", str(a.seconds)]
    cmd += ["--warmup", str(a.warmup), "--loop", a.loop]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=a.seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"transport worker {variant} failed (exit {done.returncode}): {done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per variant: medians over rounds of client CPU per request and per chunk, req/s, the upstream's CPU."""
    out: dict[str, dict[str, float]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant and r["requests"]]
        if not mine:
            out[variant] = {"errors": sum(r["errors"] for r in runs if r["variant"] == variant)}
            continue
        out[variant] = {
            "rounds": len(mine),
            "client_cpu_us_per_request": statistics.median(r["cpu_s"] * 1e6 / r["requests"] for r in mine),
            "client_cpu_us_per_chunk": statistics.median(r["cpu_s"] * 1e6 / r["chunks"] for r in mine),
            "rps": statistics.median(r["requests"] / r["wall_s"] for r in mine),
            "client_cores_busy": statistics.median(r["cpu_s"] / r["wall_s"] for r in mine),
            "upstream_cpu_us_per_request": statistics.median(r["upstream_cpu_s"] * 1e6 / r["requests"] for r in mine),
            "errors": sum(r["errors"] + r["bad_chunk_counts"] for r in runs if r["variant"] == variant),
        }
    base = out.get(TODAY, {}).get("client_cpu_us_per_request")
    for row in out.values():
        if base and "client_cpu_us_per_request" in row:
            row["cpu_vs_today"] = row["client_cpu_us_per_request"] / base
    return out


def markdown(summary: dict[str, dict[str, float]], tokens: int) -> str:
    lines = [
        f"| client : reader : decoder | client CPU us/request ({tokens + 1} chunks) | us/chunk | vs today | req/s "
        "| upstream CPU us/request | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, r in sorted(summary.items(), key=lambda kv: kv[1].get("client_cpu_us_per_request", 1e18)):
        if "client_cpu_us_per_request" not in r:
            lines.append(f"| {variant} | - | - | - | - | - | {r['errors']:.0f} |")
            continue
        lines.append(
            f"| {variant}{' (today)' if variant == TODAY else ''} | {r['client_cpu_us_per_request']:,.0f} "
            f"| {r['client_cpu_us_per_chunk']:.1f} | {r.get('cpu_vs_today', float('nan')):.2f}x | {r['rps']:,.0f} "
            f"| {r['upstream_cpu_us_per_request']:,.0f} | {r['errors']:.0f} |"
        )
    return "\n".join(lines)


def bench(a: argparse.Namespace) -> dict[str, Any]:
    from gateway.engine.embedded import free_port
    from loadtest.overhead import child
    from loadtest.peer import wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "loadtest.peer_upstream", "--port", str(port), "--tokens", str(a.tokens)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs: list[dict[str, Any]] = []
    with child(cmd, ROOT / "logs" / "transport" / "upstream.log", env) as upstream:
        wait_ready(f"{url}/health", upstream, "upstream", 30)
        chosen = a.variants or variants()
        for r in range(a.rounds):
            for i in range(len(chosen)):
                variant = chosen[(i + r) % len(chosen)]
                before = proc_cpu.tree_cpu_s(upstream.pid, proc_cpu.snapshot())
                result = run_worker(variant, a, f"{url}/v1/completions")
                after = proc_cpu.tree_cpu_s(upstream.pid, proc_cpu.snapshot())
                result |= {"round": r, "upstream_cpu_s": after - before}
                runs.append(result)
                per = result["cpu_s"] * 1e6 / max(1, result["requests"])
                print(f"round {r + 1} {variant:28} {per:8.0f} us/req  {result['requests']} requests  "
                      f"errors {result['errors']}", file=sys.stderr)  # fmt: skip
    return {"summary": summarize(runs), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per variant and round")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds at the start of every run")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="one-token chunks per answer (plus the usage chunk)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="the client's event loop")
    ap.add_argument("--variants", nargs="+", choices=variants(), help="default: all")
    ap.add_argument("--out", type=Path, default=Path("results/transport.json"))
    ap.add_argument("--worker", choices=variants(), help=argparse.SUPPRESS)  # one run, in its own process
    ap.add_argument("--url", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.seconds <= 0 or a.concurrency < 1 or a.tokens < 1 or a.warmup < 0:
        ap.error("need rounds >= 1, seconds > 0, concurrency >= 1, tokens >= 1, warmup >= 0")
    if a.worker:
        run = __import__("uvloop").run if a.loop == "uvloop" else asyncio.run
        result = run(worker(a.worker, a.url, a.tokens, a.concurrency, a.seconds, a.warmup))
        print(json.dumps(result))
        return 0
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result = bench(a)
    config = {k: v for k, v in vars(a).items() if k not in ("out", "worker", "url")}
    config |= {"cpus": os.cpu_count(), "started_at": started, "load_average": os.getloadavg()}
    print(markdown(result["summary"], a.tokens))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"config": config, **result}, indent=2) + "\n")
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
