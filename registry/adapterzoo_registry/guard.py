"""Checks every request passes before any route sees it, and the last word on errors.

A registry on localhost is reachable from every web page its user opens, so:

- **Host allow-list.** The `Host` header must name this server (`--allowed-host`; by default
  the address it listens on and the loopback names). A DNS-rebinding page, whose own host name
  now points at 127.0.0.1, sends its own name and is refused (421).
- **No cross-origin writes.** A write (POST, PUT, PATCH, DELETE) carrying an `Origin` or
  `Sec-Fetch-Site` of another site is refused (403), with or without a token.
- **JSON or NDJSON only.** A write must be `application/json`, `application/x-ndjson` or
  `application/vnd.git-lfs+json` (415 otherwise). Browsers send `text/plain` and form bodies
  cross-origin without asking first (no CORS preflight); these types need one, which we never grant.
  Three routes are exempt because they are not writes a page could abuse: `paths-info` (a read the
  client sends as a form), the web page's token box (a read, still same-origin only) and the LFS
  object upload (a PUT, which browsers always preflight, authorized by a signed URL).
- Every response carries `X-Content-Type-Options: nosniff`.
- **Errors never reset the connection.** An exception a route did not turn into a reply becomes a
  JSON 500 here and is logged, not re-raised to uvicorn (which would close the socket under a
  client about to reuse it). A reply sent before the request body was read says
  `Connection: close`, so the client does not send its next request after leftover body bytes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("adapterzoo_registry")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WRITE_CONTENT_TYPES = frozenset({"application/json", "application/x-ndjson", "application/vnd.git-lfs+json"})
# Form POSTs that only read: the client's paths-info, and the web page's token box (same origin only).
# (`/api/...` is never a page: `/api/validate-yaml` has the shape of `/{namespace}/{name}` but takes JSON.)
_FORM_READS = re.compile(r"^/api/models/[^/]+/[^/]+/paths-info/|^/(?:(?!api/)[^/]+/[^/]+)?$")
_LFS_UPLOADS = re.compile(r"^/[^/]+/[^/]+\.git/info/lfs/objects/[0-9a-f]{64}$")


def host_name(host_header: str) -> str:
    """`example.org:8080` -> `example.org`, `[::1]:80` -> `::1`, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


class RequestGuard:
    """ASGI middleware applying the rules in the module docstring."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS) -> None:
        self.app = app
        hosts = None if allowed_hosts is None else {host_name(host) for host in allowed_hosts}
        self.allowed_hosts = None if hosts is None or "*" in hosts else frozenset(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, code, message = refusal
            await _send_json(send, status, message, code, close=_has_body(headers))
            return

        body_done = not _has_body(headers)
        response_started = False

        async def receive_tracked() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_done = True
            return message

        async def send_guarded(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                extra = [(b"x-content-type-options", b"nosniff")]
                if not body_done:
                    extra.append((b"connection", b"close"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive_tracked, send_guarded)
        except Exception:  # noqa: BLE001 - the one place unexpected errors end up
            logger.exception("Unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not response_started:
                await _send_json(send, 500, "Internal server error.", None, close=not body_done)

    def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, str, str] | None:
        host = host_name(headers.get("host", ""))
        if self.allowed_hosts is not None and host not in self.allowed_hosts:
            return (
                421, "HostNotAllowed",
                f"This registry does not answer to host {host!r}. If that is its real name, start it with"
                f" --allowed-host {host or 'NAME'}.",
            )  # fmt: skip
        method, path = scope["method"], scope["path"]
        if method not in WRITE_METHODS:
            return None
        fetch_site = headers.get("sec-fetch-site")
        origin = headers.get("origin")
        if fetch_site in ("cross-site", "same-site") or (origin is not None and not _same_origin(origin, headers)):
            return 403, "CrossOriginWrite", "Writes from another web site are refused."
        if (method == "POST" and _FORM_READS.match(path)) or (method == "PUT" and _LFS_UPLOADS.match(path)):
            return None
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type in WRITE_CONTENT_TYPES or (not content_type and not _has_body(headers)):
            return None
        return (
            415, "UnsupportedContentType",
            f"Writes must be sent as application/json or application/x-ndjson, not {content_type or 'untyped'}.",
        )  # fmt: skip


def _same_origin(origin: str, headers: Headers) -> bool:
    if origin == "null":
        return False
    parts = urlsplit(origin)
    return bool(parts.netloc) and parts.netloc.lower() == headers.get("host", "").strip().lower()


def _has_body(headers: Headers) -> bool:
    length = headers.get("content-length")
    return "transfer-encoding" in headers or (length is not None and length.strip() not in ("", "0"))


async def _send_json(send: Send, status: int, message: str, code: str | None, *, close: bool) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"x-error-message", "".join(c if " " <= c < "\x7f" else " " for c in message).encode("ascii", "replace")),
    ]
    if code:
        headers.append((b"x-error-code", code.encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
