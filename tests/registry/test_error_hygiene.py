"""Every bad request gets a clear 4xx/5xx that names the problem; none is a bare 500 or a reset."""

from __future__ import annotations

import base64
import errno
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from huggingface_hub.errors import HfHubHTTPError
from starlette.routing import Route
from starlette.testclient import TestClient

from adapterzoo_registry import create_app, storage

from .conftest import ALICE_TOKEN, TOKENS, free_port, store_snapshot

AUTH = {"authorization": f"Bearer {ALICE_TOKEN}"}


def test_unimplemented_hub_routes_answer_501_with_an_error_code(registry, alice, unique) -> None:
    repo_id = f"alice/discuss-{unique}"
    alice.create_repo(repo_id)
    with pytest.raises(HfHubHTTPError) as raised:
        alice.get_repo_discussions(repo_id).__next__()
    assert raised.value.response.status_code == 501
    reply = httpx.get(f"{registry.url}/api/spaces-hardware")
    assert reply.status_code == 501 and reply.headers["x-error-code"] == "NotImplemented"
    xet = httpx.get(f"{registry.url}/api/models/{repo_id}/xet-write-token/main", headers=AUTH)
    assert xet.status_code == 501 and "HF_HUB_DISABLE_XET=1" in xet.json()["error"]


BAD_BODIES = [
    ("POST", "/api/repos/create", {"name": ["x"], "organization": "alice"}),
    ("POST", "/api/repos/create", {"name": "ok", "organization": {"a": 1}}),
    # `"private": "false"` (a string) used to make the repo private.
    ("POST", "/api/repos/create", {"name": "typed", "organization": "alice", "private": "false"}),
    ("POST", "/api/repos/create", {"name": "typed", "organization": "alice", "private": 1}),
    ("PUT", "/api/models/{repo}/settings", {"private": "true"}),
    ("POST", "/api/models/{repo}/branch/b1", {"startingPoint": 5}),
    ("POST", "/api/models/{repo}/tag/main", {"tag": ["v1"]}),
    ("POST", "/api/models/{repo}/preupload/main", {"files": [{"path": "a.bin", "size": "12"}]}),
    ("POST", "/api/models/{repo}/preupload/main", {"files": "a.bin"}),
    ("POST", "/api/validate-yaml", {"content": 5}),
    ("POST", "/{repo}.git/info/lfs/objects/batch", {"operation": "upload", "objects": [{"oid": 1, "size": 1}]}),
]


@pytest.mark.parametrize(("method", "path", "body"), BAD_BODIES)
def test_wrong_json_types_are_400_naming_the_field(registry, alice, unique, method, path, body) -> None:
    repo_id = f"alice/types-{unique}"
    alice.create_repo(repo_id)
    before = store_snapshot(registry.root)
    reply = httpx.request(method, registry.url + path.format(repo=repo_id), headers=AUTH, json=body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]
    assert store_snapshot(registry.root) == before


def test_deeply_nested_json_is_400(registry, alice, unique) -> None:
    repo_id = f"alice/nested-{unique}"
    alice.create_repo(repo_id)
    nested = "[" * 100_000 + "]" * 100_000
    headers = {**AUTH, "content-type": "application/json"}
    reply = httpx.post(f"{registry.url}/api/repos/create", headers=headers, content=nested)
    assert reply.status_code == 400
    line = '{"key": "header", "value": {"summary": ' + nested + "}}\n"
    commit = httpx.post(
        f"{registry.url}/api/models/{repo_id}/commit/main",
        headers={**AUTH, "content-type": "application/x-ndjson"}, content=line,
    )  # fmt: skip
    assert commit.status_code == 400


def test_list_models_honours_pipeline_tag_and_gated_and_refuses_unknown_filters(registry, alice, unique) -> None:
    tagged, plain = f"alice/pipe-{unique}", f"alice/plain-{unique}"
    for repo_id in (tagged, plain):
        alice.create_repo(repo_id)
    alice.upload_file(
        path_or_fileobj=b"---\npipeline_tag: text-generation\n---\n", path_in_repo="README.md", repo_id=tagged
    )
    assert [m.id for m in alice.list_models(search=unique, pipeline_tag="text-generation")] == [tagged]
    assert {m.id for m in alice.list_models(search=unique, gated=False)} == {tagged, plain}
    assert list(alice.list_models(search=unique, gated=True)) == []
    with pytest.raises(HfHubHTTPError) as raised:
        list(alice.list_models(search=unique, inference="warm"))
    assert raised.value.response.status_code == 400 and "'inference'" in str(raised.value)


@pytest.mark.parametrize(
    "path", ["new\nline.bin", "tab\there.bin", "evil\u202egnp.exe", "CON", "dir/aux.txt", "lpt1.bin", "x\u2066y"]
)
def test_file_names_with_control_bidi_or_device_names_are_refused(registry, alice, unique, path: str) -> None:
    repo_id = f"alice/names-{unique}"
    alice.create_repo(repo_id)
    before = store_snapshot(registry.root)
    line = {"key": "file", "value": {"path": path, "content": base64.b64encode(b"x").decode()}}
    body = json.dumps({"key": "header", "value": {"summary": "s"}}) + "\n" + json.dumps(line) + "\n"
    reply = httpx.post(
        f"{registry.url}/api/models/{repo_id}/commit/main",
        headers={**AUTH, "content-type": "application/x-ndjson"}, content=body,
    )  # fmt: skip
    assert reply.status_code == 400
    assert "not allowed" in reply.json()["error"] or "reserved" in reply.json()["error"]
    assert store_snapshot(registry.root) == before


@pytest.mark.parametrize("name", ["CON", "nul", "com1", "aux.model"])
def test_repo_names_that_are_device_names_are_refused(alice, name: str) -> None:
    with pytest.raises(HfHubHTTPError) as raised:
        alice.create_repo(f"alice/{name}")
    assert raised.value.response.status_code == 400 and "reserved" in str(raised.value)


# --------------------------------------------------------------------------- in-process apps


@pytest.fixture
def tokens_path(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    return path


def test_a_full_disk_is_507_and_leaves_nothing_in_tmp(tmp_path, tokens_path, monkeypatch) -> None:
    app = create_app(tmp_path / "root", tokens_file=tokens_path, allowed_hosts=["testserver"])
    client = TestClient(app, base_url="http://testserver")
    assert (
        client.post("/api/repos/create", headers=AUTH, json={"name": "full", "organization": "alice"}).status_code
        == 200
    )
    real_decode = storage._decode_base64_to_file

    def disk_full(content, target):  # the staged upload: the disk fills while the commit is decoded
        target.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "_decode_base64_to_file", disk_full)
    body = (
        json.dumps({"key": "header", "value": {"summary": "s"}}) + "\n"
        + json.dumps({"key": "file", "value": {"path": "w.bin", "content": base64.b64encode(b"w" * 1000).decode()}})
        + "\n"
    )  # fmt: skip
    reply = client.post(
        "/api/models/alice/full/commit/main", headers={**AUTH, "content-type": "application/x-ndjson"}, content=body
    )
    assert reply.status_code == 507 and reply.headers["x-error-code"] == "InsufficientStorage"
    assert "disk is full" in reply.json()["error"] and str(tmp_path) not in reply.text
    assert list((tmp_path / "root" / "tmp").iterdir()) == []
    monkeypatch.setattr(storage, "_decode_base64_to_file", real_decode)
    assert client.get("/api/models/alice/full").json()["siblings"] == []


def test_after_a_500_the_next_request_on_the_same_connection_is_answered(tmp_path, tokens_path) -> None:
    app = create_app(tmp_path / "root", tokens_file=tokens_path)

    def broken(request):
        raise RuntimeError("a bug")

    app.router.routes.insert(0, Route("/api/broken", broken))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", timeout_graceful_shutdown=1)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        # One raw socket, so the test sees whether the server closed it (a client pool would
        # quietly reconnect, or, when it had already sent the next request, see a reset).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            reader = connection.makefile("rb")
            for path, status in [
                ("/api/broken", 500),
                ("/api/models", 200),
                ("/api/broken", 500),
                ("/api/models", 200),
            ]:
                connection.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                status_line = reader.readline()
                assert status_line.startswith(f"HTTP/1.1 {status}".encode()), status_line
                headers = {}
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                assert headers.get("connection") != "close"
                body = reader.read(int(headers["content-length"]))
                if status == 500:
                    assert json.loads(body) == {"error": "Internal server error."}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
