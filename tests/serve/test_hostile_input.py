"""Hostile requests, each written as the attack first: every one gets a clear 4xx (or fails alone)
and none reaches another tenant, freezes the server, or learns a server path.

One in-process server (uvicorn in a thread, so a test can reach into its zoo and engine), driven
with the official `openai` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import shutil
import socket
import threading
import time

import httpx
import openai
import pytest

from adapterzoo import Zoo
from adapterzoo.formats.native import WEIGHTS_FILE
from adapterzoo.serve.http import build_server, redact_paths
from adapterzoo.serve.tenants import Tenant, Tenants

from .conftest import error, make_adapters, openai_client, post, running_app

KEYS = {
    "tenants": {
        "acme": {"keys": ["k-acme"], "adapters": ["acme-*"]},
        "globex": {"keys": ["k-globex"], "adapters": ["globex-*"]},
        "ops": {"keys": ["k-ops"], "admin": True},
    },
    "public": ["shared-*"],
}
ADAPTERS = ["acme-lora", "acme-houlsby", "globex-secret", "shared-prompt", "acme-broken", "acme-gone"]
MAX_BODY = 64 * 1024
MAX_CHARS = 2000


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    reference = Zoo.from_pretrained(tiny_base, device="cpu")
    make_adapters(reference, root / "adapters", ADAPTERS)
    (root / "adapters" / "acme-broken" / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    (root / "outside" / "acme-x").mkdir(parents=True)  # a folder outside the adapters folder
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    server = build_server(
        zoo,
        base_name="tiny",
        adapters_dir=root / "adapters",
        tenants=Tenants.from_dict(KEYS),
        max_body_bytes=MAX_BODY,
        max_prompt_chars=MAX_CHARS,
    )
    with running_app(server) as url:
        yield url, server, reference, root


def solo(zoo, prompt, adapter, n):
    return zoo.generate([prompt], [adapter], max_new_tokens=n)[0]


def test_out_of_vocabulary_token_ids_are_a_400_and_harm_no_running_request(served):
    url, server, reference, _ = served
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [
            pool.submit(
                openai_client(url, "k-globex").completions.create,
                model="globex-secret",
                prompt="hello",
                max_tokens=20,
                temperature=0,
            )
            for _ in range(3)
        ]
        for ids in ([1_000_000], [-1], [5, 100]):
            r = post(url, {"model": "acme-lora", "prompt": ids, "max_tokens": 2})
            assert r.status_code == 400 and error(r)["param"] == "prompt" and "vocabulary" in error(r)["message"]
        for f in running:
            assert f.result().choices[0].text == solo(reference, "hello", "globex-secret", 20)


def test_a_tiny_temperature_is_greedy_while_another_tenant_decodes(served):
    url, _, reference, _ = served
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = [
            pool.submit(
                openai_client(url, "k-globex").completions.create,
                model="globex-secret",
                prompt=p,
                max_tokens=24,
                temperature=0,
            )
            for p in ("hello", "abc", "zz")
        ]
        time.sleep(0.05)
        tiny = openai_client(url, "k-acme").completions.create(
            model="acme-lora", prompt="x", max_tokens=4, temperature=1e-40
        )
        assert tiny.choices[0].text == solo(reference, "x", "acme-lora", 4)
        for f, p in zip(running, ("hello", "abc", "zz")):
            assert f.result().choices[0].text == solo(reference, p, "globex-secret", 24)


def test_a_body_over_the_limit_is_a_413_and_health_answers_meanwhile(served):
    url, _, _, _ = served
    big = json.dumps({"model": "tiny", "prompt": "x" * (MAX_BODY * 4)}).encode()
    r = post(url, big)
    assert r.status_code == 413 and error(r)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(64):
            yield b" " * 8192

    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"Authorization": "Bearer k-acme"}, timeout=60)
    assert r.status_code == 413
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"


def test_a_long_prompt_is_refused_before_tokenizing(served, monkeypatch):
    url, server, _, _ = served
    calls = []
    encode = server.engine.encode
    monkeypatch.setattr(server.engine, "encode", lambda text: calls.append(len(text)) or encode(text))
    r = post(url, {"model": "tiny", "prompt": "y" * (MAX_CHARS + 1)})
    assert (
        r.status_code == 400 and error(r)["code"] == "context_length_exceeded" and str(MAX_CHARS) in error(r)["message"]
    )
    r = post(
        url,
        {"model": "tiny", "messages": [{"role": "user", "content": "y" * (MAX_CHARS + 1)}]},
        path="/v1/chat/completions",
    )
    assert r.status_code == 400 and error(r)["code"] == "context_length_exceeded"
    assert calls == []


def test_tokenizing_runs_off_the_event_loop(served, monkeypatch):
    """A slow tokenization (a huge prompt used to block every route for seconds) leaves /health
    answering at once."""
    url, server, _, _ = served
    encode = server.engine.encode
    entered, release = threading.Event(), threading.Event()

    def blocked(text):  # tokenizing that does not end until the test says so
        entered.set()
        release.wait(30)
        return encode(text)

    monkeypatch.setattr(server.engine, "encode", blocked)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, url, {"model": "tiny", "prompt": "hello", "max_tokens": 2})
        assert entered.wait(30)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # answered while tokenizing blocks
        assert not pending.done()
        release.set()
        assert pending.result().status_code == 200


@pytest.mark.parametrize(
    "body,param",
    [
        (b'{"model": "tiny", "prompt": "\\ud800"}', None),  # a lone surrogate
        (b'{"model": "tiny", "prompt": "x", "user": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", None),  # deep nesting
        (b'{"model": "tiny", "prompt": "x", "user": ' + b"[" * 40 + b"]" * 40 + b"}", None),
        ({"model": "tiny", "prompt": "x", "seed": 2**63}, "seed"),
        ({"model": "tiny", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "tiny", "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"model": "tiny", "prompt": [True, False]}, "prompt"),
        ({"model": "tiny", "prompt": "x", "temperature": "0.5"}, "temperature"),
        ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "tiny", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "tiny", "prompt": "x", "n": 0}, "n"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ({"model": "tiny", "prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_malformed_json_is_a_400_not_a_500(served, body, param):
    url, _, _, _ = served
    r = post(url, body)
    assert r.status_code == 400, r.text
    if param is not None:
        assert error(r)["param"].split(".")[0] == param
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"


def test_a_lone_surrogate_in_chat_is_a_400(served):
    url, _, _, _ = served
    r = post(
        url, b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', path="/v1/chat/completions"
    )
    assert r.status_code == 400 and "surrogate" in error(r)["message"]


def test_names_are_checked_as_names_before_any_lookup(served):
    """`acme-*` used to match "acme-x/../globex-secret": 500 where the folder exists, 404 where
    not (a probe), and the bogus name stayed in acme's model list for good."""
    url, server, _, root = served
    client = openai_client(url, "k-acme")
    answers = []
    for model in (
        "acme-x/../globex-secret",
        "acme-x/../nothing-here",
        "acme-x/../../outside/acme-x",
        "..",
        "acme-x\\y",
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt="x", max_tokens=2)
        assert e.value.body["param"] == "model"
        answers.append(e.value.body["message"].replace(model, "?"))
    assert len(set(answers[:2])) == 1  # the same answer whether the target exists or not
    names = {m.id for m in client.models.list()}
    assert not any("/" in n or ".." in n for n in names)
    assert not any("/" in n or ".." in n for n in server.adapters.catalog)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="globex-secret", prompt="x", max_tokens=2)


def test_globs_never_cross_a_path_separator():
    acme = Tenant("acme", adapters=["acme-*"])
    assert acme.owns("acme-sql")
    for name in ("acme-x/../globex-y", "acme-x/y", "acme-..", "acme-x\\y"):
        assert not acme.owns(name)
    assert not Tenants([acme], public=["*"]).is_public("a/b")


def test_tenant_errors_hold_no_server_paths(served):
    url, _, _, root = served
    with pytest.raises(openai.InternalServerError) as e:
        openai_client(url, "k-acme").completions.create(model="acme-broken", prompt="x", max_tokens=2)
    message = e.value.body["message"]
    assert e.value.body["code"] == "adapter_load_failed" and "acme-broken" in message
    assert str(root) not in message and str(root.resolve()) not in message
    labels = {"/srv/adapters": "<adapters>"}
    assert (
        redact_paths("file /srv/adapters/a/x.safetensors is truncated", labels)
        == "file <adapters>/a/x.safetensors is truncated"
    )
    assert redact_paths("cannot read /home/op/secret/file.bin", labels) == "cannot read <path>"


def test_a_removed_adapter_folder_is_unlisted_and_answers_404(served):
    url, _, _, root = served
    client = openai_client(url, "k-acme")
    assert "acme-gone" in {m.id for m in client.models.list()}
    shutil.rmtree(root / "adapters" / "acme-gone")
    assert "acme-gone" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="acme-gone", prompt="x", max_tokens=2)


def test_aborted_uploads_are_answered_quietly(served, caplog):
    """1,000 aborted uploads used to write 16k lines of tracebacks."""
    url, _, _, _ = served
    port = int(url.rsplit(":", 1)[1])
    with caplog.at_level(logging.WARNING, logger="adapterzoo.serve"):
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k-acme\r\n"
                    b'Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"model": '
                )
        time.sleep(0.5)
    assert not [r for r in caplog.records if r.name.startswith("adapterzoo")]
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"


def test_health_is_unhealthy_while_a_request_is_stuck(served, monkeypatch):
    url, server, _, _ = served
    gate = threading.Event()
    forward = server.engine.zoo.forward

    def hanging(*args, **kw):
        gate.wait(30)
        return forward(*args, **kw)

    monkeypatch.setattr(server.engine, "stuck_after", 0.3)
    monkeypatch.setattr(server.engine.zoo, "forward", hanging)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, url, {"model": "tiny", "prompt": "hello", "max_tokens": 2})
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health", timeout=5).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy" and health.json()["stuck"] == 1
        gate.set()
        assert pending.result().status_code == 200
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_a_client_that_disconnects_leaves_no_traceback(served, caplog):
    url, server, _, _ = served
    import gc

    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    f"{url}/v1/completions",
                    json={"model": "tiny", "prompt": "abc", "max_tokens": 200, "ignore_eos": True},
                    headers={"Authorization": "Bearer k-acme"},
                    timeout=httpx.Timeout(5, read=0.05),
                )
        deadline = time.monotonic() + 10
        while server.engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        gc.collect()
        time.sleep(0.2)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert server.engine.stats()["running"] == 0
