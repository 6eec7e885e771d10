"""The registry as the official `huggingface_hub` client sees it: upload, download, revisions, search."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .conftest import ALICE_TOKEN, make_adapter_folder, readme_with_tags


def test_upload_folder_then_download_round_trip(registry, alice, unique, tmp_path: Path) -> None:
    repo_id = f"alice/lora-{unique}"
    alice.create_repo(repo_id)
    files = make_adapter_folder(tmp_path / "adapter", tags=["adapterzoo", "base-fingerprint:abc"])

    commit = alice.upload_folder(repo_id=repo_id, folder_path=tmp_path / "adapter")

    snapshot = Path(snapshot_download(repo_id, endpoint=registry.url, token=ALICE_TOKEN, cache_dir=tmp_path / "c1"))
    assert snapshot.name == commit.oid
    assert {path.name: path.read_bytes() for path in snapshot.iterdir()} == files
    weights = hf_hub_download(
        repo_id, "adapter_model.safetensors", endpoint=registry.url, token=ALICE_TOKEN, cache_dir=tmp_path / "c2"
    )
    assert Path(weights).read_bytes() == files["adapter_model.safetensors"]
    assert sorted(alice.list_repo_files(repo_id)) == sorted(files)


def test_model_info_reports_what_the_hub_would(alice, unique, tmp_path: Path) -> None:
    repo_id = f"alice/info-{unique}"
    alice.create_repo(repo_id)
    files = make_adapter_folder(tmp_path / "adapter", tags=["adapterzoo", "base-fingerprint:abc"])
    commit = alice.upload_folder(repo_id=repo_id, folder_path=tmp_path / "adapter")

    info = alice.model_info(repo_id)

    assert (info.id, info.author, info.sha, info.private) == (repo_id, "alice", commit.oid, False)
    assert info.tags == ["adapterzoo", "base-fingerprint:abc"]  # library_name adds nothing new here
    assert info.library_name == "adapterzoo"
    assert info.card_data is not None and info.card_data.library_name == "adapterzoo"
    assert info.last_modified is not None and info.created_at is not None
    assert {sibling.rfilename: sibling.size for sibling in info.siblings} == {
        name: len(content) for name, content in files.items()
    }


def test_create_repo_exist_ok_and_conflict(alice, unique) -> None:
    repo_id = f"alice/twice-{unique}"
    first = alice.create_repo(repo_id)
    again = alice.create_repo(repo_id, exist_ok=True)
    assert again.repo_id == first.repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as conflict:
        alice.create_repo(repo_id)
    assert conflict.value.response.status_code == 409


def test_every_commit_stays_downloadable_by_its_id(registry, alice, unique, tmp_path: Path) -> None:
    repo_id = f"alice/revisions-{unique}"
    alice.create_repo(repo_id)
    first = alice.upload_file(path_or_fileobj=b"version one", path_in_repo="weights.bin", repo_id=repo_id)
    second = alice.upload_file(path_or_fileobj=b"version two!", path_in_repo="weights.bin", repo_id=repo_id)

    def download(revision: str | None, cache: str) -> bytes:
        path = hf_hub_download(
            repo_id, "weights.bin", revision=revision, endpoint=registry.url, token=ALICE_TOKEN,
            cache_dir=tmp_path / cache,
        )  # fmt: skip
        return Path(path).read_bytes()

    assert download(first.oid, "a") == b"version one"
    assert download(None, "b") == b"version two!"
    assert download("main", "a") == b"version two!"  # same cache: the new etag is not confused with the old
    assert alice.model_info(repo_id, revision=first.oid).sha == first.oid
    commits = [item.commit_id for item in alice.list_repo_commits(repo_id)]
    assert commits[:2] == [second.oid, first.oid] and len(commits) == 3  # plus the initial commit
    refs = alice.list_repo_refs(repo_id)
    assert [(ref.name, ref.target_commit) for ref in refs.branches] == [("main", second.oid)]


def test_missing_revision_and_file_raise_the_client_errors(registry, alice, unique, tmp_path: Path) -> None:
    repo_id = f"alice/missing-{unique}"
    alice.create_repo(repo_id)
    alice.upload_file(path_or_fileobj=b"x", path_in_repo="present.txt", repo_id=repo_id)
    common = {"endpoint": registry.url, "token": ALICE_TOKEN, "cache_dir": tmp_path}
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "present.txt", revision="no-such-branch", **common)
    with pytest.raises(RevisionNotFoundError):
        alice.model_info(repo_id, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "absent.txt", **common)
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info(f"alice/never-created-{repo_id[-10:]}")


def test_parent_commit_must_be_the_head(alice, unique) -> None:
    repo_id = f"alice/parent-{unique}"
    alice.create_repo(repo_id)
    first = alice.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id=repo_id)
    second = alice.upload_file(path_or_fileobj=b"2", path_in_repo="a.txt", repo_id=repo_id)

    with pytest.raises(HfHubHTTPError) as stale:
        alice.create_commit(
            repo_id, [CommitOperationAdd("b.txt", b"late")], commit_message="stale", parent_commit=first.oid
        )
    assert stale.value.response.status_code == 412
    assert alice.model_info(repo_id).sha == second.oid

    third = alice.create_commit(
        repo_id, [CommitOperationAdd("b.txt", b"fresh")], commit_message="fresh", parent_commit=second.oid
    )
    assert alice.model_info(repo_id).sha == third.oid


def test_unchanged_files_make_no_new_commit(alice, unique, tmp_path: Path) -> None:
    """The preupload `oid` lets the client see nothing changed, exactly as against the Hub."""
    repo_id = f"alice/noop-{unique}"
    alice.create_repo(repo_id)
    make_adapter_folder(tmp_path / "adapter", tags=["adapterzoo"])
    first = alice.upload_folder(repo_id=repo_id, folder_path=tmp_path / "adapter")
    again = alice.upload_folder(repo_id=repo_id, folder_path=tmp_path / "adapter")
    assert again.oid == first.oid


def test_delete_file_and_folder(alice, unique) -> None:
    repo_id = f"alice/deletions-{unique}"
    alice.create_repo(repo_id)
    alice.create_commit(
        repo_id,
        [CommitOperationAdd(path, path.encode()) for path in ("keep.txt", "drop.txt", "old/a.txt", "old/b/c.txt")],
        commit_message="files",
    )
    alice.delete_file("drop.txt", repo_id)
    alice.delete_folder("old", repo_id)
    assert alice.list_repo_files(repo_id) == ["keep.txt"]
    with pytest.raises(EntryNotFoundError):
        alice.delete_file("drop.txt", repo_id)


def test_tree_listing_follows_pagination(alice, unique) -> None:
    """The shared server pages by 3 entries, so these listings span several pages."""
    repo_id = f"alice/tree-{unique}"
    alice.create_repo(repo_id)
    paths = [f"layer{i}/adapter.bin" for i in range(4)] + ["README.md", "config.json"]
    alice.create_commit(repo_id, [CommitOperationAdd(p, p.encode()) for p in paths], commit_message="many")

    assert sorted(alice.list_repo_files(repo_id)) == sorted(paths)
    top = {entry.path for entry in alice.list_repo_tree(repo_id)}
    assert top == {"README.md", "config.json", "layer0", "layer1", "layer2", "layer3"}
    assert [entry.path for entry in alice.list_repo_tree(repo_id, path_in_repo="layer2")] == ["layer2/adapter.bin"]


def test_branches(registry, alice, unique, tmp_path: Path) -> None:
    repo_id = f"alice/branches-{unique}"
    alice.create_repo(repo_id)
    alice.upload_file(path_or_fileobj=b"stable", path_in_repo="w.bin", repo_id=repo_id)
    alice.create_branch(repo_id, branch="dev")
    alice.upload_file(path_or_fileobj=b"experimental", path_in_repo="w.bin", repo_id=repo_id, revision="dev")

    def download(revision: str) -> bytes:
        return Path(
            hf_hub_download(
                repo_id, "w.bin", revision=revision, endpoint=registry.url, token=ALICE_TOKEN, cache_dir=tmp_path
            )
        ).read_bytes()

    assert download("main") == b"stable"
    assert download("dev") == b"experimental"
    assert {ref.name for ref in alice.list_repo_refs(repo_id).branches} == {"main", "dev"}


def test_list_models_by_search_and_tags(alice, bob, reader, anonymous, unique) -> None:
    fingerprint = f"base-fingerprint:{unique}"
    repos = {
        f"alice/match-{unique}": (["adapterzoo", fingerprint], False),
        f"alice/other-base-{unique}": (["adapterzoo", "base-fingerprint:zzz"], False),
        f"alice/secret-{unique}": (["adapterzoo", fingerprint], True),
        f"bob/match-{unique}": (["adapterzoo", fingerprint], False),
    }
    for repo_id, (tags, private) in repos.items():
        owner = alice if repo_id.startswith("alice/") else bob
        owner.create_repo(repo_id, private=private)
        owner.upload_file(path_or_fileobj=readme_with_tags(tags).encode(), path_in_repo="README.md", repo_id=repo_id)

    def ids(api, **query) -> set[str]:
        return {model.id for model in api.list_models(**query)}

    public_matches = {f"alice/match-{unique}", f"bob/match-{unique}"}
    assert ids(anonymous, filter=["adapterzoo", fingerprint]) == public_matches
    assert ids(bob, filter=["adapterzoo", fingerprint]) == public_matches
    assert ids(alice, filter=["adapterzoo", fingerprint]) == public_matches | {f"alice/secret-{unique}"}
    assert ids(reader, filter=fingerprint) == public_matches | {f"alice/secret-{unique}"}
    assert ids(anonymous, search=unique) == set(repos) - {f"alice/secret-{unique}"}
    assert ids(anonymous, search=f"other-base-{unique}") == {f"alice/other-base-{unique}"}
    assert ids(anonymous, author="bob", filter=fingerprint) == {f"bob/match-{unique}"}
    tagged = next(iter(anonymous.list_models(search=f"bob/match-{unique}")))
    assert set(tagged.tags) == {"adapterzoo", fingerprint}


def test_delete_repo(alice, unique) -> None:
    repo_id = f"alice/doomed-{unique}"
    alice.create_repo(repo_id)
    alice.upload_file(path_or_fileobj=b"bye", path_in_repo="a.txt", repo_id=repo_id)
    alice.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        alice.delete_repo(repo_id)
    alice.delete_repo(repo_id, missing_ok=True)
    alice.create_repo(repo_id)  # the name is free again, and the new repo starts empty
    assert alice.list_repo_files(repo_id) == []


def test_readme_with_broken_yaml_is_refused_before_upload(alice, unique) -> None:
    repo_id = f"alice/bad-card-{unique}"
    alice.create_repo(repo_id)
    with pytest.raises(ValueError, match="Invalid metadata"):
        alice.upload_file(path_or_fileobj=b"---\ntags: [unclosed\n---\n", path_in_repo="README.md", repo_id=repo_id)
    assert alice.list_repo_files(repo_id) == []


def test_concurrent_commits_lose_nothing(alice, unique) -> None:
    repo_id = f"alice/concurrent-{unique}"
    alice.create_repo(repo_id)
    errors: list[BaseException] = []

    def upload(index: int) -> None:
        try:
            alice.upload_file(path_or_fileobj=f"{index}".encode(), path_in_repo=f"f{index}.txt", repo_id=repo_id)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=upload, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(alice.list_repo_files(repo_id)) == [f"f{index}.txt" for index in range(6)]
    assert len(alice.list_repo_commits(repo_id)) == 7


def test_resolve_headers_and_range(registry, alice, unique) -> None:
    """What `hf_hub_download` relies on: X-Repo-Commit, a quoted ETag, Content-Length, and Range for resumes."""
    repo_id = f"alice/range-{unique}"
    alice.create_repo(repo_id)
    content = bytes(range(256)) * 40
    commit = alice.upload_file(path_or_fileobj=content, path_in_repo="dir/blob.bin", repo_id=repo_id)
    pinned = f"{registry.url}/{repo_id}/resolve/{commit.oid}/dir/blob.bin"

    head = httpx.head(f"{registry.url}/{repo_id}/resolve/main/dir/blob.bin", follow_redirects=True)
    assert head.status_code == 200 and str(head.url) == pinned
    assert head.headers["X-Repo-Commit"] == commit.oid
    assert head.headers["ETag"].startswith('"') and head.headers["ETag"].endswith('"')
    assert int(head.headers["Content-Length"]) == len(content)

    partial = httpx.get(pinned, headers={"Range": "bytes=1000-"})
    assert partial.status_code == 206
    assert partial.content == content[1000:]
    assert partial.headers["Content-Range"] == f"bytes 1000-{len(content) - 1}/{len(content)}"
