"""A forwarding HTTP proxy for end-to-end tests (127.0.0.1 only): absolute-form requests
(`POST http://host:port/path`) are forwarded one per connection, CONNECT is tunnelled;
`seen` lists what it was asked for, in order."""

from __future__ import annotations

import select
import socket
import threading
from urllib.parse import urlsplit

from .hostile_upstream import IO_TIMEOUT, ThreadedServer, read_request


class ForwardProxy(ThreadedServer):
    def __init__(self) -> None:
        self.seen: list[str] = []  # "POST http://..." or "CONNECT host:port"
        self._lock = threading.Lock()
        super().__init__(self._handle_one)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _note(self, line: str) -> None:
        with self._lock:
            self.seen.append(line)

    def requests(self) -> list[str]:
        with self._lock:
            return list(self.seen)

    def _handle_one(self, conn: socket.socket) -> None:
        request = read_request(conn)
        if request is None:
            return
        self._note(f"{request.method} {request.target}")
        if request.method == "CONNECT":
            host, _, port = request.target.rpartition(":")
            self._only_loopback(host)
            upstream = socket.create_connection((host, int(port)), timeout=IO_TIMEOUT)
            with upstream:
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                _pipe(conn, upstream)
            return
        target = urlsplit(request.target)
        self._only_loopback(target.hostname or "")
        path = target.path + (f"?{target.query}" if target.query else "")
        lines = [f"{request.method} {path} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in request.headers.items() if k != "proxy-connection"]
        upstream = socket.create_connection(
            (target.hostname, target.port or 80), timeout=IO_TIMEOUT
        )
        with upstream:
            upstream.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body)
            # The upstream closes after its one answer (connection: close): relay until then.
            while data := upstream.recv(65536):
                conn.sendall(data)

    @staticmethod
    def _only_loopback(host: str) -> None:
        if host != "127.0.0.1":
            raise ValueError(f"this proxy only forwards to 127.0.0.1, not {host!r}")


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes or nothing moves for IO_TIMEOUT."""
    peers = {a: b, b: a}
    while True:
        readable, _, _ = select.select([a, b], [], [], IO_TIMEOUT)
        if not readable:
            return
        for sock in readable:
            data = sock.recv(65536)
            if not data:
                return
            peers[sock].sendall(data)
