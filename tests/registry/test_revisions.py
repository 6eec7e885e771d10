"""Tags, short commit ids and branch names with '/', through the official client; a pinned
commit id can never be redirected by a branch or tag."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

from .conftest import ALICE_TOKEN

AUTH = {"authorization": f"Bearer {ALICE_TOKEN}"}


@pytest.fixture
def two_versions(alice, unique) -> tuple[str, str, str]:
    repo_id = f"alice/revs-{unique}"
    alice.create_repo(repo_id)
    first = alice.upload_file(path_or_fileobj=b"version 1", path_in_repo="w.bin", repo_id=repo_id).oid
    second = alice.upload_file(path_or_fileobj=b"version 2", path_in_repo="w.bin", repo_id=repo_id).oid
    return repo_id, first, second


def download(registry, repo_id: str, revision: str, tmp_path: Path) -> bytes:
    path = hf_hub_download(
        repo_id, "w.bin", revision=revision, endpoint=registry.url, token=ALICE_TOKEN,
        cache_dir=tmp_path / f"cache-{abs(hash(revision))}",
    )  # fmt: skip
    return Path(path).read_bytes()


def test_tags_are_created_listed_resolved_and_deleted(registry, alice, two_versions, tmp_path: Path) -> None:
    repo_id, first, second = two_versions
    alice.create_tag(repo_id, tag="v1.0", revision=first, tag_message="first release")
    alice.create_tag(repo_id, tag="release/2", revision="main")
    refs = alice.list_repo_refs(repo_id)
    assert {(tag.name, tag.ref, tag.target_commit) for tag in refs.tags} == {
        ("v1.0", "refs/tags/v1.0", first),
        ("release/2", "refs/tags/release/2", second),
    }
    assert download(registry, repo_id, "v1.0", tmp_path) == b"version 1"
    assert download(registry, repo_id, "release/2", tmp_path) == b"version 2"
    assert alice.model_info(repo_id, revision="v1.0").sha == first
    with pytest.raises(HfHubHTTPError) as exists:
        alice.create_tag(repo_id, tag="v1.0", revision=second)
    assert exists.value.response.status_code == 409
    alice.delete_tag(repo_id, tag="v1.0")
    assert [tag.name for tag in alice.list_repo_refs(repo_id).tags] == ["release/2"]
    with pytest.raises(RevisionNotFoundError):
        alice.model_info(repo_id, revision="v1.0")


def test_short_commit_ids_resolve(registry, alice, two_versions, tmp_path: Path) -> None:
    repo_id, first, _ = two_versions
    assert alice.model_info(repo_id, revision=first[:7]).sha == first
    assert download(registry, repo_id, first[:10], tmp_path) == b"version 1"


def test_branch_names_may_hold_a_slash(registry, alice, two_versions, tmp_path: Path) -> None:
    repo_id, first, _ = two_versions
    alice.create_branch(repo_id, branch="feature/new-head", revision=first)
    alice.upload_file(
        path_or_fileobj=b"on the branch", path_in_repo="x/y.bin", repo_id=repo_id, revision="feature/new-head"
    )
    assert "feature/new-head" in {branch.name for branch in alice.list_repo_refs(repo_id).branches}
    assert set(alice.list_repo_files(repo_id, revision="feature/new-head")) == {"w.bin", "x/y.bin"}
    assert download(registry, repo_id, "feature/new-head", tmp_path) == b"version 1"
    with pytest.raises(HfHubHTTPError) as clash:  # 'feature' would be both a ref and a folder of refs
        alice.create_branch(repo_id, branch="feature")
    assert clash.value.response.status_code == 409
    alice.delete_branch(repo_id, branch="feature/new-head")
    alice.create_branch(repo_id, branch="feature")  # its folder went with its last branch
    assert {branch.name for branch in alice.list_repo_refs(repo_id).branches} == {"main", "feature"}


@pytest.mark.parametrize("name", ["deadbeef", "ABCDEF1234567", "a" * 40, "CON", "bad\nname", "x/../y", "ok.lock"])
def test_unsafe_or_hex_only_branch_and_tag_names_are_refused(alice, two_versions, name: str) -> None:
    repo_id, _, _ = two_versions
    with pytest.raises(HfHubHTTPError) as branch:
        alice.create_branch(repo_id, branch=name)
    assert branch.value.response.status_code in (400, 404)
    with pytest.raises(HfHubHTTPError) as tag:
        alice.create_tag(repo_id, tag=name)
    assert tag.value.response.status_code == 400


def test_a_pinned_commit_id_in_upper_case_is_never_redirected(registry, alice, two_versions, tmp_path: Path) -> None:
    """The attack: a branch named like a commit id in capitals used to win over the commit."""
    repo_id, first, second = two_versions
    reply = httpx.post(f"{registry.url}/api/models/{repo_id}/branch/{first.upper()}", headers=AUTH, json={})
    assert reply.status_code == 400 and "hex" in reply.json()["error"]
    assert alice.model_info(repo_id, revision=first.upper()).sha == first
    assert download(registry, repo_id, first.upper(), tmp_path) == b"version 1"
