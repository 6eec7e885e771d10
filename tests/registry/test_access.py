"""Tokens, namespaces and private repos, seen through the official client."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

from .conftest import ALICE_TOKEN, BOB_TOKEN, READER_TOKEN


@pytest.fixture
def alice_repos(alice, unique) -> dict[str, str]:
    """One public and one private repo of alice's, each holding weights.bin."""
    repos = {"public": f"alice/public-{unique}", "private": f"alice/private-{unique}"}
    for visibility, repo_id in repos.items():
        alice.create_repo(repo_id, private=visibility == "private")
        alice.upload_file(path_or_fileobj=b"alice's weights", path_in_repo="weights.bin", repo_id=repo_id)
    return repos


def _status(error: pytest.ExceptionInfo) -> int:
    return error.value.response.status_code


def test_private_repo_is_invisible_to_other_tenants_and_anonymous(registry, alice_repos, tmp_path: Path) -> None:
    private = alice_repos["private"]
    for index, token in enumerate([BOB_TOKEN, False]):
        api = registry.api(token)
        with pytest.raises(RepositoryNotFoundError):
            api.model_info(private)
        with pytest.raises(RepositoryNotFoundError):
            api.list_repo_files(private)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(private, "weights.bin", endpoint=registry.url, token=token, cache_dir=tmp_path / f"{index}")
        with pytest.raises(RepositoryNotFoundError):
            snapshot_download(private, endpoint=registry.url, token=token, cache_dir=tmp_path / f"s{index}")
        assert private not in {model.id for model in api.list_models(search=private)}


def test_read_token_and_owner_can_read_private_repo(registry, alice_repos, tmp_path: Path) -> None:
    private = alice_repos["private"]
    for token in (ALICE_TOKEN, READER_TOKEN):
        assert registry.api(token).model_info(private).private is True
        path = hf_hub_download(private, "weights.bin", endpoint=registry.url, token=token, cache_dir=tmp_path / token)
        assert Path(path).read_bytes() == b"alice's weights"


def test_public_repo_is_readable_without_token(registry, anonymous, alice_repos, tmp_path: Path) -> None:
    public = alice_repos["public"]
    assert anonymous.list_repo_files(public) == ["weights.bin"]
    path = hf_hub_download(public, "weights.bin", endpoint=registry.url, token=False, cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"alice's weights"


def test_bob_cannot_write_into_alices_namespace(bob, alice, alice_repos, unique) -> None:
    with pytest.raises(HfHubHTTPError) as create:
        bob.create_repo(f"alice/by-bob-{unique}")
    assert _status(create) == 403
    with pytest.raises(HfHubHTTPError) as upload:
        bob.upload_file(path_or_fileobj=b"bob was here", path_in_repo="weights.bin", repo_id=alice_repos["public"])
    assert _status(upload) == 403
    with pytest.raises(HfHubHTTPError) as delete:
        bob.delete_repo(alice_repos["public"])
    assert _status(delete) == 403

    # Her private repo does not even exist for bob, whatever he tries.
    with pytest.raises(RepositoryNotFoundError):
        bob.upload_file(path_or_fileobj=b"bob was here", path_in_repo="weights.bin", repo_id=alice_repos["private"])
    with pytest.raises(HfHubHTTPError) as recreate:
        bob.create_repo(alice_repos["private"], exist_ok=True)
    assert _status(recreate) == 403

    for repo_id in alice_repos.values():
        assert alice.list_repo_files(repo_id) == ["weights.bin"]
        assert len(alice.list_repo_commits(repo_id)) == 2


def test_write_without_or_with_unknown_token_is_401(registry, alice_repos, unique) -> None:
    for token in (False, "hf_not_a_real_token"):
        api = registry.api(token)
        with pytest.raises(HfHubHTTPError) as create:
            api.create_repo(f"alice/anon-{unique}")
        assert _status(create) == 401
        with pytest.raises(HfHubHTTPError) as upload:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=alice_repos["public"])
        assert _status(upload) == 401
    # An unknown token is refused on reads too, with the Hub's own message.
    reply = httpx.get(f"{registry.url}/api/models/{alice_repos['public']}", headers={"authorization": "Bearer nope"})
    assert reply.status_code == 401
    assert reply.headers["X-Error-Message"] == "Invalid credentials in Authorization header"


def test_read_only_token_cannot_write(reader, alice, alice_repos, unique) -> None:
    with pytest.raises(HfHubHTTPError) as create:
        reader.create_repo(f"alice/by-reader-{unique}")
    assert _status(create) == 403
    for repo_id in alice_repos.values():
        with pytest.raises(HfHubHTTPError) as upload:
            reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
        assert _status(upload) == 403
        assert alice.list_repo_files(repo_id) == ["weights.bin"]


def test_whoami(alice, reader) -> None:
    assert alice.whoami()["name"] == "alice"
    assert reader.whoami()["name"] == "carol"


def test_visibility_can_be_changed_by_the_owner(registry, alice, bob, alice_repos) -> None:
    public = alice_repos["public"]
    alice.update_repo_settings(public, private=True)
    with pytest.raises(RepositoryNotFoundError):
        bob.model_info(public)
    alice.update_repo_settings(public, private=False)
    assert bob.model_info(public).private is False


def test_without_tokens_file_the_registry_is_open(start_server, unique) -> None:
    server = start_server(open_access=True)
    anyone = server.api(False)
    anyone.create_repo(f"someone/open-{unique}")
    anyone.upload_file(path_or_fileobj=b"hello", path_in_repo="a.txt", repo_id=f"someone/open-{unique}")
    assert anyone.list_repo_files(f"someone/open-{unique}") == ["a.txt"]
    assert "OPEN" in server.log()
