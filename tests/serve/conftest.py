"""Fixtures for serving tests: a tiny base saved as a folder (so a server subprocess can load it),
adapters of every type saved next to it, and `adapterzoo serve` subprocesses on 127.0.0.1.

Every server started here is stopped in a finalizer; its output goes to a log file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from adapterzoo import Zoo
from adapterzoo.testing.models import ONE_OF_EACH as TYPES
from adapterzoo.testing.models import char_tokenizer, perturb, tiny_model
from adapterzoo.testing.serving import ServeProcess, free_port, start_serve  # noqa: F401 - tests import them from here

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


def submit_in_two_waves(engine, jobs: list[tuple[str, str | None, int]], first: int, timeout: float = 120) -> list:
    """Submit `jobs` ((prompt, adapter, max_tokens)) to a running engine: the first `first` at once, the
    rest once it has run two steps, so that they join rows already decoding; their results, in order."""
    from adapterzoo.serve import SamplingParams

    handles = [engine.submit(p, a, SamplingParams(max_tokens=n)) for p, a, n in jobs[:first]]
    while engine.steps < 2:
        time.sleep(0.005)
    handles += [engine.submit(p, a, SamplingParams(max_tokens=n)) for p, a, n in jobs[first:]]
    return [h.result(timeout) for h in handles]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("tiny-llama"))


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
