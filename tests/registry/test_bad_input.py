"""Bad input gets a 4xx JSON error and leaves the store exactly as it was.

The official client refuses to send most of these, so they go out as raw HTTP.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from huggingface_hub.errors import HfHubHTTPError

from .conftest import ALICE_TOKEN, SHARED_SERVER_MAX_UPLOAD, store_snapshot

AUTH = {"authorization": f"Bearer {ALICE_TOKEN}", "content-type": "application/x-ndjson"}


def ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def header(summary: str = "bad input") -> dict:
    return {"key": "header", "value": {"summary": summary, "description": ""}}


def add_file(path: str, content: bytes = b"payload") -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode(), "encoding": "base64"}}


@pytest.fixture
def target_repo(alice, unique) -> str:
    repo_id = f"alice/target-{unique}"
    alice.create_repo(repo_id)
    alice.upload_file(path_or_fileobj=b"original", path_in_repo="weights.bin", repo_id=repo_id)
    return repo_id


def assert_refused(reply: httpx.Response, status: int) -> None:
    assert reply.status_code == status, reply.text
    assert isinstance(reply.json()["error"], str) and reply.json()["error"]


UNSAFE_PATHS = ["../escape.txt", "a/../../escape.txt", "a/..", "dir\\escape.txt", "/etc/passwd", "C:/x.txt", "a//b"]


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_unsafe_paths_are_refused(registry, target_repo, path: str) -> None:
    before = store_snapshot(registry.root)
    commit = httpx.post(
        f"{registry.url}/api/models/{target_repo}/commit/main", headers=AUTH, content=ndjson(header(), add_file(path))
    )
    assert_refused(commit, 400)
    preupload = httpx.post(
        f"{registry.url}/api/models/{target_repo}/preupload/main",
        headers=AUTH,
        json={"files": [{"path": path, "size": 7, "sample": ""}]},
    )
    assert_refused(preupload, 400)
    delete = httpx.post(
        f"{registry.url}/api/models/{target_repo}/commit/main",
        headers=AUTH,
        content=ndjson(header(), {"key": "deletedFolder", "value": {"path": path}}),
    )
    assert_refused(delete, 400)
    assert store_snapshot(registry.root) == before


MALFORMED_BODIES = {
    "empty": b"",
    "not json": b"this is not json\n",
    "missing header": ndjson(add_file("a.txt")),
    "header without summary": ndjson({"key": "header", "value": {"description": "x"}}),
    "bad base64": ndjson(
        header(), {"key": "file", "value": {"path": "a.txt", "content": "***not base64***", "encoding": "base64"}}
    ),
    "good file then garbage": ndjson(header(), add_file("good.txt")) + b"{truncated\n",
    "unknown key": ndjson(header(), {"key": "symlink", "value": {"path": "a"}}),
    "lfs pointer": ndjson(header(), {"key": "lfsFile", "value": {"path": "a.bin", "algo": "sha256", "oid": "0" * 64}}),
    "value not an object": ndjson(header(), {"key": "file", "value": "a.txt"}),
    "file and folder clash": ndjson(header(), add_file("weights.bin/inner.txt")),
}


@pytest.mark.parametrize("body", MALFORMED_BODIES.values(), ids=MALFORMED_BODIES.keys())
def test_malformed_commit_bodies_are_refused(registry, target_repo, body: bytes) -> None:
    before = store_snapshot(registry.root)
    reply = httpx.post(f"{registry.url}/api/models/{target_repo}/commit/main", headers=AUTH, content=body)
    assert_refused(reply, 400)
    assert store_snapshot(registry.root) == before


BAD_NAMES = ["bad name", "..", "-leading", "trailing-", "double--dash", "a" * 97, "sp/ace"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_repo_ids_are_refused(registry, name: str) -> None:
    before = store_snapshot(registry.root)
    reply = httpx.post(f"{registry.url}/api/repos/create", headers=AUTH, json={"name": name, "organization": "alice"})
    assert_refused(reply, 400)
    assert store_snapshot(registry.root) == before


def test_bad_repo_id_in_url_is_refused(registry) -> None:
    for url in ("/api/models/alice/bad!name", "/api/models/al%20ice/x/tree/main", "/api/models/api/x"):
        assert_refused(httpx.get(registry.url + url, headers=AUTH), 400)
    commit = httpx.post(f"{registry.url}/api/models/alice/bad!name/commit/main", headers=AUTH, content=ndjson(header()))
    assert_refused(commit, 400)


def test_other_repo_types_get_a_clear_error(registry) -> None:
    reply = httpx.get(f"{registry.url}/api/datasets/alice/anything", headers=AUTH)
    assert reply.status_code == 404 and "model" in reply.json()["error"]
    create = httpx.post(
        f"{registry.url}/api/repos/create", headers=AUTH, json={"name": "x", "organization": "alice", "type": "dataset"}
    )
    assert create.status_code == 400 and "model" in create.json()["error"]


def test_oversized_upload_is_413_and_writes_nothing(registry, alice, target_repo) -> None:
    before = store_snapshot(registry.root)
    too_big = b"\0" * (SHARED_SERVER_MAX_UPLOAD + 1)

    with pytest.raises(HfHubHTTPError) as through_client:
        alice.upload_file(path_or_fileobj=too_big, path_in_repo="huge.bin", repo_id=target_repo)
    assert through_client.value.response.status_code == 413

    def chunked_body():  # no Content-Length: the limit must hold while streaming
        yield ndjson(header())[:-1] + b"\n"
        yield b'{"key": "file", "value": {"path": "huge.bin", "encoding": "base64", "content": "'
        for _ in range(SHARED_SERVER_MAX_UPLOAD // 65536 + 2):
            yield b"A" * 65536
        yield b'"}}\n'

    streamed = httpx.post(f"{registry.url}/api/models/{target_repo}/commit/main", headers=AUTH, content=chunked_body())
    assert_refused(streamed, 413)
    assert store_snapshot(registry.root) == before
    assert alice.list_repo_files(target_repo) == ["weights.bin"]


def test_failed_commits_leave_no_temporary_files(registry, target_repo) -> None:
    httpx.post(f"{registry.url}/api/models/{target_repo}/commit/main", headers=AUTH, content=b"garbage\n")
    assert list((registry.root / "tmp").iterdir()) == []
