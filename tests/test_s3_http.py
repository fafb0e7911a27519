"""checkpointio's HTTP/1.1 reader of S3 object bodies (``_stores/_s3/_http.py``) against servers on
127.0.0.1 that misbehave in one way each: what it must do with framing, timeouts and kept
connections. The S3 behaviour over real servers is in test_s3.py; here a GET is sent as botocore
sends it, already built, straight to the session."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from botocore.awsrequest import AWSRequest
from botocore.exceptions import HTTPClientError, ReadTimeoutError

from checkpointio._stores._s3 import _http
from checkpointio._stores._s3._http import BodySession

Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A TCP server on 127.0.0.1 answering each connection with ``handler``; counts connections
    and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests = 0

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        return head

    def get(self, path: str = "/bucket/key") -> Any:
        prepared = AWSRequest(method="GET", url=f"http://127.0.0.1:{self.port}{path}").prepare()
        prepared.stream_output = True
        return prepared


async def body_of(response: Any) -> bytes:
    received = bytearray()
    while block := await response.raw.content.readany():
        received += block
    return bytes(received)


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


async def test_a_body_that_keeps_coming_slowly_is_received_whole_however_long_it_takes() -> None:
    """The read timeout is for a server that sends nothing, not for a slow one: 512 KiB arriving
    16 KiB at a time, each piece well within the timeout but the whole far beyond it."""
    body = bytes(range(256)) * 2048

    async def trickle(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for start in range(0, len(body), 16384):
            writer.write(body[start : start + 16384])
            await writer.drain()
            await asyncio.sleep(0.02)

    async with Server(trickle) as server, BodySession(timeout=(5, 0.3)) as session:
        assert await body_of(await session.send(server.get())) == body


async def test_a_server_that_goes_silent_mid_body_is_a_read_timeout() -> None:
    async def silent(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(5)

    async with Server(silent) as server, BodySession(timeout=(5, 0.2)) as session:
        response = await session.send(server.get())
        with pytest.raises(ReadTimeoutError):
            await body_of(response)


async def test_an_error_sent_chunked_is_read_here_and_asked_once() -> None:
    """S3 sends some errors chunked (a 503 SlowDown): asking again would double the requests of a
    throttled client. The error's XML reaches botocore decoded."""
    xml = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Reduce your rate.</Message></Error>"

    async def throttled(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (40, xml[:40], len(xml) - 40, xml[40:]))
        await writer.drain()

    async with Server(throttled) as server, BodySession(timeout=(5, 5)) as session:
        response = await session.send(server.get())
        assert response.status_code == 503
        assert await response.content == xml
    assert (server.connections, server.requests) == (1, 1)


@pytest.mark.parametrize("size", [5, 3 << 20], ids=["with-the-head", "after-3-MiB"])
async def test_bytes_past_a_body_never_answer_the_next_request(size: int) -> None:
    """A server that sends more than its Content-Length (here a whole second response, in the same
    write): the body is what it announced, and the connection is not reused, so the next request
    gets its own answer."""
    first = bytes(range(256)) * (size // 256) or b"first"

    async def smuggling(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            writer.write(ok(first) + ok(b"EVIL") if server.requests == 1 else ok(b"second"))
            await writer.drain()

    async with Server(smuggling) as server, BodySession(timeout=(5, 5)) as session:
        assert await body_of(await session.send(server.get())) == first
        assert await body_of(await session.send(server.get())) == b"second"
    assert server.connections == 2


async def test_a_kept_connection_closed_when_the_next_request_comes_is_replaced_without_an_error() -> None:
    """A server's idle timeout can close a kept connection just as a request is sent on it: nothing
    of the answer came, so the request goes again on a new connection."""

    async def closing(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            if server.requests == 2:
                return  # closes this connection without answering
            writer.write(ok(b"ok %d" % server.requests))
            await writer.drain()

    async with Server(closing) as server, BodySession(timeout=(5, 5)) as session:
        assert await body_of(await session.send(server.get())) == b"ok 1"
        await asyncio.sleep(0.01)  # the connection is kept, and settled
        assert await body_of(await session.send(server.get())) == b"ok 3"
    assert (server.connections, server.requests) == (2, 3)


async def test_ranges_reuse_a_kept_connection_until_it_was_idle_too_long(monkeypatch: pytest.MonkeyPatch) -> None:
    async def keeping(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            writer.write(ok(b"ok"))
            await writer.drain()

    async with Server(keeping) as server, BodySession(timeout=(5, 5)) as session:
        for _ in range(3):
            assert await body_of(await session.send(server.get())) == b"ok"
            await asyncio.sleep(0.01)
        assert server.connections == 1
        monkeypatch.setattr(_http, "_KEEP_IDLE", 0.0)
        assert await body_of(await session.send(server.get())) == b"ok"
        assert server.connections == 2


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", b"HTTP/1.1 \xb9\xb2\xb3 OK\r\nContent-Length: 2\r\n\r\n"],
    ids=["superscript-length", "superscript-status"],
)
async def test_a_malformed_head_is_an_http_client_error(head: bytes) -> None:
    """botocore's error for a broken response (retried as such), never a bare ValueError."""

    async def malformed(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(head + b"ok")
        await writer.drain()

    async with Server(malformed) as server, BodySession(timeout=(5, 5)) as session:
        with pytest.raises(HTTPClientError):
            await body_of(await session.send(server.get()))


async def test_a_304_has_no_body_whatever_its_length_says() -> None:
    async def not_modified(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\n\r\n")
            await writer.drain()

    async with Server(not_modified) as server, BodySession(timeout=(5, 5)) as session:
        response = await session.send(server.get())
        assert response.status_code == 304
        assert await response.content == b""


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "interim-first"])
async def test_interim_responses_are_skipped_to_the_final_one(split: bool) -> None:
    async def hinting(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
        if split:
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(ok(b"the body"))
        await writer.drain()
        await asyncio.sleep(1)

    async with Server(hinting) as server, BodySession(timeout=(5, 5)) as session:
        response = await session.send(server.get())
        assert response.status_code == 200
        assert await body_of(response) == b"the body"


async def test_bytes_arriving_after_a_body_ended_never_answer_the_next_request() -> None:
    """Bytes past the body sent a little later than the body, while the event loop was busy (a CRC32,
    a hand-off) and before the next request took the kept connection: the socket is checked
    before a kept connection is used. The server runs on a thread of its own, as a real one would."""
    body = bytes(range(256)) * 4096
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    connections: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            connections.append(client)
            with contextlib.suppress(OSError), client, client.makefile("rb") as requests:  # reset: the client left
                for number in itertools.count(1):
                    while (line := requests.readline()) not in (b"\r\n", b""):
                        pass
                    if not line:
                        break
                    if number == 1 and len(connections) == 1:
                        client.sendall(ok(body))
                        time.sleep(0.01)
                        client.sendall(ok(b"EVIL"))
                    else:
                        client.sendall(ok(b"second"))

    threading.Thread(target=serve, daemon=True).start()
    prepared = AWSRequest(method="GET", url=f"http://127.0.0.1:{port}/bucket/key").prepare()
    prepared.stream_output = True
    try:
        async with BodySession(timeout=(5, 5)) as session:
            assert await body_of(await session.send(prepared)) == body
            time.sleep(0.1)  # the loop busy elsewhere while the late bytes arrive
            await asyncio.sleep(0)
            assert await body_of(await session.send(prepared)) == b"second"
    finally:
        listener.close()
    assert len(connections) == 2
