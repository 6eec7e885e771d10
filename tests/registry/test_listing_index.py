"""Listing reads repos from the store's in-memory index: a page costs no disk read per repo, and
the index follows every write. The speed goal (10,000 repos, limit=10) is measured in
benchmarks/registry_listing.py, not here."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from adapterzoo_registry import create_app
from adapterzoo_registry.storage import RepoId, Store

from .conftest import ALICE_TOKEN, TOKENS

AUTH = {"authorization": f"Bearer {ALICE_TOKEN}"}


def commit_readme(store: Store, repo: RepoId, readme: str, tmp_path: Path) -> None:
    body = tmp_path / "body.ndjson"
    lines = [
        {"key": "header", "value": {"summary": "card"}},
        {"key": "file", "value": {"path": "README.md", "content": base64.b64encode(readme.encode()).decode()}},
    ]
    body.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    store.commit(repo, "main", body, author="alice")


@pytest.fixture
def client_and_store(tmp_path: Path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    app = create_app(tmp_path / "root", tokens_file=tokens, allowed_hosts=["testserver"], page_size=1000)
    return TestClient(app), app.state.registry.store


def test_a_listing_page_reads_no_repo_from_disk_once_the_index_is_built(
    client_and_store, tmp_path, monkeypatch
) -> None:
    client, store = client_and_store
    for index in range(60):
        repo = RepoId("alice", f"repo-{index:03d}")
        store.create_repo(repo, private=index % 5 == 0, author="alice")
        commit_readme(store, repo, f"---\ntags: [topic-{index % 3}]\n---\n", tmp_path)
    assert len(client.get("/api/models", params={"filter": "topic-1"}, headers=AUTH).json()) == 20  # index + cards
    reads = []
    for method in ("repo_meta", "_read_summary"):
        original = getattr(store, method)
        monkeypatch.setattr(
            store, method, lambda *args, _original=original, _name=method: reads.append(_name) or _original(*args)
        )
    page = client.get("/api/models", params={"limit": 10, "cursor": 20}, headers=AUTH)
    assert [model["id"] for model in page.json()] == [f"alice/repo-{index:03d}" for index in range(20, 30)]
    assert 'rel="next"' in page.headers["link"]
    assert len(client.get("/api/models", params={"filter": "topic-1", "limit": 5}).json()) == 5
    assert reads == []


def test_the_index_follows_creation_deletion_visibility_and_commits(client_and_store, tmp_path) -> None:
    client, store = client_and_store
    listed = lambda **params: [model["id"] for model in client.get("/api/models", params=params).json()]  # noqa: E731
    assert listed() == []
    store.create_repo(RepoId("alice", "a"), private=False, author="alice")
    store.create_repo(RepoId("alice", "b"), private=False, author="alice")
    assert listed() == ["alice/a", "alice/b"]
    store.set_private(RepoId("alice", "a"), True)
    assert listed() == ["alice/b"]
    commit_readme(store, RepoId("alice", "b"), "---\ntags: [fresh]\n---\n", tmp_path)
    assert listed(filter="fresh") == ["alice/b"]
    store.delete_repo(RepoId("alice", "b"))
    assert listed() == []


def test_at_most_the_configured_number_of_commit_bodies_are_decoded_at_once(tmp_path, monkeypatch) -> None:
    """Decoding happens before the repo lock and may hold an inline file in memory, so it is bounded."""
    import threading
    import time

    from adapterzoo_registry import storage

    store = Store(tmp_path / "root", max_concurrent_commits=2)
    repos = [RepoId("alice", f"r{index}") for index in range(6)]
    for repo in repos:
        store.create_repo(repo, private=False, author="alice")
    active, most = [0], [0]
    lock = threading.Lock()
    real_parse = storage.parse_commit_body

    def slow_parse(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(storage, "parse_commit_body", slow_parse)
    threads = [
        threading.Thread(target=commit_readme, args=(store, repo, "# hi", tmp_path / repo.name)) for repo in repos
    ]
    for repo in repos:
        (tmp_path / repo.name).mkdir()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 2
    assert all(store.resolve(repo, "main").files for repo in repos)
