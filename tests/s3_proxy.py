"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the test S3 server.

It passes requests through one connection each (it asks the server to close
after answering), except those that match an armed fault:

- ``slowdown``: answer ``503 SlowDown`` as a throttling S3 does;
- ``drop``: read half of the request body, then close the connection;
- ``drop_response``: forward the request whole, let the server act on it,
  then close without passing the answer on (the client cannot know it landed).

``seen`` records ``(method, target, action)`` for every request, and
``most_in_flight`` the most requests it was handling at once.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass

_SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
SLOWDOWN = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
    b"Content-Length: " + str(len(_SLOWDOWN_BODY)).encode() + b"\r\nConnection: close\r\n\r\n"
) + _SLOWDOWN_BODY
_LENGTH = re.compile(rb"^content-length:\s*(\d+)\s*$", re.IGNORECASE | re.MULTILINE)
_CONNECTION = re.compile(rb"^connection:[^\r\n]*\r\n", re.IGNORECASE | re.MULTILINE)


@dataclass
class Fault:
    action: str
    method: str
    target_contains: str
    remaining: int


class FaultProxy:
    """Listens on 127.0.0.1; forwards to ``upstream_port`` on 127.0.0.1."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.seen: list[tuple[str, str, str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inject(self, action: str, *, method: str = "PUT", target: str = "", count: int = 1) -> None:
        """The next ``count`` requests with ``method`` whose target contains ``target``."""
        with self._lock:
            self._faults.append(Fault(action, method, target, count))

    def actions(self, action: str) -> int:
        return sum(1 for *_, taken in self.seen if taken == action)

    def close(self) -> None:
        self._listener.close()

    def _choose(self, method: str, target: str) -> str:
        with self._lock:
            for fault in self._faults:
                if fault.remaining and fault.method == method and fault.target_contains in target:
                    fault.remaining -= 1
                    self.seen.append((method, target, fault.action))
                    return fault.action
            self.seen.append((method, target, "forward"))
            return "forward"

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with client:
            try:
                head, body_start = _read_head(client)
            except ConnectionError:
                return
            method, target = head.split(b" ", 2)[:2]
            match = _LENGTH.search(head)
            length = int(match.group(1)) if match else 0
            action = self._choose(method.decode(), target.decode())
            self._count_in_flight(+1)
            try:
                if action == "slowdown":
                    _read_exactly(client, body_start, length)
                    client.sendall(SLOWDOWN)
                elif action == "drop":
                    _read_exactly(client, body_start, length // 2)
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                else:
                    self._forward(client, head, body_start, length, action == "forward")
            except OSError:
                return
            finally:
                self._count_in_flight(-1)

    def _count_in_flight(self, change: int) -> None:
        with self._lock:
            self.in_flight += change
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def _forward(
        self, client: socket.socket, head: bytes, body_start: bytes, length: int, answer: bool
    ) -> None:
        head = _CONNECTION.sub(b"", head)[:-2] + b"Connection: close\r\n\r\n"
        with socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
            upstream.sendall(head)
            body = _read_exactly(client, body_start, length)
            upstream.sendall(body)
            while chunk := upstream.recv(1 << 16):
                if answer:
                    client.sendall(chunk)


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("closed before the request head")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head + b"\r\n\r\n", rest


def _read_exactly(sock: socket.socket, start: bytes, length: int) -> bytes:
    parts = [start[:length]]
    have = len(parts[0])
    while have < length:
        chunk = sock.recv(min(1 << 16, length - have))
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)
