"""Start-up behaviour: no torch, refusing a broken tokens file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import REGISTRY_SOURCE


def _python(code_or_args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REGISTRY_SOURCE), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *code_or_args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )


def test_importing_the_app_does_not_import_torch(tmp_path: Path) -> None:
    check = "import sys, adapterzoo_registry.app, adapterzoo_registry.cli; assert 'torch' not in sys.modules"
    result = _python(["-c", check], tmp_path)
    assert result.returncode == 0, result.stderr


def test_broken_tokens_file_stops_the_server_at_start(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"tokens": {"t": {"user": "alice", "namespaces": {"alice": "admin"}}}}')
    result = _python(
        ["-m", "adapterzoo_registry.cli", "serve", "--root", str(tmp_path / "root"), "--tokens", str(tokens)], tmp_path
    )
    assert result.returncode != 0
    assert "read" in result.stderr and "write" in result.stderr
