"""The registry fixtures of tests/registry (a real `adapterzoo-registry serve` subprocess on
127.0.0.1, killed afterwards), plus a fresh Hugging Face cache per test.

Unlike tests/registry, Xet stays on here, as for a user who installed huggingface_hub: adapterzoo
push and pull must work without anyone setting HF_HUB_DISABLE_XET."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest

from tests.registry.conftest import (  # noqa: F401 - fixtures, re-exported for tests/hub
    ALICE_TOKEN,
    BOB_TOKEN,
    READER_TOKEN,
    alice,
    anonymous,
    bob,
    reader,
    registry,
    start_server,
    tokens_file,
    unique,
)


@pytest.fixture(autouse=True)
def _online_hub_client_with_xet_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client talks to our server, quietly, with hf_xet enabled (as installed by default)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    huggingface_hub.utils.disable_progress_bars()


@pytest.fixture(autouse=True)
def _fresh_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Downloads go to this test's own cache; no endpoint or token leaks in from the environment."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hf-home"
