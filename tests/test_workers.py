"""Issue 17 part 2: ``stopgate serve --workers 2`` as shipped, on the fake engine, state in one SQLite file.

The tests share one gateway (a parent and its two workers) and run in file order:
two pids answer on one port, the request counters of one scrape add up over the
workers, every scored request is one controller sample, and a worker killed with
SIGKILL loses at most its requests in flight. The drain test starts a gateway of
its own on a slow engine.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.engine.embedded import free_port
from gateway.errors import Overloaded
from gateway.http.admission import Admission, per_worker
from gateway.http.auth import Principal
from gateway.metrics import Metrics
from gateway.settings import RouteConfig
from loadtest.redis_server import RedisServer
from loadtest.replicas import Child, _spawn, fake_engine, wait_http
from tests.support.fleet import ITEMS, write_routes

KEY = "workers-admin-key-0123456789"
ADMIN = {"authorization": f"Bearer {KEY}", "connection": "close"}
CLOSE = {"connection": "close"}  # a new connection per request, so the kernel may hand it to either worker
ROUTE = "arith"
LEASE_MS = 2000


@dataclass
class Gateway:
    parent: Child
    db: Path


def serve_workers(logs: Path, upstream: str, *, workers: int = 2, **env: str) -> Gateway:
    port = free_port()
    routes = write_routes(logs)
    args = [sys.executable, "-m", "gateway.cli", "serve", "--upstream", upstream, "--port", str(port)]
    args += ["--routes", str(routes), "--auth", "off", "--workers", str(workers)]
    db = logs / "state.db"
    full_env = {
        "STOPGATE_STATE_PATH": str(db),
        "STOPGATE_ADMIN_KEY": KEY,
        "STOPGATE_STATE_LEASE_MS": str(LEASE_MS),
        "STOPGATE_LOG_LEVEL": "info",
        **env,
    }
    log = logs / "gateway.log"
    parent = Child("gateway", f"http://127.0.0.1:{port}", _spawn("gateway", args, log, full_env), log)
    try:
        wait_http(parent, "/ready", timeout_s=60)
        eventually(lambda: len(answering_pids(parent)) == workers, "every worker to answer", timeout_s=60)
    except BaseException:
        parent.stop()
        raise
    return Gateway(parent, db)


def eventually(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def worker_pids(parent: Child) -> set[int]:
    """The parent's live worker processes (multiprocessing's spawned children)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent.pid and b"spawn_main" in cmdline:
            pids.add(int(entry.name))
    return pids


def pid_of(replica: str) -> int:
    """The pid in a fleet replica id, ``<host>-<pid>-<suffix>``."""
    return int(replica.rsplit("-", 2)[1])


def snapshot(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/admin/routes/{ROUTE}", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def answering_pids(parent: Child, tries: int = 40) -> set[int]:
    """The workers that answered ``tries`` admin reads, eight at a time on fresh connections."""
    with ThreadPoolExecutor(8) as pool:
        return {pid_of(s["fleet"]["replica"]) for s in pool.map(lambda _: snapshot(parent.url), range(tries))}


def gold(url: str, n: int) -> httpx.Response:
    body = {"model": ROUTE, "prompt": f"Q: {n % ITEMS}+0=?\n", "max_tokens": 64, "reference_id": f"f{n % ITEMS}"}
    return httpx.post(f"{url}/v1/completions", json=body, headers=CLOSE, timeout=60)


def scrape(url: str) -> dict[str, float]:
    """Every sample of one /metrics scrape, by its full name with labels."""
    text = httpx.get(f"{url}/metrics", headers=CLOSE, timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def requests_total(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("stopgate_requests_total{"))


def db_rows(db: Path, sql: str) -> list[Any]:
    with closing(sqlite3.connect(db, timeout=10)) as conn:
        return conn.execute(sql).fetchall()


def settled(gw: Gateway) -> int:
    """The gold sample count once every worker's buffer reached the log and the leader folded it all."""
    time.sleep(4 * 0.25)  # a few rounds of state_refresh_s: every worker has flushed
    eventually(lambda: db_rows(gw.db, "SELECT count(*) FROM fleet_log") == [(0,)], "the log to be folded in")
    counted = int(db_rows(gw.db, "SELECT coalesce(sum(n), 0) FROM sample_counts WHERE source = 'gold'")[0][0])
    # exactly once: every counted sample is one retained row (fewer than the store's 10,000 cap here)
    assert db_rows(gw.db, "SELECT count(*) FROM samples WHERE source = 'gold'") == [(counted,)]
    eventually(lambda: snapshot(gw.parent.url)["samples"]["gold"] == counted, "every worker to read the count")
    return counted


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    logs = tmp_path_factory.mktemp("workers")
    engine = fake_engine(logs, tokens=30)
    gw = None
    try:
        gw = serve_workers(logs, engine.url)
        yield gw
    finally:
        if gw is not None:
            gw.parent.stop()
        engine.stop()


def test_each_worker_admits_its_share_of_every_in_flight_limit() -> None:
    """With 3 workers, limits of 10 (gateway), 5 (route) and 5 (key) admit 4, 2 and 2 in each worker."""
    metrics = Metrics()

    def fill(admit: Callable[[], object]) -> int:
        n = 0
        with pytest.raises(Overloaded):
            while True:
                admit()
                n += 1
        return n

    admission = Admission(per_worker(10, 3), metrics, workers=3)
    assert fill(admission.admit) == 4
    admission = Admission(per_worker(10, 3), metrics, workers=3)
    route = RouteConfig(name="arith", upstream_model="tinyreason", max_in_flight=5)
    assert fill(lambda: admission.admit().enter_route(route)) == 2
    admission = Admission(per_worker(10, 3), metrics, workers=3)
    key = Principal("k", frozenset({"arith"}), max_in_flight=5)
    assert fill(lambda: admission.admit(key)) == 2


def test_two_workers_answer_on_one_port(gateway: Gateway) -> None:
    workers = worker_pids(gateway.parent)
    assert len(workers) == 2 and gateway.parent.pid not in workers
    assert answering_pids(gateway.parent) == workers


def test_request_counts_of_every_worker_add_up_in_one_scrape(gateway: Gateway) -> None:
    url = gateway.parent.url
    before = requests_total(scrape(url))
    k = 40
    with ThreadPoolExecutor(8) as pool:
        codes = [r.status_code for r in pool.map(lambda n: gold(url, n), range(k))]
    assert codes == [200] * k
    scrapes = [scrape(url) for _ in range(6)]  # fresh connections: both workers answer some of these
    for metrics in scrapes:
        assert requests_total(metrics) - before == k
        assert metrics["stopgate_in_flight_requests"] == 0
        assert metrics[f'stopgate_fleet_leader{{route="{ROUTE}"}}'] == 1  # one worker leads: max over workers


def test_under_load_every_scored_request_is_one_controller_sample(gateway: Gateway) -> None:
    url = gateway.parent.url
    before = settled(gateway)
    with ThreadPoolExecutor(8) as pool:
        codes = [r.status_code for r in pool.map(lambda n: gold(url, n), range(120))]
    assert codes == [200] * 120
    assert settled(gateway) - before == 120


def test_a_worker_killed_with_sigkill_loses_at_most_its_requests_in_flight(gateway: Gateway) -> None:
    """Four clients send gold requests without pause; the leading worker is killed with SIGKILL.

    Asserted: (1) only requests sent before the kill fail, at most one per client (4: every request
    in flight); (2) another worker holds the route's lease within the lease TTL plus a few rounds, and the
    supervisor replaces the dead worker; (3) no sample is counted twice, and the samples lost are at most
    the gold requests answered in the last second before the kill (what the killed worker may still have
    held in its buffer, flushed every state_refresh_s = 0.25 s)."""
    url, parent = gateway.parent.url, gateway.parent
    before = settled(gateway)
    leader = pid_of(snapshot(url)["fleet"]["leader"])
    assert leader in worker_pids(parent)
    stop = threading.Event()
    results: list[tuple[float, float, bool]] = []  # (sent, answered, ok) in time.monotonic()
    lock = threading.Lock()

    def client(c: int) -> None:
        n = c
        while not stop.is_set():
            sent = time.monotonic()
            try:
                ok = gold(url, n).status_code == 200
            except httpx.HTTPError:
                ok = False
            with lock:
                results.append((sent, time.monotonic(), ok))
            n += 4

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        killed_at = time.monotonic()
        os.kill(leader, signal.SIGKILL)
        time.sleep(0.5)
        eventually(lambda: (s := snapshot(url)["fleet"]["leader"]) is not None and pid_of(s) != leader, "a new leader")
        moved_at = time.monotonic()
        eventually(lambda: len(worker_pids(parent)) == 2 and leader not in worker_pids(parent), "a new worker", 60)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    failed = [r for r in results if not r[2]]
    assert len(failed) <= 4 and all(sent < killed_at for sent, _, _ in failed), failed
    assert moved_at - killed_at < LEASE_MS / 1000 + 5
    ok = sum(1 for r in results if r[2])
    lost = ok - (settled(gateway) - before)
    near_kill = sum(1 for _, answered, good in results if good and killed_at - 1.0 <= answered <= killed_at + 0.2)
    assert 0 <= lost <= near_kill, (ok, lost, near_kill)
    assert sum(1 for sent, _, good in results if good and sent > killed_at) >= 8  # the load went on after it
    # The supervisor marked the dead worker's live gauges dead: the requests it held count no more.
    a_worker = min(worker_pids(parent))  # a worker's environment, as the parent gave it when spawning it
    environ = dict(e.split(b"=", 1) for e in Path(f"/proc/{a_worker}/environ").read_bytes().split(b"\0") if e)
    metrics_dir = Path(environ[b"PROMETHEUS_MULTIPROC_DIR"].decode())
    assert metrics_dir.is_dir()
    assert not list(metrics_dir.glob(f"gauge_live*_{leader}.db"))
    assert scrape(url)["stopgate_in_flight_requests"] == 0


def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    """Eight slow requests in flight over two workers; SIGTERM to the parent: each worker logs its drain,
    every request finishes with 200, a new one is refused, and the parent exits 0."""
    engine = fake_engine(tmp_path, tokens=30, delay_s=0.1)  # about 2 s per request
    gw = None
    try:
        gw = serve_workers(tmp_path, engine.url)
        url = gw.parent.url
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(gold, url, n) for n in range(8)]
            eventually(lambda: scrape(url)["stopgate_in_flight_requests"] == 8, "eight requests in flight", 10)
            gw.parent.proc.send_signal(signal.SIGTERM)
            eventually(lambda: gw.parent.log.read_text().count("draining:") == 2, "both workers to drain", 10)
            try:
                late = gold(url, 99).status_code
            except httpx.HTTPError:
                late = None  # the listening socket is already closed
            assert late in (503, None)
            assert [f.result().status_code for f in futures] == [200] * 8
        assert gw.parent.proc.wait(timeout=30) == 0
        drained = [int(n) for n in re.findall(r"draining: (\d+) requests in flight", gw.parent.log.read_text())]
        assert len(drained) == 2 and sum(drained) == 8
        # Every worker flushed its samples on the way out: folded, or in the log for the next leader to fold.
        folded = db_rows(gw.db, "SELECT coalesce(sum(n), 0) FROM sample_counts WHERE source = 'gold'")[0][0]
        waiting = db_rows(gw.db, 'SELECT count(*) FROM fleet_log WHERE record LIKE \'%"source":"gold"%\'')[0][0]
        assert folded + waiting == 8
    finally:
        if gw is not None:
            gw.parent.stop()
        engine.stop()


def test_with_a_state_url_the_workers_join_the_redis_fleet(tmp_path: Path) -> None:
    """With STOPGATE_STATE_URL the workers are replicas of the Redis fleet; no state file is made."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    engine = gw = None
    try:
        engine = fake_engine(tmp_path, tokens=30)
        gw = serve_workers(tmp_path, engine.url, STOPGATE_STATE_URL=redis.url)
        with ThreadPoolExecutor(8) as pool:
            codes = [r.status_code for r in pool.map(lambda n: gold(gw.parent.url, n), range(40))]
        assert codes == [200] * 40
        eventually(lambda: snapshot(gw.parent.url)["samples"]["gold"] == 40, "40 gold samples in the fleet")
        assert not gw.db.exists()
    finally:
        if gw is not None:
            gw.parent.stop()
        if engine is not None:
            engine.stop()
        redis.stop()
