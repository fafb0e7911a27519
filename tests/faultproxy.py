"""A loopback HTTP/1.1 proxy that injects faults between the library and the S3 server.

Faults are queued with :meth:`FaultProxy.add`: the next requests matching a predicate get a canned
error response (503 SlowDown, 500), have their connection reset half-way through the request body
(an upload part) or half-way through the response body (a ranged download), or have half of the
response body held back until the test lets it go. Everything else is relayed unchanged. Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypedDict
from urllib.parse import unquote

Match = Callable[[str, str], bool]


class Request(TypedDict):
    """One request the proxy saw: method, target, what it did, and the request headers."""

    method: str
    target: str
    action: str
    headers: dict[str, str]


_RESPONSES = {
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error."),
    "403": (403, "Forbidden", "AccessDenied", "Access Denied"),
}


@dataclass
class Fault:
    """``action`` on the next ``times`` requests for which ``match(method, target)`` holds."""

    match: Match
    #: "503", "500", "403", "reset_request", "reset_response", "stall", "flip" (a byte of the body),
    #: "pause" (send half the response body, the rest once ``FaultProxy.resume`` is set),
    #: "truncate" (send half the response body, then close the connection cleanly),
    #: "drop_range" (forward the request without its Range header, as a server ignoring it),
    #: "chunked" (send the response body chunked instead of with its length), "no_length" (send it
    #: with neither, the end of the connection ending it), "close_after" (relay the response whole,
    #: then close the connection although it said it would keep it open)
    action: str
    times: int = 1
    hits: int = 0
    #: Set once a request was given this fault (a test waits on it to know a save got that far).
    taken: threading.Event = field(default_factory=threading.Event)


@dataclass
class FaultProxy:
    upstream: tuple[str, int]
    faults: list[Fault] = field(default_factory=list)
    #: One entry per request: method, target, what the proxy did, and its request headers.
    log: list[Request] = field(default_factory=list)
    #: Seconds to hold each request matching ``slow`` before relaying it (to observe overlap).
    delay: float = 0.0
    slow: Match = lambda method, target: False
    #: How long a "stall" fault holds a request before dropping the connection (at most until
    #: :meth:`FaultProxy.close`).
    stall_seconds: float = 30.0
    #: Most requests matching ``slow`` in flight at once.
    max_in_flight: int = 0
    #: What "pause" faults wait for before sending the second half of a response body.
    resume: threading.Event = field(default_factory=threading.Event)
    #: Every key a listing response (objects or multipart uploads) carried, in the order sent.
    listed: list[str] = field(default_factory=list)

    #: Connections the proxy accepted.
    connections: int = 0
    #: Keep the client's connection open when the server closes its own after a response (moto
    #: closes every one): the next request goes to the server on a new connection.
    keep_alive: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._closed = threading.Event()
        self._in_flight = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def add(self, match: Match, action: str, times: int = 1) -> Fault:
        fault = Fault(match, action, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def close(self) -> None:
        self._closed.set()
        self._server.close()

    def _take(self, method: str, target: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.hits < fault.times and fault.match(method, target):
                    fault.hits += 1
                    fault.taken.set()
                    return fault
        return None

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        cin = client.makefile("rb")
        uin = upstream.makefile("rb")
        try:
            while relayed := self._relay_one(client, cin, upstream, uin):
                if relayed == "renew":  # the server closed its side; the client's stays open
                    upstream.close()
                    upstream = socket.create_connection(self.upstream)
                    uin = upstream.makefile("rb")
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()

    def _relay_one(
        self, client: socket.socket, cin: io.BufferedReader, upstream: socket.socket, uin: io.BufferedReader
    ) -> bool | str:
        head, headers = _read_head(cin)
        if not head:
            return False
        method, target = head.split(b" ", 2)[:2]
        method_s, target_s = method.decode(), target.decode()
        fault = self._take(method_s, target_s)
        action = fault.action if fault else "relay"
        self.log.append({"method": method_s, "target": target_s, "action": action, "headers": headers})
        if self.slow(method_s, target_s):
            with self._lock:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
            try:
                time.sleep(self.delay)
                return self._relay_body(client, cin, upstream, uin, method_s, target_s, headers, action)
            finally:
                with self._lock:
                    self._in_flight -= 1
        return self._relay_body(client, cin, upstream, uin, method_s, target_s, headers, action)

    def _relay_body(
        self,
        client: socket.socket,
        cin: io.BufferedReader,
        upstream: socket.socket,
        uin: io.BufferedReader,
        method_s: str,
        target_s: str,
        headers: dict[str, str],
        action: str,
    ) -> bool | str:
        length = int(headers.get("content-length", "0"))
        expects = headers.get("expect", "").lower() == "100-continue"
        if action in _RESPONSES:
            if not expects:
                _read_exact(cin, length)
            status, reason, code, message = _RESPONSES[action]
            xml = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
            )
            client.sendall(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(xml)}\r\nConnection: close\r\n\r\n{'' if method_s == 'HEAD' else xml}".encode()
            )
            return False
        head = headers["_head"]
        if action == "drop_range":
            head = "".join(line for line in head.splitlines(keepends=True) if not line.lower().startswith("range:"))
        if expects:  # answer the client ourselves and forward without the Expect header
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            head = "".join(line for line in head.splitlines(keepends=True) if not line.lower().startswith("expect:"))
        upstream.sendall(head.encode("latin-1"))
        body = _read_exact(cin, length)
        if action == "stall":  # take the request, never answer (until the client gives up)
            self._closed.wait(self.stall_seconds)
            _reset(client)
            _reset(upstream)
            return False
        if action == "reset_request":
            upstream.sendall(body[: len(body) // 2])
            _reset(client)
            _reset(upstream)
            return False
        upstream.sendall(body)
        response, rheaders = _read_head(uin)
        if not response:  # the server closed without an answer (its client went away first): pass that on
            _reset(client)
            return False
        status = int(response.split(b" ", 2)[1])
        if action in ("chunked", "no_length") and "content-length" in rheaders:
            data = _read_exact(uin, int(rheaders["content-length"]))
            kept = [line for line in response.split(b"\r\n")[:-2] if not line.lower().startswith(b"content-length:")]
            if action == "no_length":
                kept = [line for line in kept if not line.lower().startswith(b"connection:")]
                client.sendall(b"\r\n".join([*kept, b"Connection: close", b"", b""]) + data)
                return False
            client.sendall(b"\r\n".join([*kept, b"Transfer-Encoding: chunked", b"", b""]))
            for start in range(0, len(data), 65536):
                piece = data[start : start + 65536]
                client.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            client.sendall(b"0\r\n\r\n")
            return True
        server_closes = rheaders.get("connection", "").lower() == "close"
        if server_closes and self.keep_alive:
            response = b"".join(
                line for line in response.splitlines(keepends=True) if not line.lower().startswith(b"connection:")
            )
        client.sendall(response)
        if method_s == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return True
        if rheaders.get("transfer-encoding", "").lower() == "chunked":
            _relay_chunked(uin, client)
            return True
        if "content-length" not in rheaders:
            while data := uin.read1(65536):
                client.sendall(data)
            return False
        data = _read_exact(uin, int(rheaders["content-length"]))
        query = target_s.partition("?")[2]
        if method_s == "GET" and ("list-type=2" in query or query.startswith("uploads") or "&uploads" in query):
            self.listed.extend(unquote(key.decode()) for key in re.findall(rb"<Key>(.*?)</Key>", data))
        if action == "reset_response":
            client.sendall(data[: len(data) // 2])
            _reset(client)
            return False
        if action == "truncate":
            client.sendall(data[: len(data) // 2])
            time.sleep(0.5)  # let the client take in the first half before the connection ends
            client.shutdown(socket.SHUT_WR)
            return False
        if action == "pause":
            client.sendall(data[: len(data) // 2])
            self.resume.wait(60)
            data = data[len(data) // 2 :]
        if action == "flip" and data:  # bit rot on the wire or in the store: same length, one byte off
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0xFF
            data = bytes(flipped)
        client.sendall(data)
        if action == "close_after" or (server_closes and not self.keep_alive):
            return False
        return "renew" if server_closes else True


def _read_head(stream: io.BufferedReader) -> tuple[bytes, dict[str, str]]:
    lines = []
    while True:
        line = stream.readline()
        if not line:
            return b"", {}
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    headers = {"_head": b"".join(lines).decode("latin-1")}
    for line in lines[1:-1]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return b"".join(lines), headers


def _read_exact(stream: io.BufferedReader, length: int) -> bytes:
    data = stream.read(length) if length else b""
    if len(data) != length:
        raise OSError("connection closed mid-body")
    return bytes(data)


def _relay_chunked(source: io.BufferedReader, client: socket.socket) -> None:
    while True:
        size_line = source.readline()
        client.sendall(size_line)
        size = int(size_line.split(b";")[0].strip(), 16)
        client.sendall(_read_exact(source, size + 2))
        if size == 0:
            return


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN: what a dropped connection looks like to the peer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
