"""A registry on localhost cannot be written from a web page, and downloads are never rendered.

Browsers send `text/plain` and form bodies cross-origin without a preflight, pages can carry
another site's `Origin`, and a DNS-rebinding page reaches 127.0.0.1 under its own host name:
these go out as raw HTTP, since the official client never sends them.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import ALICE_TOKEN, REGISTRY_SOURCE, store_snapshot

AUTH = {"authorization": f"Bearer {ALICE_TOKEN}"}


def commit_body(path: str = "weights.bin", content: bytes = b"planted") -> bytes:
    lines = [
        {"key": "header", "value": {"summary": "from a web page"}},
        {"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode()}},
    ]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


@pytest.fixture
def open_registry(start_server):
    return start_server(open_access=True)


def test_without_tokens_or_open_the_server_refuses_to_start(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "adapterzoo_registry.cli", "serve", "--root", str(tmp_path / "root")],
        capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(REGISTRY_SOURCE), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode != 0 and "--open" in result.stderr and "--tokens" in result.stderr


def test_a_text_plain_commit_is_refused_even_in_open_mode(open_registry, unique) -> None:
    repo_id = f"alice/open-{unique}"
    open_registry.api(False).create_repo(repo_id)
    before = store_snapshot(open_registry.root)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        reply = httpx.post(
            f"{open_registry.url}/api/models/{repo_id}/commit/main",
            headers={"content-type": content_type},
            content=commit_body(),
        )
        assert reply.status_code == 415 and "application/json" in reply.json()["error"]
    reply = httpx.post(
        f"{open_registry.url}/api/repos/create", headers={"content-type": "text/plain"},
        content=json.dumps({"name": f"planted-{unique}", "organization": "alice"}),
    )  # fmt: skip
    assert reply.status_code == 415
    assert store_snapshot(open_registry.root) == before


def test_cross_origin_writes_are_refused_with_or_without_a_token(registry, alice, unique) -> None:
    repo_id = f"alice/origin-{unique}"
    alice.create_repo(repo_id)
    before = store_snapshot(registry.root)
    url = f"{registry.url}/api/models/{repo_id}/commit/main"
    ndjson = {**AUTH, "content-type": "application/x-ndjson"}
    for extra in ({"origin": "https://evil.example"}, {"origin": "null"}, {"sec-fetch-site": "cross-site"}):
        reply = httpx.post(url, headers={**ndjson, **extra}, content=commit_body())
        assert reply.status_code == 403 and reply.headers["x-error-code"] == "CrossOriginWrite"
    assert store_snapshot(registry.root) == before
    same_origin = httpx.post(url, headers={**ndjson, "origin": registry.url}, content=commit_body())
    assert same_origin.status_code == 200


def test_a_rebinding_host_name_is_refused_and_allowed_hosts_are_served(registry, start_server) -> None:
    for path in ("/api/models", "/"):
        reply = httpx.get(f"{registry.url}{path}", headers={"host": f"attacker.example:{registry.port}"})
        assert reply.status_code == 421 and "--allowed-host" in reply.json()["error"]
    assert httpx.get(f"{registry.url}/api/models", headers={"host": f"localhost:{registry.port}"}).status_code == 200
    named = start_server(extra_args=("--allowed-host", "registry.internal", "--allowed-host", "127.0.0.1"))
    assert httpx.get(f"{named.url}/api/models", headers={"host": "registry.internal"}).status_code == 200
    assert httpx.get(f"{named.url}/api/models", headers={"host": "localhost"}).status_code == 421  # only those given


def test_downloads_are_attachments_that_browsers_do_not_sniff(registry, alice, unique) -> None:
    repo_id = f"alice/html-{unique}"
    alice.create_repo(repo_id)
    alice.upload_file(path_or_fileobj=b"<script>alert(1)</script>", path_in_repo="card.html", repo_id=repo_id)
    reply = httpx.get(f"{registry.url}/{repo_id}/resolve/main/card.html", follow_redirects=True)
    assert reply.status_code == 200 and reply.content == b"<script>alert(1)</script>"
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["content-disposition"].startswith("attachment")
    assert reply.headers["content-type"] == "application/octet-stream"
    assert "sandbox" in reply.headers["content-security-policy"]


def test_an_unauthenticated_upload_is_answered_401_before_its_body_is_read(registry, alice, unique) -> None:
    repo_id = f"alice/early-{unique}"
    alice.create_repo(repo_id)
    announced = 50 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", registry.port), timeout=10) as connection:
        connection.sendall(
            f"POST /api/models/{repo_id}/commit/main HTTP/1.1\r\nHost: 127.0.0.1:{registry.port}\r\n"
            f"Content-Type: application/x-ndjson\r\nContent-Length: {announced}\r\n\r\n".encode()
            + b"x" * 1024
        )  # fmt: skip
        started = time.monotonic()
        reply = connection.recv(65536).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 401"), reply
    assert "connection: close" in reply.lower()
    assert time.monotonic() - started < 5  # the other 50 MB were never waited for
