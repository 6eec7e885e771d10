"""Fixtures: registry servers run as real subprocesses, driven with the official `huggingface_hub` client.

Every server started here is killed in a finalizer, and its output goes to a log
file (never a pipe, which could fill up and stall the server).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

# Before huggingface_hub is imported (where possible): no telemetry, never offline, no noisy bars.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)

import huggingface_hub  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
REGISTRY_SOURCE = REPO_ROOT / "registry"
if str(REGISTRY_SOURCE) not in sys.path:  # works without `pip install -e` too
    sys.path.insert(0, str(REGISTRY_SOURCE))

ALICE_TOKEN = "hf_alice_writes_alice"
BOB_TOKEN = "hf_bob_writes_bob"
READER_TOKEN = "hf_reader_reads_alice"
TOKENS = {
    "tokens": {
        ALICE_TOKEN: {"user": "alice", "namespaces": {"alice": "write"}},
        BOB_TOKEN: {"user": "bob", "namespaces": {"bob": "write"}},
        READER_TOKEN: {"user": "carol", "namespaces": {"alice": "read"}},
    }
}
# Small enough that the 413 test stays quick, big enough for every other upload in the shared server.
SHARED_SERVER_MAX_UPLOAD = 4 * 1024 * 1024
# The header by which a client says it uploads big files with basic Git LFS (docs/registry.md).
TRANSFER_HEADER = "X-Adapterzoo-Transfer"
# Tiny pages so that every paginated listing really follows `Link: rel="next"`.
SHARED_SERVER_PAGE_SIZE = 3


@dataclass
class RegistryServer:
    """One `adapterzoo-registry serve` subprocess."""

    root: Path
    port: int
    log_path: Path
    args: list[str]
    process: subprocess.Popen = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, token: str | bool, *, declare_lfs: bool = True) -> HfApi:
        """A client; by default one declaring basic LFS (it runs with Xet off, see _online_hub_client)."""
        return HfApi(endpoint=self.url, token=token, headers={TRANSFER_HEADER: "lfs"} if declare_lfs else None)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no cleanup runs in the server."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_registry(
    root: Path,
    log_path: Path,
    *,
    tokens_file: Path | None,
    port: int | None = None,
    extra_args: tuple[str, ...] = (),
) -> RegistryServer:
    """Start the server via `python -m adapterzoo_registry.cli` and wait until it answers."""
    port = port or free_port()
    args = [
        sys.executable, "-m", "adapterzoo_registry.cli", "serve",
        "--root", str(root), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        *(["--tokens", str(tokens_file)] if tokens_file else []),
        *extra_args,
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REGISTRY_SOURCE), env.get("PYTHONPATH")]))
    with open(log_path, "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = RegistryServer(root=root, port=port, log_path=log_path, args=args, process=process)
    _wait_until_up(server)
    return server


def _wait_until_up(server: RegistryServer, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"registry exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/api/models", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"registry did not answer within {timeout}s:\n{server.log()}")


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("registry-auth") / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    return path


@pytest.fixture
def start_server(tmp_path: Path, tokens_file: Path) -> Iterator:
    """Factory for servers owned by one test; all of them are killed afterwards."""
    started: list[RegistryServer] = []

    def start(root: Path | None = None, *, port: int | None = None, open_access: bool = False, extra_args=()):
        server = start_registry(
            root or tmp_path / "registry-root",
            tmp_path / f"server-{len(started)}.log",
            tokens_file=None if open_access else tokens_file,
            port=port,
            extra_args=("--open", *extra_args) if open_access else tuple(extra_args),
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory, tokens_file: Path) -> Iterator[RegistryServer]:
    """The server most tests share; tests keep apart by using fresh repo names."""
    folder = tmp_path_factory.mktemp("shared-registry")
    server = start_registry(
        folder / "root",
        folder / "server.log",
        tokens_file=tokens_file,
        extra_args=(
            "--max-upload-bytes", str(SHARED_SERVER_MAX_UPLOAD), "--page-size", str(SHARED_SERVER_PAGE_SIZE),
        ),
    )  # fmt: skip
    yield server
    server.kill()


@pytest.fixture(autouse=True)
def _online_hub_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the environment says, the client must talk to our server, quietly."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # The clients of `RegistryServer.api` declare basic LFS, which holds only with Xet off. Tests of
    # plain clients with Xet on (the default a user has) use the `xet_on` fixture.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    huggingface_hub.utils.disable_progress_bars()


@pytest.fixture
def xet_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """hf_xet installed and enabled, as after `pip install huggingface_hub`: the client uses Xet where it can."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", False)
    assert huggingface_hub.utils.is_package_available("hf_xet"), "hf_xet comes with huggingface_hub 2.x; install it"


@pytest.fixture
def alice(registry: RegistryServer) -> HfApi:
    return registry.api(ALICE_TOKEN)


@pytest.fixture
def bob(registry: RegistryServer) -> HfApi:
    return registry.api(BOB_TOKEN)


@pytest.fixture
def reader(registry: RegistryServer) -> HfApi:
    return registry.api(READER_TOKEN)


@pytest.fixture
def anonymous(registry: RegistryServer) -> HfApi:
    return registry.api(False)


@pytest.fixture
def unique() -> str:
    """A short random suffix that keeps repo names and tags of different tests apart."""
    return uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------- helpers for tests


def fake_safetensors(seed: int, n_floats: int = 4096) -> bytes:
    """Bytes shaped like a safetensors file: u64 header length, JSON header, raw little-endian data."""
    header = json.dumps({"lora_A.weight": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}})
    data = hashlib.shake_256(f"weights-{seed}".encode()).digest(4 * n_floats)
    return len(header).to_bytes(8, "little") + header.encode() + data


def readme_with_tags(tags: list[str], library_name: str | None = "adapterzoo", body: str = "An adapter.") -> str:
    lines = ["---", "tags:", *[f"- {tag}" for tag in tags]]
    if library_name:
        lines.append(f"library_name: {library_name}")
    return "\n".join([*lines, "---", "", f"# Adapter\n\n{body}\n"])


def make_adapter_folder(folder: Path, tags: list[str], seed: int = 0) -> dict[str, bytes]:
    """An adapter as teams publish it: weights, a JSON config and a README with tags; returns {path: bytes}."""
    files = {
        "adapter_model.safetensors": fake_safetensors(seed),
        "adapter_config.json": json.dumps({"adapter_type": "lora", "r": 8, "seed": seed}).encode(),
        "README.md": readme_with_tags(tags).encode(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def store_snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of everything that holds data (lock files and tmp/ carry none)."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and relative.parts[0] not in ("locks", "tmp"):
            snapshot[str(relative)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snapshot
