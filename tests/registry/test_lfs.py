"""Big files go through Git LFS with the official client: streamed, hashed on arrival, verified,
bounded, under a quota, with flat server memory; small sizes here (see benchmarks/ for 1 GB)."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitOperationCopy, hf_hub_download

from .conftest import ALICE_TOKEN

AUTH = {"authorization": f"Bearer {ALICE_TOKEN}"}
THRESHOLD = 64 * 1024


@pytest.fixture
def lfs_server(start_server):
    return start_server(
        extra_args=("--lfs-threshold-bytes", str(THRESHOLD), "--namespace-quota-bytes", str(200 * 1024 * 1024),
                    "--max-concurrent-uploads", "2")
    )  # fmt: skip


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def batch(server, repo_id: str, data: bytes) -> dict:
    reply = httpx.post(
        f"{server.url}/{repo_id}.git/info/lfs/objects/batch",
        headers={**AUTH, "content-type": "application/vnd.git-lfs+json"},
        json={
            "operation": "upload",
            "transfers": ["basic"],
            "objects": [{"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}],
        },
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["objects"][0]


def test_a_big_file_goes_through_lfs_and_downloads_intact(lfs_server, tmp_path: Path) -> None:
    api = lfs_server.api(ALICE_TOKEN)
    api.create_repo("alice/big")
    data = os.urandom(3 * THRESHOLD)
    info = api.upload_file(path_or_fileobj=data, path_in_repo="adapter_model.safetensors", repo_id="alice/big")
    stored = lfs_server.root / "models" / "alice" / "big" / "blobs" / hashlib.sha256(data).hexdigest()
    assert stored.read_bytes() == data
    path = hf_hub_download("alice/big", "adapter_model.safetensors", endpoint=lfs_server.url, token=ALICE_TOKEN,
                           cache_dir=tmp_path / "cache")  # fmt: skip
    assert Path(path).read_bytes() == data
    sibling = api.model_info("alice/big", files_metadata=True).siblings[0]
    assert sibling.size == len(data) and api.model_info("alice/big").sha == info.oid
    assert sibling.lfs.sha256 == hashlib.sha256(data).hexdigest()
    again = api.upload_file(path_or_fileobj=data, path_in_repo="copy.safetensors", repo_id="alice/big")
    assert set(api.list_repo_files("alice/big", revision=again.oid)) >= {"copy.safetensors"}  # stored once, named twice


def test_a_big_file_is_copied_by_reference(lfs_server) -> None:
    api = lfs_server.api(ALICE_TOKEN)
    api.create_repo("alice/copy")
    data = os.urandom(2 * THRESHOLD)
    api.upload_file(path_or_fileobj=data, path_in_repo="a.bin", repo_id="alice/copy")
    api.create_commit("alice/copy", [CommitOperationCopy("a.bin", "b.bin")], commit_message="copy")
    entries = {entry.path: entry for entry in api.list_repo_tree("alice/copy")}
    assert entries["b.bin"].lfs.sha256 == hashlib.sha256(data).hexdigest() and entries["b.bin"].size == len(data)


def test_a_folder_of_big_files_lands_as_one_commit(lfs_server, tmp_path: Path) -> None:
    api = lfs_server.api(ALICE_TOKEN)
    api.create_repo("alice/folder")
    folder = tmp_path / "folder"
    folder.mkdir()
    for index in range(6):
        (folder / f"shard-{index}.bin").write_bytes(os.urandom(2 * THRESHOLD))
    (folder / "config.json").write_text("{}")
    before = len(api.list_repo_commits("alice/folder"))
    api.upload_folder(folder_path=folder, repo_id="alice/folder")
    assert len(api.list_repo_commits("alice/folder")) == before + 1
    assert len(api.list_repo_files("alice/folder")) == 7


def test_server_memory_stays_flat_for_a_large_upload(lfs_server, tmp_path: Path) -> None:
    api = lfs_server.api(ALICE_TOKEN)
    api.create_repo("alice/flat")
    big = tmp_path / "big.bin"
    with open(big, "wb") as out:
        for _ in range(48):
            out.write(os.urandom(1024 * 1024))
    before = peak_rss_bytes(lfs_server.process.pid)
    api.upload_file(path_or_fileobj=str(big), path_in_repo="weights.bin", repo_id="alice/flat")
    growth = peak_rss_bytes(lfs_server.process.pid) - before
    assert growth < 24 * 1024 * 1024, f"server peak memory grew {growth / 2**20:.0f} MiB for a 48 MiB upload"


def test_an_upload_whose_bytes_do_not_match_the_oid_is_refused(lfs_server) -> None:
    api = lfs_server.api(ALICE_TOKEN)
    api.create_repo("alice/tamper")
    data = os.urandom(2 * THRESHOLD)
    href = batch(lfs_server, "alice/tamper", data)["actions"]["upload"]["href"]
    wrong = httpx.put(href, content=os.urandom(len(data)))
    assert wrong.status_code == 400 and "sha256" in wrong.json()["error"]
    forged = httpx.put(href.replace("signature=", "signature=0"), content=data)
    assert forged.status_code == 400 and "not handed out" in forged.json()["error"]
    assert httpx.put(href, content=data).status_code == 200
    assert list((lfs_server.root / "tmp").iterdir()) == []


def test_a_commit_cannot_name_an_object_never_uploaded(lfs_server) -> None:
    api = lfs_server.api(ALICE_TOKEN)
    api.create_repo("alice/phantom")
    lines = [
        {"key": "header", "value": {"summary": "s"}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "ab" * 32, "size": 10}},
    ]
    reply = httpx.post(
        f"{lfs_server.url}/api/models/alice/phantom/commit/main",
        headers={**AUTH, "content-type": "application/x-ndjson"},
        content=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
    )
    assert reply.status_code == 400 and "never uploaded" in reply.json()["error"]


def test_a_file_over_the_threshold_may_come_inline_within_the_body_limit(lfs_server) -> None:
    """Clients that did not declare LFS send big files inline (tests/registry/test_plain_clients.py);
    only the body limit bounds them, and a body over it gets 413 naming the way out."""
    api = lfs_server.api(ALICE_TOKEN)
    api.create_repo("alice/inline")
    data = os.urandom(2 * THRESHOLD)
    lines = [
        {"key": "header", "value": {"summary": "s"}},
        {"key": "file", "value": {"path": "w.bin", "content": base64.b64encode(data).decode()}},
    ]
    reply = httpx.post(
        f"{lfs_server.url}/api/models/alice/inline/commit/main",
        headers={**AUTH, "content-type": "application/x-ndjson"},
        content=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
    )
    assert reply.status_code == 200, reply.text
    assert (lfs_server.root / "models" / "alice" / "inline" / "blobs" / hashlib.sha256(data).hexdigest()).is_file()


def test_the_namespace_quota_is_enforced(start_server) -> None:
    server = start_server(
        extra_args=("--lfs-threshold-bytes", str(THRESHOLD), "--namespace-quota-bytes", str(5 * THRESHOLD))
    )
    api = server.api(ALICE_TOKEN)
    api.create_repo("alice/quota")
    api.upload_file(path_or_fileobj=os.urandom(3 * THRESHOLD), path_in_repo="a.bin", repo_id="alice/quota")
    with pytest.raises(Exception) as raised:
        api.upload_file(path_or_fileobj=os.urandom(3 * THRESHOLD), path_in_repo="b.bin", repo_id="alice/quota")
    assert "quota" in str(raised.value) or "quota" in str(raised.value.__cause__)
    assert api.list_repo_files("alice/quota") == ["a.bin"]


def test_uploads_past_the_bound_wait_their_turn_with_the_official_client(lfs_server, tmp_path: Path) -> None:
    api = lfs_server.api(ALICE_TOKEN)  # at most 2 received at once; the client sends 5 at a time
    api.create_repo("alice/queue")
    folder = tmp_path / "queue"
    folder.mkdir()
    for index in range(5):
        (folder / f"part-{index}.bin").write_bytes(os.urandom(4 * THRESHOLD))
    api.upload_folder(folder_path=folder, repo_id="alice/queue")
    assert len(api.list_repo_files("alice/queue")) == 5


def test_uploads_that_waited_too_long_are_told_to_retry(start_server) -> None:
    lfs_server = start_server(
        extra_args=(
            "--lfs-threshold-bytes", str(THRESHOLD), "--max-concurrent-uploads", "2", "--upload-queue-seconds", "0.1",
        )
    )  # fmt: skip
    api = lfs_server.api(ALICE_TOKEN)
    api.create_repo("alice/busy")
    blobs = [os.urandom(2 * THRESHOLD) for _ in range(4)]
    hrefs = [batch(lfs_server, "alice/busy", data)["actions"]["upload"]["href"] for data in blobs]

    def slow_body(data: bytes):
        for start in range(0, len(data), 16 * 1024):
            yield data[start : start + 16 * 1024]
            time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda pair: httpx.put(
                    pair[0], content=slow_body(pair[1]), headers={"content-length": str(len(pair[1]))}
                ),
                zip(hrefs, blobs),
            )
        )
    statuses = sorted(reply.status_code for reply in replies)
    assert statuses.count(200) >= 2 and 503 in statuses and set(statuses) <= {200, 503}
    assert any(reply.headers.get("retry-after") for reply in replies if reply.status_code == 503)


def test_xet_clients_are_told_how_to_switch_to_lfs(lfs_server) -> None:
    api = lfs_server.api(ALICE_TOKEN)
    api.create_repo("alice/xet")
    reply = httpx.get(f"{lfs_server.url}/api/models/alice/xet/xet-write-token/main", headers=AUTH)
    assert reply.status_code == 501 and "HF_HUB_DISABLE_XET=1" in reply.json()["error"]


def test_a_server_killed_mid_upload_keeps_nothing_of_it(start_server) -> None:
    server = start_server(extra_args=("--lfs-threshold-bytes", str(THRESHOLD)))
    api = server.api(ALICE_TOKEN)
    api.create_repo("alice/killed")
    data = os.urandom(64 * THRESHOLD)
    href = batch(server, "alice/killed", data)["actions"]["upload"]["href"]

    def slow_body():
        yield data[: len(data) // 2]
        time.sleep(30)  # the server dies while waiting for the rest
        yield data[len(data) // 2 :]

    uploader = threading.Thread(
        target=lambda: _ignore_errors(httpx.put, href, content=slow_body(), headers={"content-length": str(len(data))}),
        daemon=True,
    )
    uploader.start()
    deadline = time.monotonic() + 20
    while not any((server.root / "tmp").glob("*.lfs")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any((server.root / "tmp").glob("*.lfs")), "the upload never started"
    server.kill()
    restarted = start_server(server.root)
    assert list((restarted.root / "tmp").iterdir()) == []
    assert not (restarted.root / "models" / "alice" / "killed" / "blobs" / hashlib.sha256(data).hexdigest()).exists()
    fresh = batch(restarted, "alice/killed", data)
    assert "upload" in fresh["actions"]  # asked for again, whole


def _ignore_errors(call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except httpx.HTTPError:
        pass
