"""`adapterzoo push` publishes the adapter's own files and its README, nothing else from the folder,
and refuses a symlink that leads out of it (a secret was once published that way)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi

from adapterzoo.cli import cli
from adapterzoo.errors import AdapterFileError
from adapterzoo.hub import push_adapter_folder
from adapterzoo.testing.models import tiny_zoo

from .conftest import ALICE_TOKEN


@pytest.fixture(params=["native", "peft"])
def saved_adapter(request, tmp_path: Path) -> Path:
    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", "lora", r=2)
    return zoo.save_adapter("a", tmp_path / "adapter", format=request.param)


def test_push_sends_only_the_adapter_files_and_the_readme(
    registry, alice: HfApi, unique: str, saved_adapter: Path
) -> None:
    own = {path.name for path in saved_adapter.iterdir()}
    (saved_adapter / "notes.txt").write_text("private notes")
    (saved_adapter / ".env").write_text("HF_TOKEN=hf_secret")
    (saved_adapter / "checkpoints").mkdir()
    (saved_adapter / "checkpoints" / "step-10.safetensors").write_bytes(b"old")
    repo_id = f"alice/own-files-{unique}"
    push_adapter_folder(saved_adapter, repo_id, token=ALICE_TOKEN, endpoint=registry.url)
    assert set(alice.list_repo_files(repo_id)) == own | {"README.md"}


def test_push_refuses_a_symlink_that_leaves_the_folder(
    registry, alice: HfApi, unique: str, saved_adapter: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"credentials")
    weights = next(path for path in saved_adapter.iterdir() if path.suffix == ".safetensors")
    weights.unlink()
    os.symlink(secret, weights)
    repo_id = f"alice/symlink-{unique}"
    with pytest.raises(AdapterFileError, match="outside the adapter folder"):
        push_adapter_folder(saved_adapter, repo_id, token=ALICE_TOKEN, endpoint=registry.url)
    assert not alice.repo_exists(repo_id)
    result = CliRunner().invoke(
        cli, ["push", str(saved_adapter), repo_id, "--token", ALICE_TOKEN, "--endpoint", registry.url]
    )
    assert result.exit_code != 0 and "outside the adapter folder" in result.output


def test_a_symlink_inside_the_folder_is_fine(registry, alice: HfApi, unique: str, saved_adapter: Path) -> None:
    weights = next(path for path in saved_adapter.iterdir() if path.suffix == ".safetensors")
    (saved_adapter / "store").mkdir()
    moved = saved_adapter / "store" / weights.name
    weights.rename(moved)
    os.symlink(moved, weights)
    repo_id = f"alice/inner-link-{unique}"
    push_adapter_folder(saved_adapter, repo_id, token=ALICE_TOKEN, endpoint=registry.url)
    assert weights.name in alice.list_repo_files(repo_id)


def test_push_of_a_big_adapter_goes_through_lfs_with_xet_on_and_no_global_switch(
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf_xet is on (tests/hub conftest); push must reach LFS per call, never by flipping HF_HUB_DISABLE_XET,
    which is process-global: another thread's upload to huggingface.co would lose Xet meanwhile."""
    import huggingface_hub
    from huggingface_hub import _commit_api, constants

    seen_while_uploading = []
    real_is_xet_available = _commit_api.is_xet_available

    def spy() -> bool:  # huggingface_hub asks this right before choosing Xet or LFS for the "lfs" files
        seen_while_uploading.append(constants.HF_HUB_DISABLE_XET)
        return real_is_xet_available()

    monkeypatch.setattr(_commit_api, "is_xet_available", spy)
    server = start_server(extra_args=("--lfs-threshold-bytes", "4096"))
    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", "lora", r=8)
    folder = zoo.save_adapter("a", tmp_path / "big", format="native")
    weights = max(folder.iterdir(), key=lambda path: path.stat().st_size)
    assert weights.stat().st_size > 4096
    assert huggingface_hub.utils.is_package_available("hf_xet") and constants.HF_HUB_DISABLE_XET is False

    pushed = CliRunner().invoke(cli, ["push", str(folder), "alice/big-lora", "--token", ALICE_TOKEN,
                                      "--endpoint", server.url])  # fmt: skip
    assert pushed.exit_code == 0, pushed.output
    assert seen_while_uploading == [False]  # Xet stayed on, globally, while push uploaded
    assert constants.HF_HUB_DISABLE_XET is False
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    stored = server.root / "models" / "alice" / "big-lora"
    assert (stored / "lfs" / f"{sha256}.json").is_file()  # the server received it through LFS
    assert (stored / "blobs" / sha256).read_bytes() == weights.read_bytes()
    listed = {sibling.rfilename: sibling for sibling in server.api(ALICE_TOKEN).model_info("alice/big-lora").siblings}
    assert listed[weights.name].lfs is not None and listed[weights.name].size == weights.stat().st_size


def test_push_closes_the_files_it_opened(start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    opened = []
    real_open = builtins.open

    def recording_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if mode == "rb" and str(file).startswith(str(tmp_path / "adapter")):
            opened.append(handle)
        return handle

    server = start_server(extra_args=("--lfs-threshold-bytes", "4096"))
    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", "lora", r=8)
    folder = zoo.save_adapter("a", tmp_path / "adapter", format="native")
    with monkeypatch.context() as patched:
        patched.setattr(builtins, "open", recording_open)
        push_adapter_folder(folder, "alice/closed", token=ALICE_TOKEN, endpoint=server.url)
    assert opened and all(handle.closed for handle in opened)
