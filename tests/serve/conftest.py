"""Fixtures for serving tests: a tiny base saved as a folder (so a server subprocess can load it),
adapters of every type saved next to it, and `adapterzoo serve` subprocesses on 127.0.0.1.

Every server started here is stopped in a finalizer; its output goes to a log file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from adapterzoo import Zoo
from adapterzoo.testing.models import ONE_OF_EACH as TYPES
from adapterzoo.testing.models import char_tokenizer, perturb, tiny_model

TYPE_NAMES = list(TYPES)


def save_base(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    if not (folder / "config.json").exists():
        tiny_model(family, seed).save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
    return folder


def make_adapters(zoo: Zoo, folder: Path | None, names: list[str], *, seed0: int = 0) -> None:
    """Adapters `names`, type by position (cycling through all six), perturbed off identity; saved
    under `folder/<name>` when a folder is given."""
    for i, name in enumerate(names):
        type_name, config = TYPES[TYPE_NAMES[i % len(TYPE_NAMES)]]
        zoo.add_adapter(name, type_name, seed=seed0 + i, trainable=False, **config)
        perturb(zoo, name, scale=1.0, seed=seed0 + i)
        if folder is not None:
            zoo.save_adapter(name, folder / name)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("tiny-llama"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServeProcess:
    port: int
    log_path: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = "none", **kwargs):
        from openai import OpenAI

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, **kwargs)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


def start_serve(base: Path, log_path: Path, *args: str, timeout: float = 60) -> ServeProcess:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "adapterzoo.cli",
        "serve",
        str(base),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--name",
        "tiny",
        "--device",
        "cpu",
        *args,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServeProcess(port, log_path, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"adapterzoo serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.process.kill()
    server.process.wait(10)
    raise RuntimeError(f"adapterzoo serve did not answer within {timeout}s:\n{server.log()}")


@pytest.fixture
def serve_factory(tmp_path) -> Iterator:
    started: list[ServeProcess] = []

    def start(base: Path, *args: str) -> ServeProcess:
        server = start_serve(base, tmp_path / f"serve-{len(started)}.log", *args)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def write_keys(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@contextmanager
def running_app(server) -> Iterator[str]:
    """An in-process `Server` (so a test can reach into its zoo and engine) behind uvicorn on
    127.0.0.1, in a thread; yields its URL and stops it (draining the engine) on exit."""
    import threading

    import uvicorn

    from adapterzoo.serve.http import create_app

    port = free_port()
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    userver = uvicorn.Server(config)
    thread = threading.Thread(target=userver.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not userver.started and time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        userver.should_exit = True
        thread.join(60)


def openai_client(url: str, key: str = "none", **kwargs):
    from openai import OpenAI

    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 60)
    return OpenAI(base_url=f"{url}/v1", api_key=key, **kwargs)


def post(url: str, body, key: str = "k-acme", path: str = "/v1/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{url}{path}",
        content=content,
        timeout=60,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **kw.pop("headers", {})},
        **kw,
    )


def error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]
