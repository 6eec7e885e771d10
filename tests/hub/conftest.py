"""The registry fixtures of tests/registry (a real `adapterzoo-registry serve` subprocess on
127.0.0.1, killed afterwards), plus a fresh Hugging Face cache per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.registry.conftest import (  # noqa: F401 - fixtures, re-exported for tests/hub
    ALICE_TOKEN,
    BOB_TOKEN,
    READER_TOKEN,
    _online_hub_client,
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
def _fresh_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Downloads go to this test's own cache; no endpoint or token leaks in from the environment."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hf-home"
