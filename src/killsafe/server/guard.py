"""The request guard in front of the API: token, Host, Origin, JSON content type, body size.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``) so that the
server-sent event stream passes through untouched.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 16 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS = ("/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
TOKEN_HEADER = b"x-killsafe-token"


class RequestGuard:
    """Refuse requests without the token (401), state-changing requests sent by
    a page of another origin (``Origin`` other than this server: 403) or whose
    content type is not JSON (415), and bodies over ``max_body`` bytes (413).
    Requests without ``Origin`` (curl, scripts, the command line) pass.
    Without a token (a loopback server), refuse requests whose ``Host`` is not
    a loopback name (403): a web page whose domain is re-pointed at 127.0.0.1
    (DNS rebinding) must not reach the API as if it were the dashboard.

    The page itself (``/`` and ``/static/``) is public: it holds no data and
    asks for the token, which it then sends on every API request.
    """

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int = MAX_BODY_BYTES):
        self.app = app
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        path = scope.get("path", "")
        if self.token is None and not _loopback_host(headers.get(b"host", b"")):
            await _refuse(
                send,
                403,
                "this server answers requests addressed to 127.0.0.1 or localhost only; "
                "open it by that address (or serve with a token)",
            )
            return
        if self.token is not None and not _is_public(path) and not self._authorized(headers):
            await _refuse(
                send,
                401,
                "missing or wrong token; send it as 'Authorization: Bearer "
                "TOKEN' or 'X-Killsafe-Token: TOKEN' (printed when the server started)",
            )
            return
        if scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        origin = headers.get(b"origin")
        if origin is not None and not _same_origin(origin, headers.get(b"host", b"")):
            await _refuse(
                send,
                403,
                f"cross-origin request refused: a page of {origin.decode('latin-1')!r} may not "
                "change this run; use the dashboard at this server's own address",
            )
            return
        if _media_type(headers) != "application/json":
            await _refuse(
                send,
                415,
                "state-changing requests need 'Content-Type: "
                "application/json'; send a JSON body such as {}",
            )
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            await _refuse(
                send, 413, f"request body over {self.max_body} bytes; send a small JSON object"
            )
            return
        body = await _read_body(receive, self.max_body)
        if body is None:
            await _refuse(
                send, 413, f"request body over {self.max_body} bytes; send a small JSON object"
            )
            return
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self.token is not None
        given = headers.get(TOKEN_HEADER)
        if given is None:
            scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer":
                return False
            given = value.strip()
        return secrets.compare_digest(given, self.token.encode())


def _loopback_host(raw: bytes) -> bool:
    """Whether a ``Host`` header names this machine: localhost, 127.0.0.0/8 or ::1."""
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):  # [::1]:8765
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _same_origin(origin: bytes, host: bytes) -> bool:
    """Whether ``Origin`` (``http://127.0.0.1:8765``) names the server the request reached."""
    try:
        parts = urlsplit(origin.decode("latin-1").strip())
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return parts.netloc.lower() == host.decode("latin-1").strip().lower()


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers", [])}


def _media_type(headers: dict[bytes, bytes]) -> str:
    raw = headers.get(b"content-type", b"").decode("latin-1")
    return raw.split(";", 1)[0].strip().lower()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or ``None`` once it grows past ``limit`` (chunked uploads too)."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send: Send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
