"""A server killed with SIGKILL, or a download cut halfway, never leaves a broken registry or cache."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from huggingface_hub import hf_hub_download
from huggingface_hub.utils import tqdm as hub_tqdm

from adapterzoo_registry import storage
from adapterzoo_registry.storage import RepoId, Store

from .conftest import ALICE_TOKEN

BIG_FILE_BYTES = 50 * 1024 * 1024


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def _upload_receiving(root: Path) -> bool:
    """The commit body is streaming into tmp/ and is well under way."""
    return any(path.suffix == ".ndjson" and path.stat().st_size > 20 * 1024 * 1024 for path in _tmp_files(root))


def _blob_being_staged(root: Path) -> bool:
    """The body is fully received and decoded file contents are being written to a staging folder."""
    return any(path.suffix == ".blob" for path in _tmp_files(root))


def _tmp_files(root: Path) -> list[Path]:
    try:
        return [path for path in (root / "tmp").rglob("*") if path.is_file()]
    except FileNotFoundError:  # a file vanished while walking
        return []


@pytest.mark.parametrize("kill_when", [_upload_receiving, _blob_being_staged], ids=["receiving", "staging"])
def test_sigkill_mid_commit_keeps_the_previous_revision(start_server, tmp_path: Path, kill_when) -> None:
    # The file goes inline in the commit body (no LFS), which is the path this test kills.
    server = start_server(extra_args=("--lfs-threshold-bytes", str(2 * BIG_FILE_BYTES)))
    api = server.api(ALICE_TOKEN)
    repo_id = "alice/crash"
    api.create_repo(repo_id)
    previous = api.upload_file(path_or_fileobj=b"previous weights", path_in_repo="weights.bin", repo_id=repo_id)

    outcome: dict[str, object] = {}

    def upload_big_file() -> None:
        try:
            outcome["commit"] = api.upload_file(
                path_or_fileobj=os.urandom(BIG_FILE_BYTES), path_in_repo="weights.bin", repo_id=repo_id
            )
        except Exception as error:  # the connection dies with the server
            outcome["error"] = error

    uploader = threading.Thread(target=upload_big_file, daemon=True)
    uploader.start()
    _wait_for(lambda: kill_when(server.root), timeout=30, what="the commit to be in progress")
    server.kill()
    uploader.join(timeout=30)
    assert "error" in outcome, "the upload finished before the kill: the test did not hit a commit in progress"

    restarted = start_server(server.root)  # a new port: no client retry can sneak in
    api = restarted.api(ALICE_TOKEN)
    assert list((restarted.root / "tmp").iterdir()) == []
    assert api.model_info(repo_id).sha == previous.oid
    assert api.list_repo_files(repo_id) == ["weights.bin"]
    for revision in ("main", previous.oid):
        path = hf_hub_download(
            repo_id, "weights.bin", revision=revision, endpoint=restarted.url, token=ALICE_TOKEN,
            cache_dir=tmp_path / f"cache-{revision}",
        )  # fmt: skip
        assert Path(path).read_bytes() == b"previous weights"
    after = api.upload_file(path_or_fileobj=b"next weights", path_in_repo="weights.bin", repo_id=repo_id)
    assert api.model_info(repo_id).sha == after.oid


class _Crash(BaseException):
    """Stands for the process dying: nothing after it runs."""


@pytest.mark.parametrize("crash_before_replace", [0, 1, 2], ids=["blob", "commit-record", "branch-ref"])
def test_crash_at_each_publication_step_keeps_the_previous_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_before_replace: int
) -> None:
    """Dies before the n-th atomic rename of a commit (blob, commit record, ref): the old head stays whole.

    The subprocess test above cannot aim at these few microseconds, so this one stops the store itself.
    """
    repo = RepoId("alice", "steps")
    store = Store(tmp_path / "root")
    store.create_repo(repo, private=False, author="alice")
    body = tmp_path / "body.ndjson"
    body.write_bytes(
        b'{"key": "header", "value": {"summary": "s"}}\n'
        b'{"key": "file", "value": {"path": "w.bin", "content": "b2xk", "encoding": "base64"}}\n'
    )
    previous = store.commit(repo, "main", body, author="alice")
    body.write_bytes(body.read_bytes().replace(b"b2xk", b"bmV3"))  # "old" -> "new"

    real_replace, calls = os.replace, []

    def dying_replace(source, target):
        calls.append(target)
        if len(calls) > crash_before_replace:
            raise _Crash()
        real_replace(source, target)

    monkeypatch.setattr(storage.os, "replace", dying_replace)
    with pytest.raises(_Crash):
        store.commit(repo, "main", body, author="alice")
    monkeypatch.setattr(storage.os, "replace", real_replace)

    reopened = Store(tmp_path / "root")
    head = reopened.resolve(repo, "main")
    assert head.id == previous.id
    assert reopened.blob_path(repo, head.files["w.bin"]).read_bytes() == b"old"
    assert list((tmp_path / "root" / "tmp").iterdir()) == []
    assert reopened.commit(repo, "main", body, author="alice").parent == previous.id


@pytest.fixture
def big_file_repo(start_server) -> tuple:
    """A server holding alice/big with a 30 MB file; returns (server, repo_id, content)."""
    server = start_server()
    api = server.api(ALICE_TOKEN)
    repo_id = "alice/big"
    api.create_repo(repo_id)
    content = hashlib.shake_256(b"big adapter").digest(30 * 1024 * 1024)
    api.upload_file(path_or_fileobj=content, path_in_repo="adapter_model.safetensors", repo_id=repo_id)
    return server, repo_id, content


def _cached_files(cache: Path) -> list[Path]:
    return [path for path in cache.rglob("*") if path.is_file() and ".locks" not in path.parts]


def test_reader_hanging_up_halfway_breaks_nothing(big_file_repo, tmp_path: Path) -> None:
    server, repo_id, content = big_file_repo
    url = f"{server.url}/{repo_id}/resolve/main/adapter_model.safetensors"
    with httpx.stream("GET", url, follow_redirects=True, headers={"authorization": f"Bearer {ALICE_TOKEN}"}) as reply:
        received = 0
        for chunk in reply.iter_bytes():
            received += len(chunk)
            if received > len(content) // 2:
                break  # hang up with half the file read

    path = hf_hub_download(
        repo_id, "adapter_model.safetensors", endpoint=server.url, token=ALICE_TOKEN, cache_dir=tmp_path / "cache"
    )
    assert Path(path).read_bytes() == content


def test_server_killed_during_download_then_download_completes(start_server, big_file_repo, tmp_path: Path) -> None:
    """Kill the server while `hf_hub_download` streams, restart it on the same port.

    The client either resumes with a Range request or fails; in both cases the
    next download returns the full, correct file and nothing partial stays cached.
    """
    server, repo_id, content = big_file_repo
    first_chunk_read, server_back = threading.Event(), threading.Event()

    class PauseAfterFirstChunk(hub_tqdm):
        def update(self, n=1):
            result = super().update(n)
            if not first_chunk_read.is_set():
                first_chunk_read.set()
                server_back.wait(timeout=30)
            return result

    cache = tmp_path / "cache"
    outcome: dict[str, object] = {}

    def download() -> None:
        try:
            outcome["path"] = hf_hub_download(
                repo_id, "adapter_model.safetensors", endpoint=server.url, token=ALICE_TOKEN, cache_dir=cache,
                tqdm_class=PauseAfterFirstChunk,
            )  # fmt: skip
        except Exception as error:
            outcome["error"] = error

    downloader = threading.Thread(target=download, daemon=True)
    downloader.start()
    assert first_chunk_read.wait(timeout=30)
    server.kill()
    start_server(server.root, port=server.port)
    server_back.set()
    downloader.join(timeout=60)
    assert not downloader.is_alive()

    if "path" in outcome:  # resumed through Range against the restarted server
        assert Path(outcome["path"]).read_bytes() == content
    path = hf_hub_download(
        repo_id, "adapter_model.safetensors", endpoint=server.url, token=ALICE_TOKEN, cache_dir=cache
    )
    assert Path(path).read_bytes() == content
    assert not [p for p in _cached_files(cache) if p.name.endswith(".incomplete")]
