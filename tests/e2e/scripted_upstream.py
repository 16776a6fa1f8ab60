"""A scripted SSE upstream for the stream relay tests: a threaded HTTP/1.1 server on 127.0.0.1
(in the test process) that answers each request with the writes of the `Script` its body names
(`{"script": NAME}`), byte for byte, so a test knows exactly what the gateway was sent and when.

A gated script writes its next write only once the test `allow()`s it; while waiting, it notices
the gateway closing the connection (`outcome == "gateway_closed"`). Connections are kept alive
between requests unless the script says `close` (then its head says `connection: close` and the
connection ends after the last write). `close()` stops the server and joins its threads.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from .hostile_upstream import IO_TIMEOUT, Request, ThreadedServer, read_request

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def frame(payload: bytes, *, size: bytes | None = None, extension: bytes = b"") -> bytes:
    """One chunk of chunked encoding (`size`: its size line as written, lowercase hex if None)."""
    line = b"%x" % len(payload) if size is None else size
    return line + extension + b"\r\n" + payload + b"\r\n"


@dataclass(eq=False)
class Script:
    writes: list[bytes]  # the wire after the head, each write one sendall
    gated: bool = False  # each write waits for `allow()`
    close: bool = False  # `connection: close`, and the connection ends after the last write
    pause: float = 0.0  # between ungated writes, so that the gateway reads them apart
    outcome: str = "pending"  # then complete, gateway_closed or gate_timeout
    ended: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._gate, self._opener = socket.socketpair()

    def allow(self, count: int = 1) -> None:
        """Let the next `count` writes go."""
        self._opener.sendall(b"x" * count)

    def wait_allowed(self, conn: socket.socket) -> bool:
        """Wait for `allow()`; False (and `outcome` set) if the gateway closed `conn` first."""
        readable, _, _ = select.select([conn, self._gate], [], [], IO_TIMEOUT)
        if self._gate in readable:
            self._gate.recv(1)
            return True
        if conn in readable:
            # The gateway sends nothing while a response is under way: readable is its close.
            self.outcome = "gateway_closed" if not conn.recv(1) else "unexpected_bytes"
        else:
            self.outcome = "gate_timeout"
        return False

    def wait_ended(self, timeout: float) -> bool:
        return self.ended.wait(timeout)

    def release(self) -> None:
        self._gate.close()
        self._opener.close()


class ScriptedUpstream(ThreadedServer):
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        super().__init__(self._serve_requests)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, name: str, script: Script) -> Script:
        with self._lock:
            self.scripts[name] = script
        return script

    def close(self) -> None:
        super().close()
        for script in self.scripts.values():
            script.release()

    def _serve_requests(self, conn: socket.socket) -> None:
        while True:  # keep-alive: one request after another until the gateway closes
            request = read_request(conn)
            if request is None:
                return
            with self._lock:
                self.requests.append(request)
                script = self.scripts.get(json.loads(request.body).get("script", ""))
            if script is None:
                body = b'{"error": {"message": "no such script"}}'
                conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n" % len(body))
                conn.sendall(body)
                continue
            self._play(conn, script)
            if script.outcome != "complete" or script.close:
                return

    def _play(self, conn: socket.socket, script: Script) -> None:
        framing = b"transfer-encoding: chunked\r\n"
        if script.close:
            framing += b"connection: close\r\n"
        try:
            conn.sendall(HEAD + framing + b"\r\n")
            for index, write in enumerate(script.writes):
                if script.gated and not script.wait_allowed(conn):
                    return
                if script.pause and index:
                    time.sleep(script.pause)
                conn.sendall(write)
            script.outcome = "complete"
        except OSError:
            script.outcome = "gateway_closed"
        finally:
            script.ended.set()
