"""`adapterzoo serve` in a subprocess on 127.0.0.1, for tests: started, waited for (`/health`),
talked to with the `openai` client, and stopped by its pid. Used by the project's serving tests and
by `plugin_checks.served_completions` (a plugin's own tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


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
