"""Round two of attacks on the hardened registry, each found against a real server and then fixed.

A hostile tenant and a hostile web page, with the official `huggingface_hub` client where it can
send the attack and raw HTTP where it cannot. Sizes are small; every test here failed before its fix.
"""

from __future__ import annotations

import base64
import json
import re
import socket

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, hf_hub_download

from .conftest import ALICE_TOKEN, BOB_TOKEN

ALICE = {"authorization": f"Bearer {ALICE_TOKEN}"}
BOB = {"authorization": f"Bearer {BOB_TOKEN}"}


def raw_get(server, target: str) -> bytes:
    """GET `target` exactly as written (no client-side normalisation); the whole raw reply."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < reply.index(b"\r\n\r\n") + 4 + _length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def _length(reply: bytes) -> int:
    match = re.search(rb"(?i)content-length: *(\d+)", reply)
    return int(match.group(1)) if match else 0


# --------------------------------------------------------------------------- error hygiene


@pytest.mark.parametrize("control", ["%00", "%01", "%1B", "%7F"])
def test_a_control_character_in_a_revision_gets_a_clean_404_not_a_dropped_connection(
    registry, alice, unique, control
) -> None:
    repo_id = f"alice/ctl-{unique}"
    alice.create_repo(repo_id)
    for target in (
        f"/api/models/{repo_id}/tree/main{control}",
        f"/{repo_id}/resolve/main{control}/README.md",
        f"/api/models/{repo_id}/revision/main{control}",
    ):
        reply = raw_get(registry, target)
        assert reply.startswith(b"HTTP/1.1 404"), (target, reply[:200])
        assert b"X-Error-Code: RevisionNotFound" in reply or b"x-error-code: RevisionNotFound" in reply


def test_a_tampered_listing_cursor_or_limit_is_a_400_not_a_500(registry) -> None:
    for query in ("cursor=" + "9" * 30, "cursor=\u00b2", "limit=\u00b2", "limit=" + "9" * 5000, "limit=-3"):
        reply = httpx.get(f"{registry.url}/api/models?{query}")
        assert reply.status_code == 400, (query, reply.status_code, reply.text[:200])
        assert "cursor" in reply.json()["error"] or "limit" in reply.json()["error"]
    # A cursor past the end is an empty page, as any client following `Link` could ask for.
    assert httpx.get(f"{registry.url}/api/models?cursor=999999999").json() == []


def test_a_tampered_page_number_on_the_web_page_shows_a_page_not_a_500(registry) -> None:
    for page in ("\u00b2", "9" * 30, "9" * 5000, "-1", "0x10"):
        reply = httpx.get(f"{registry.url}/", params={"page": page})
        assert reply.status_code == 200, (page, reply.status_code)
        assert "adapterzoo registry" in reply.text


# --------------------------------------------------------------------------- web-page-proof writes


def test_validate_yaml_refuses_a_text_plain_body_like_every_other_write(registry) -> None:
    reply = httpx.post(
        f"{registry.url}/api/validate-yaml",
        headers={**ALICE, "content-type": "text/plain"},
        content=json.dumps({"content": "---\nlicense: mit\n---\n"}),
    )
    assert reply.status_code == 415


# --------------------------------------------------------------------------- path tricks


@pytest.mark.parametrize("name", ["resolve", "tree", "commits"])
def test_a_repo_named_like_a_route_word_can_be_downloaded_and_listed(registry, alice, unique, tmp_path, name) -> None:
    # "alice/resolve" puts "/resolve/" twice in /alice/resolve/resolve/main/f.txt: the revision is the
    # part after the repo's own prefix, not after the first "/resolve/".
    repo_id = f"alice/{name}"
    alice.create_repo(repo_id, exist_ok=True)
    alice.upload_file(path_or_fileobj=f"hello {unique}".encode(), path_in_repo="f.txt", repo_id=repo_id)
    assert "f.txt" in alice.list_repo_files(repo_id)
    local = hf_hub_download(repo_id, "f.txt", endpoint=registry.url, token=ALICE_TOKEN, cache_dir=tmp_path)
    assert open(local, "rb").read() == f"hello {unique}".encode()
