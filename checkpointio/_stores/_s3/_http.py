"""Object bodies received by checkpointio's own HTTP/1.1 reader; every other request by aiohttp.

A load's bytes are nearly all GET bodies. aiohttp hands each body block over as a new ``bytes``
that its parser copied out of the one ``recv`` filled, a third copy of every byte besides the
socket's and the page cache's, and runs several Python calls per block. :class:`BodySession` is
aiobotocore's HTTP session (its public ``http_session_cls`` setting) with one change: a streaming
GET, already built and signed by botocore, is sent on a connection of our own whose protocol
(:class:`asyncio.BufferedProtocol`) has the kernel write the body straight into the blocks handed
on, 512 KiB each (``recv_into``: one copy out of the socket, no allocation per read). botocore still
serializes, signs, retries and parses the response (an error's XML included), so nothing about an
operation's meaning changes; requests through a proxy, and every other request, go to aiohttp as
before.

The reader speaks the part of HTTP/1.1 an object GET needs: one request at a time per connection,
a ``Content-Length`` body, keep-alive. A response it cannot frame that way (chunked, or no
length) is asked again of aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import select
import ssl
from collections.abc import Callable, Iterator
from typing import Any, cast
from urllib.parse import urlsplit

from aiobotocore.awsrequest import AioAWSResponse
from aiobotocore.httpsession import AIOHTTPSession
from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from botocore.httpsession import ProxyConfiguration, create_urllib3_context, get_cert_path

from ..._allocator import unfilled_bytearray

__all__ = ["BodySession", "BLOCK"]

#: The size of the blocks a body is received into and handed on in (the last one smaller).
BLOCK = 512 << 10
#: Most bytes a response's status line and headers may take.
_MAX_HEAD = 64 << 10
#: Blocks received but not yet taken past which the connection is not read (TCP holds the rest).
_QUEUED = 2
#: Idle connections kept per host, at most.
_IDLE = 16
#: Seconds an idle connection is kept (aiobotocore's own pool keeps its connections this long):
#: servers close idle ones after some seconds, and a peer gone without a word would cost a
#: whole read timeout.
_KEEP_IDLE = 12.0
#: Most interim (1xx) responses read before the final one.
_MAX_INTERIM = 8
#: Most bytes of an error response's body read when the server does not give its length.
_MAX_ERROR_BODY = 1 << 20

_Key = tuple[str, str, int]


class _Closed(Exception):
    """The connection ended before the response's head was whole."""

    def __init__(self, received: int, cause: BaseException | None) -> None:
        ended = f"the connection closed after {received} bytes of the response"
        super().__init__(f"{ended}: {cause}" if cause else ended)
        self.received = received


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection: a response's head read into a buffer of its own, then its body
    into the blocks it hands on (:meth:`take`).

    Its state: ``idle`` (no request in flight: a byte from the server ends the connection),
    ``head`` (reading the response's head), ``headed`` (the head is whole, reading paused until the
    caller asks for the body; bytes a transport still delivers are kept), ``body`` (receiving the
    body; a byte past its length ends the connection), ``raw`` (bytes kept as they come: an error
    body of no announced length, read to its end).

    A connection that became idle is offered again only from the next turn of the event loop
    (:attr:`settled`), once bytes the server sent past the body's end, if any, were read and ended it.
    """

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._state = "idle"
        self._lost: BaseException | None = None  # why the connection ended (None: the peer closed it)
        self._waiter: asyncio.Future[None] | None = None
        self._head = bytearray(0)
        self._head_length = 0
        self._head_end = -1  # where the head ends in _head
        self._scratch = bytearray(0)  # where bytes outside a head or body are read
        self._extra: list[bytes] = []  # bytes delivered after the head, before the body was asked for
        self._remaining = 0  # body bytes still to come
        self._block: bytearray | None = None
        self._filled = 0
        self._blocks: collections.deque[bytearray] = collections.deque()
        self._paused = False
        self._keep = False  # the server keeps the connection open after this response
        self._received = 0  # bytes received so far, ever: progress for the read timeout
        self.settled = False  # idle since a turn of the event loop: may take a request
        self.idle_since = 0.0

    # -- protocol callbacks (the event loop's) --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not asyncio's class

    def get_buffer(self, sizehint: int) -> memoryview:
        state = self._state
        if self.closed:
            state = "closed"  # what still comes is dropped (scratch)
        if state == "body" and self._remaining:
            if self._block is None:
                self._block = unfilled_bytearray(min(BLOCK, self._remaining))  # recv fills it
                self._filled = 0
            return memoryview(self._block)[self._filled :]
        if state == "head":
            if not self._head:
                self._head = bytearray(_MAX_HEAD)
            return memoryview(self._head)[self._head_length :]
        if not self._scratch:
            self._scratch = bytearray(_MAX_HEAD)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        self._received += nbytes
        state = self._state
        if self.closed:
            return
        if state == "body" and self._remaining:
            self._filled += nbytes
            self._remaining -= nbytes
            assert self._block is not None
            if self._filled == len(self._block):
                self._blocks.append(self._block)
                self._block = None
                if len(self._blocks) >= _QUEUED and self._remaining:
                    self._pause()
                self._wake()
        elif state == "head":
            start = max(0, self._head_length - 3)
            self._head_length += nbytes
            self._head_end = self._head.find(b"\r\n\r\n", start, self._head_length)
            if self._head_end >= 0:
                self._state = "headed"
                self._pause()  # the caller reads the head, then asks for the body
                self._wake()
            elif self._head_length == len(self._head):
                self._fail(HTTPClientError(error=f"a response head longer than {_MAX_HEAD} bytes"))
        elif state in ("headed", "raw"):
            self._extra.append(bytes(self._scratch[:nbytes]))
            if state == "raw":
                self._wake()
        else:  # idle, or past the body's end: the connection cannot be trusted with another request
            self._fail(HTTPClientError(error=f"the server sent {nbytes} bytes nobody asked for"))

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost says the rest

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self._lost is None:
            self._lost = exc
        self._wake()

    # -- the caller's side --

    async def request(self, head: bytes, timeout: float | None) -> tuple[int, dict[str, str], bytes]:
        """Send ``head`` (a request without a body) and read the response's head: its status, its
        headers (lower-case names) and the bytes of the body that came with it."""
        assert self.transport is not None and self._state == "idle"
        self._state = "head"
        self._head_length = 0
        self.transport.write(head)
        for _ in range(_MAX_INTERIM + 1):
            while self._state == "head":
                if self.closed:
                    raise _Closed(self._head_length, self._lost)
                await self._wait(timeout)
            raw = bytes(self._head[: self._head_end])
            early = bytes(self._head[self._head_end + 4 : self._head_length])
            if not (raw.startswith(b"HTTP/1.1 1") and raw[9:12] != b"101"):
                break
            # An interim response (100 Continue, 103 Early Hints): the final one follows.
            self._read_head_from(early + b"".join(self._extra))
        else:
            raise HTTPClientError(error=f"more than {_MAX_INTERIM} interim responses")
        lines = raw.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not (code.isascii() and code.isdigit()):
            raise HTTPClientError(error=f"not an HTTP/1.x status line: {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise HTTPClientError(error=f"not an HTTP header: {line[:100]!r}")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        connection = headers.get("connection", "").lower()
        self._keep = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
        return int(code), headers, early

    def _read_head_from(self, received: bytes) -> None:
        """Read a response's head anew, ``received`` its first bytes (what came after an interim one)."""
        self._extra = []
        if len(received) >= len(self._head):
            self._fail(HTTPClientError(error=f"a response head longer than {_MAX_HEAD} bytes"))
            return
        self._head[: len(received)] = received
        self._head_length = len(received)
        self._head_end = self._head.find(b"\r\n\r\n", 0, self._head_length)
        if self._head_end < 0:
            self._state = "head"
            self._resume_if_wanted()
        # else: still "headed", reading still paused, the next head already whole

    def start_body(self, length: int, early: bytes) -> None:
        """Receive a body of ``length`` bytes, ``early`` the first of them (read with the head)."""
        assert self._state == "headed"
        rest = early + b"".join(self._extra) if self._extra else early
        self._extra = []
        if len(rest) > length:  # bytes past the body: it is what was announced, and the connection ends after it
            rest = rest[:length]
            self._keep = False
        self._state = "body"
        self._remaining = length
        while rest:
            view = self.get_buffer(len(rest))
            size = min(len(rest), len(view))
            view[:size] = rest[:size]
            self.buffer_updated(size)
            rest = rest[size:]
        self._resume_if_wanted()

    async def read_to_end(self, early: bytes, timeout: float | None) -> bytes:
        """An error body of no announced length: what comes until the server closes the connection
        (or, chunked, until its last chunk), at most :data:`_MAX_ERROR_BODY` bytes. The connection
        is closed after it."""
        assert self._state == "headed"
        self._state = "raw"
        self._extra.insert(0, early)
        self._resume_if_wanted()
        while not self.closed and sum(map(len, self._extra)) < _MAX_ERROR_BODY:
            if b"".join(self._extra).endswith(b"0\r\n\r\n"):  # a chunked body's end
                break
            await self._wait(timeout)
        data = b"".join(self._extra)[:_MAX_ERROR_BODY]
        self._extra = []
        self.close()
        return data

    async def take(self, timeout: float | None) -> bytearray | None:
        """The next block of the body; ``None`` once it was all taken. Raises the botocore error
        of a body cut short, or ``TimeoutError`` when the server sent nothing for ``timeout`` seconds."""
        while not self._blocks:
            if self._remaining == 0:
                return None
            if self.closed:
                received = self._filled if self._block is not None else 0
                raise ResponseStreamingError(
                    error=f"the connection closed with {self._remaining + received} bytes of the body to come"
                    + (f": {self._lost}" if self._lost else "")
                )
            self._resume_if_wanted()
            await self._wait(timeout)
        block = self._blocks.popleft()
        self._resume_if_wanted()
        return block

    @property
    def reusable(self) -> bool:
        """The response was read whole and the server keeps the connection open."""
        return not self.closed and self._state == "body" and not self._remaining and not self._blocks and self._keep

    def idle(self) -> None:
        """Back in the pool: a byte from the server now ends the connection. Offered again from
        the next turn of the event loop (:attr:`settled`)."""
        self._state = "idle"
        self.settled = False
        loop = asyncio.get_running_loop()
        self.idle_since = loop.time()
        self._resume_if_wanted()
        loop.call_soon(self._settle)

    def _settle(self) -> None:
        self.settled = not self.closed

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- helpers --

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _resume_if_wanted(self) -> None:
        if (
            self._paused
            and self._state != "headed"
            and len(self._blocks) < _QUEUED
            and self.transport is not None
            and not self.closed
        ):
            self._paused = False
            self.transport.resume_reading()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self._lost = error
        self.close()

    async def _wait(self, timeout: float | None) -> None:
        """Until the protocol wakes us; ``TimeoutError`` once no byte came for ``timeout`` seconds
        (bytes that arrive without waking us, a block still filling, count as progress)."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer: asyncio.TimerHandle | None = None

        def check(seen: int) -> None:
            nonlocal timer
            if waiter.done():
                return
            if self._received != seen:
                timer = loop.call_later(timeout, check, self._received)  # type: ignore[arg-type]
            else:
                waiter.set_exception(TimeoutError())

        if timeout:
            timer = loop.call_later(timeout, check, self._received)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()


class _Body:
    """A response body for botocore's ``StreamingBody``: what aiobotocore reads of aiohttp's
    response (``content.read``/``readany``/``at_eof``, ``close``, ``async with``), over a
    :class:`_Connection`; the connection goes back to its session's pool once read whole."""

    def __init__(
        self, session: BodySession, connection: _Connection, url: str, timeout: float | None, headers: dict[str, str]
    ) -> None:
        self._session = session
        self._connection: _Connection | None = connection
        self._timeout = timeout
        self._buffer = memoryview(b"")  # what read(n) took of a block and did not return
        self._eof = False
        self.url = url
        self.raw_headers = _raw(headers)  # where aiobotocore before 2.19 reads the headers

    @property
    def content(self) -> _Body:
        return self

    @property
    def raw_stream(self) -> _Body:
        return self

    async def readany(self) -> bytes | bytearray:
        """The next block as received (a 512 KiB ``bytearray``, the last one smaller); ``b""`` at the end."""
        if self._buffer:
            kept, self._buffer = self._buffer, memoryview(b"")
            return bytes(kept)
        connection = self._connection
        if connection is None or self._eof:
            return b""
        with _closed_on_error(self.close, self.url):
            block = await connection.take(self._timeout)
        if block is None:
            self._eof = True
            self.close()
            return b""
        return block

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is left when ``n`` is negative)."""
        if n < 0:
            pieces = []
            while block := await self.readany():
                pieces.append(block)
            return b"".join(pieces)
        if not self._buffer:
            self._buffer = memoryview(await self.readany())
        piece, self._buffer = self._buffer[:n], self._buffer[n:]
        return bytes(piece)

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    def close(self) -> None:
        """Done with the body: a connection whose body was not read whole is closed."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._session._give_back(connection)

    release = close

    async def __aenter__(self) -> _Body:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.close()


class _ErrorBody:
    """An error response's body, read whole (botocore parses it into a ``ClientError``)."""

    def __init__(self, data: bytes, url: str, headers: dict[str, str]) -> None:
        self._data = data
        self.url = url
        self.raw_headers = _raw(headers)

    async def read(self, n: int = -1) -> bytes:
        data, self._data = self._data, b""
        return data

    def close(self) -> None:
        pass


class BodySession(AIOHTTPSession):  # type: ignore[misc]  # aiobotocore has no type hints
    """aiobotocore's HTTP session, whose streaming GETs are received by :class:`_Connection`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        timeout = kwargs.get("timeout")
        self._connect_timeout, self._read_timeout = (
            timeout if isinstance(timeout, (tuple, list)) else (timeout, timeout)
        )
        self._body_verify = kwargs.get("verify", True)
        self._body_cert = kwargs.get("client_cert")
        self._body_proxies = ProxyConfiguration(
            proxies=kwargs.get("proxies"), proxies_settings=kwargs.get("proxies_config")
        )
        self._body_ssl: ssl.SSLContext | None = None
        self._pool: dict[_Key, list[_Connection]] = {}
        self._closing = False

    async def send(self, request: Any) -> Any:
        if request.method != "GET" or not request.stream_output or self._body_proxies.proxy_url_for(request.url):
            return await super().send(request)
        url = urlsplit(request.url)
        scheme = url.scheme.lower()
        if scheme not in ("http", "https") or not url.hostname:
            return await super().send(request)
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, url.hostname, port)
        head = _request_head(request, url, port)
        while True:
            connection, reused = self._idle_connection(key)
            if connection is None:
                connection = await self._connect(key, request.url)
            try:
                with _closed_on_error(connection.close, request.url):
                    status, headers, early = await connection.request(head, self._read_timeout)
            except _Closed as closed:
                if reused and closed.received == 0:
                    continue  # the server closed an idle connection: ask again on a new one
                raise ConnectionClosedError(endpoint_url=request.url, error=closed) from None
            break
        length = headers.get("content-length", "")
        framed = "transfer-encoding" not in headers and length.isascii() and length.isdigit()
        if status in (204, 304):
            framed, length = True, "0"  # never a body (RFC 9110), whatever the headers say
        if not framed and status >= 300:
            # An error's body (S3 sends some chunked): read here, not asked again, which would
            # double the requests of a throttled client. botocore parses what it can of it.
            with _closed_on_error(connection.close, request.url):
                data = _unchunked(await connection.read_to_end(early, self._read_timeout), headers)
            return AioAWSResponse(request.url, status, headers, _ErrorBody(data, request.url, headers))
        if not framed:
            connection.close()  # an object's body not framed by a length: aiohttp reads it
            return await super().send(request)
        try:
            connection.start_body(int(length), early)
            if status >= 300:
                body = _Body(self, connection, request.url, self._read_timeout, headers)
                data = await body.read()
                return AioAWSResponse(request.url, status, headers, _ErrorBody(data, request.url, headers))
        except BaseException:
            connection.close()
            raise
        body = _Body(self, connection, request.url, self._read_timeout, headers)
        return AioAWSResponse(request.url, status, headers, body)

    def _idle_connection(self, key: _Key) -> tuple[_Connection | None, bool]:
        """A kept connection to ``key`` that can take a request (the newest settled one), and
        whether there was one; connections closed or idle too long are dropped on the way."""
        idle = self._pool.get(key)
        if not idle:
            return None, False
        now = asyncio.get_running_loop().time()
        for connection in [c for c in idle if c.closed or now - c.idle_since > _KEEP_IDLE]:
            idle.remove(connection)
            connection.close()
        for connection in reversed(idle):
            if connection.settled:
                idle.remove(connection)
                if _readable(connection):  # bytes or an end the loop has not read yet: not trusted
                    connection.close()
                    continue
                return connection, True
        return None, False

    def _give_back(self, connection: _Connection) -> None:
        """A connection whose response was read: kept for the next request if it can take one."""
        idle = self._pool.setdefault(connection.key, [])
        if connection.reusable and len(idle) < _IDLE and not self._closing:
            connection.idle()
            idle.append(connection)
        else:
            connection.close()

    async def _connect(self, key: _Key, url: str) -> _Connection:
        scheme, host, port = key
        context = None
        if scheme == "https":
            if self._body_ssl is None:
                self._body_ssl = await asyncio.to_thread(self._ssl_context)
            context = self._body_ssl
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(key), host, port, ssl=context),
                self._connect_timeout,
            )
        except asyncio.TimeoutError as error:
            raise ConnectTimeoutError(endpoint_url=url, error=error) from None
        except ssl.SSLError as error:
            raise SSLError(endpoint_url=url, error=error) from None
        except OSError as error:
            raise EndpointConnectionError(endpoint_url=url, error=error) from None
        return connection

    def _ssl_context(self) -> ssl.SSLContext:
        """As aiobotocore's session makes its own: botocore's defaults, its CA bundle, the client certificate."""
        context: ssl.SSLContext = create_urllib3_context()
        if self._body_verify:
            context.check_hostname = True
            ca_certs = get_cert_path(self._body_verify)
            if ca_certs:
                context.load_verify_locations(ca_certs, None, None)
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        cert = self._body_cert
        if isinstance(cert, str):
            context.load_cert_chain(cert)
        elif isinstance(cert, tuple):
            context.load_cert_chain(cert[0], cert[1])
        return context

    def _close_idle(self) -> None:
        self._closing = True
        pool, self._pool = self._pool, {}
        for idle in pool.values():
            for connection in idle:
                connection.close()

    async def close(self) -> None:
        self._close_idle()
        await super().close()

    async def __aexit__(self, *args: Any) -> None:
        self._close_idle()
        await super().__aexit__(*args)


@contextlib.contextmanager
def _closed_on_error(close: Callable[[], None], url: str) -> Iterator[None]:
    """Whatever the block raises ends the connection (``close``); a server silent for the read
    timeout is botocore's ``ReadTimeoutError`` (retried as one), anything else goes on as raised."""
    try:
        yield
    except TimeoutError as error:
        close()
        raise ReadTimeoutError(endpoint_url=url, error=error) from None
    except BaseException:
        close()
        raise


def _readable(connection: _Connection) -> bool:
    """Whether an idle connection's socket has something to read: bytes the server sent past the
    last body, or its end (as urllib3 checks a pooled connection before reusing it)."""
    transport = connection.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _unchunked(data: bytes, headers: dict[str, str]) -> bytes:
    """An error body as read to its end: the chunks' data when it came chunked (what can be
    decoded of it; botocore makes an error of the status whatever the body says)."""
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        return data
    pieces = []
    at = 0
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            break
        size_text = data[at:line_end].split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            break
        if size == 0:
            break
        pieces.append(data[line_end + 2 : line_end + 2 + size])
        at = line_end + 2 + size + 2
    return b"".join(pieces)


def _raw(headers: dict[str, str]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items())


def _request_head(request: Any, url: Any, port: int) -> bytes:
    """The request line and headers of a GET, as botocore built and signed them."""
    target = url.path or "/"
    if url.query:
        target += "?" + url.query
    default_port = 443 if url.scheme.lower() == "https" else 80
    host = url.hostname if ":" not in url.hostname else f"[{url.hostname}]"
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}" if port == default_port else f"Host: {host}:{port}"]
    for name, value in request.headers.items():
        if name.lower() in ("host", "accept-encoding", "connection"):
            continue
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        if any(c in text or c in name for c in "\r\n"):
            raise HTTPClientError(error=f"a line break in the {name} header")
        lines.append(f"{name}: {text}")
    lines.append("Accept-Encoding: identity")  # the bytes as stored (aiobotocore asks the same)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
