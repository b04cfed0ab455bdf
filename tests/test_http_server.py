"""The gateway's uvicorn protocol: the writes of one loop turn go out as one, in order, never lost."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.http.guard import _Coalescing
from gateway.http.server import serve_in_thread

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorder:
    """A transport that records each write (a fake, not a mock)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return f"extra:{name}"


def test_a_head_and_the_body_written_in_one_loop_turn_go_out_in_one_write() -> None:
    async def main() -> list[bytes]:
        real = Recorder()
        transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(HEAD)
        transport.write(b"ok")
        await asyncio.sleep(0)
        return real.writes

    assert asyncio.run(main()) == [HEAD + b"ok"]


def test_a_head_alone_goes_out_one_loop_turn_later() -> None:
    async def main() -> tuple[list[bytes], list[bytes]]:
        real = Recorder()
        transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(HEAD)
        before = list(real.writes)
        await asyncio.sleep(0)
        return before, real.writes

    before, after = asyncio.run(main())
    assert before == [] and after == [HEAD]


def test_the_writes_of_one_loop_turn_go_out_in_one_write_in_order() -> None:
    async def main() -> list[bytes]:
        real = Recorder()
        transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        for piece in (b"a", b"b", b"c"):
            transport.write(piece)
        await asyncio.sleep(0)
        transport.write(b"d")
        await asyncio.sleep(0)
        return real.writes

    assert asyncio.run(main()) == [b"abc", b"d"]


def test_closing_writes_what_is_held_first_and_other_calls_reach_the_real_transport() -> None:
    async def main() -> Recorder:
        real = Recorder()
        transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        assert transport.get_extra_info("peername") == "extra:peername"
        transport.write(b"body bytes ")
        transport.write(HEAD)
        transport.close()
        await asyncio.sleep(0)  # the scheduled flush finds nothing held: no second copy
        return real

    real = asyncio.run(main())
    assert real.writes == [b"body bytes " + HEAD] and real.closed


def test_nothing_held_is_written_to_a_transport_that_is_already_closing() -> None:
    async def main() -> Recorder:
        real = Recorder()
        transport = _Coalescing(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"late")
        real.closed = True  # the peer went away
        await asyncio.sleep(0)
        return real

    assert asyncio.run(main()).writes == []


def test_served_responses_are_whole_json_and_streams_under_the_protocol() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["path"] == "/json":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in (b"a", b"b", b"c"):
            await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with serve_in_thread(app) as url, httpx.Client() as client:
        for _ in range(3):  # on one keep-alive connection
            assert client.get(f"{url}/json").content == b"ok"
            assert client.get(f"{url}/stream").content == b"abc"
