"""`pip install ./registry` in a bare venv (no torch, no adapterzoo) gives a registry that serves.

The registry is its own distribution (registry/pyproject.toml) so that a registry host needs none
of the ML stack. This builds a fresh venv without system site-packages, installs the folder with
pip (from the package index, through pip's cache), and runs the `adapterzoo-registry` script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import REGISTRY_SOURCE, RegistryServer, free_port

pytestmark = pytest.mark.slow


def test_pip_install_registry_in_a_bare_venv_serves_without_torch(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
    python, script = venv / "bin" / "python", venv / "bin" / "adapterzoo-registry"
    source = shutil.copytree(
        REGISTRY_SOURCE,
        tmp_path / "registry",  # pip builds in the tree: not in ours
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    no_torch = subprocess.run(
        [str(python), "-c", "import torch"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    no_core = subprocess.run(
        [str(python), "-c", "import adapterzoo"], capture_output=True, env=env, cwd=tmp_path, timeout=60
    )
    assert no_core.returncode != 0, "the registry must not pull adapterzoo (and with it torch)"

    port, root, log_path = free_port(), tmp_path / "root", tmp_path / "registry.log"
    args = [
        str(script),
        "serve",
        "--root",
        str(root),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--open",
        "--log-level",
        "warning",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    server = RegistryServer(root=root, port=port, log_path=log_path, args=args, process=process)
    try:
        deadline, answer = time.monotonic() + 30, None
        while answer is None and time.monotonic() < deadline:
            assert process.poll() is None, f"registry exited with {process.returncode}:\n{server.log()}"
            try:
                answer = httpx.get(f"{server.url}/api/models", timeout=1)
            except httpx.HTTPError:
                time.sleep(0.1)
        assert answer is not None, f"no answer within 30 s:\n{server.log()}"
        assert answer.status_code == 200 and answer.json() == []
    finally:
        server.stop()
