"""The OpenAI-compatible server, as a subprocess on 127.0.0.1, driven with the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest

from adapterzoo import Zoo
from adapterzoo.formats.native import WEIGHTS_FILE
from adapterzoo.serve.http import render_chat

from .conftest import make_adapters, start_serve, write_keys

KEYS = {
    "tenants": {
        "acme": {"keys": ["k-acme"], "adapters": ["acme-*"]},
        "beta": {"keys": ["k-beta"], "adapters": ["beta-*"]},
        "slow": {"keys": ["k-slow"], "rps": 0.2, "burst": 2},
        "ops": {"keys": ["k-ops"], "admin": True},
    },
    "public": ["shared-*"],
}
ADAPTERS = [
    "acme-lora",
    "acme-houlsby",
    "beta-bitfit",
    "shared-adapterbias",
    "acme-prefix",
    "shared-prompt",
    "acme-broken",
]


@pytest.fixture(scope="module")
def setup(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    make_adapters(zoo, root / "adapters", ADAPTERS)
    make_adapters(zoo, root / "adapters" / ".incoming", ["late"], seed0=40)  # hidden: not found by a rescan
    (root / "adapters" / "acme-broken" / WEIGHTS_FILE).write_bytes(b"\x00" * 64)
    keys = write_keys(root / "keys.json", KEYS)
    server = start_serve(
        tiny_base,
        root / "server.log",
        "--adapters",
        str(root / "adapters"),
        "--keys",
        str(keys),
        "--slots",
        "4",
        "--max-host",
        "4",
    )
    yield server, zoo, root
    server.stop()


def solo(zoo, prompt, adapter, n, **kw):
    return zoo.generate([prompt], [adapter], max_new_tokens=n, **kw)[0]


def test_models_are_listed_per_tenant(setup):
    server, _, _ = setup
    acme = sorted(m.id for m in server.client("k-acme").models.list())
    beta = sorted(m.id for m in server.client("k-beta").models.list())
    assert acme == sorted(
        ["tiny", "acme-lora", "acme-houlsby", "acme-prefix", "acme-broken", "shared-adapterbias", "shared-prompt"]
    )
    assert beta == sorted(["tiny", "beta-bitfit", "shared-adapterbias", "shared-prompt"])
    assert server.client("k-acme").models.retrieve("acme-lora").id == "acme-lora"
    owners = {m.id: m.owned_by for m in server.client("k-acme").models.list()}
    assert owners["tiny"] == "adapterzoo" and owners["acme-lora"] == "acme" and owners["shared-prompt"] == "public"
    assert server.client("k-beta").models.retrieve("tiny").owned_by == "adapterzoo"
    assert server.client("k-acme").models.retrieve("acme-lora").owned_by == "acme"
    assert server.client("k-beta").models.retrieve("shared-prompt").owned_by == "public"
    with pytest.raises(openai.NotFoundError):
        server.client("k-beta").models.retrieve("acme-lora")


def test_completions_equal_solo_generation(setup):
    server, zoo, _ = setup
    client = server.client("k-acme")
    for model in ["acme-lora", "acme-houlsby", "acme-prefix", "shared-adapterbias", "shared-prompt", "tiny"]:
        r = client.completions.create(model=model, prompt="hello", max_tokens=6, temperature=0)
        adapter = None if model == "tiny" else model
        assert r.choices[0].text == solo(zoo, "hello", adapter, 6), model
        assert r.model == model and r.usage.prompt_tokens == 5 and r.usage.completion_tokens == len(r.choices[0].text)
    two = client.completions.create(model="acme-lora", prompt=["hello", "abc"], max_tokens=4, temperature=0)
    assert [c.text for c in two.choices] == [solo(zoo, p, "acme-lora", 4) for p in ["hello", "abc"]]
    stopped = client.completions.create(
        model="acme-lora", prompt="hello", max_tokens=6, temperature=0, stop=[solo(zoo, "hello", "acme-lora", 6)[2:4]]
    )
    assert stopped.choices[0].finish_reason == "stop"
    seeded = [
        client.completions.create(model="acme-lora", prompt="hello", max_tokens=6, temperature=1.2, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1] == solo(zoo, "hello", "acme-lora", 6, do_sample=True, temperature=1.2, seed=7)


def test_chat_uses_the_template_and_equals_solo(setup):
    server, zoo, _ = setup
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = server.client("k-beta").chat.completions.create(
        model="beta-bitfit", messages=messages, max_tokens=6, temperature=0
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == solo(zoo, render_chat(zoo.tokenizer, messages), "beta-bitfit", 6)


def test_streaming(setup):
    server, zoo, _ = setup
    client = server.client("k-acme")
    chunks = list(
        client.completions.create(model="acme-prefix", prompt="abc ->", max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == solo(zoo, "abc ->", "acme-prefix", 8)
    assert chunks[-1].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "hi"}]
    stream = client.chat.completions.create(
        model="shared-prompt",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == solo(zoo, render_chat(zoo.tokenizer, messages), "shared-prompt", 8)
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_auth_and_tenant_isolation(setup):
    server, _, _ = setup
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    with pytest.raises(openai.NotFoundError) as other:  # another tenant's adapter: as if it did not exist
        server.client("k-beta").completions.create(model="acme-lora", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        server.client("k-beta").completions.create(model="no-such", prompt="x", max_tokens=2)
    assert other.value.body["code"] == missing.value.body["code"] == "model_not_found"
    assert other.value.body["message"].replace("acme-lora", "?") == missing.value.body["message"].replace(
        "no-such", "?"
    )
    with pytest.raises(openai.NotFoundError):
        server.client("k-beta").chat.completions.create(model="acme-lora", messages=[{"role": "user", "content": "x"}])


def test_bad_input(setup):
    server, _, _ = setup
    headers = {"Authorization": "Bearer k-acme", "Content-Type": "application/json"}
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "tiny", "prompt": ', headers=headers)
    assert r.status_code == 400 and _error(r)["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/v1/completions", content=b"[1, 2]", headers=headers)
    assert r.status_code == 400
    client = server.client("k-acme")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", extra_body={"bogus": 1})
    assert e.value.body["param"] == "bogus" and "Unrecognized" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x" * 300)
    assert e.value.body["code"] == "context_length_exceeded"
    for bad in (0, -1, 10**6):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="x", max_tokens=bad)
        assert e.value.body["param"] == "max_tokens" or e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], logit_bias={"5": 3})
    assert e.value.body["code"] == "unsupported_parameter"
    assert httpx.get(f"{server.url}/nope").status_code == 404


def test_corrupt_adapter_fails_alone(setup):
    server, zoo, _ = setup
    client = server.client("k-acme")
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="acme-broken", prompt="hello", max_tokens=4)
    assert e.value.body["code"] == "adapter_load_failed" and "acme-broken" in e.value.body["message"]
    with pytest.raises(openai.InternalServerError):
        list(client.completions.create(model="acme-broken", prompt="hello", max_tokens=4, stream=True))
    assert client.completions.create(model="acme-lora", prompt="hello", max_tokens=4, temperature=0).choices[
        0
    ].text == solo(zoo, "hello", "acme-lora", 4)


def test_rate_limit(setup):
    server, _, _ = setup
    client = server.client("k-slow")
    ok = [client.completions.create(model="tiny", prompt="x", max_tokens=1) for _ in range(2)]
    assert len(ok) == 2
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "rate_limit_exceeded"


def _metric(server, name: str, labels: str = "") -> float:
    for line in httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer k-ops"}).text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_disconnect_mid_stream_frees_the_request(setup):
    server, _, _ = setup
    before = _metric(server, "adapterzoo_completions_total", 'finish_reason="cancelled"')
    body = {
        "model": "acme-houlsby",
        "prompt": "hello",
        "max_tokens": 240,
        "stop": ["\u0000"],
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer k-acme"}
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _metric(server, "adapterzoo_completions_total", 'finish_reason="cancelled"') > before:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the disconnected request was not cancelled")
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok"


def test_admin_routes(setup):
    server, zoo, root = setup
    admin = {"Authorization": "Bearer k-ops"}
    r = httpx.post(
        f"{server.url}/admin/adapters",
        json={"name": "late", "source": str(root / "adapters" / ".incoming" / "late"), "owner": "acme"},
        headers={"Authorization": "Bearer k-acme"},
    )
    assert r.status_code == 403
    r = httpx.post(
        f"{server.url}/admin/adapters",
        json={"name": "late", "source": ".incoming/late", "owner": "acme"},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    assert r.json()["tier"] == "host"
    text = (
        server.client("k-acme")
        .completions.create(model="late", prompt="hello", max_tokens=5, temperature=0)
        .choices[0]
        .text
    )
    assert text == solo(zoo, "hello", "late", 5)
    with pytest.raises(openai.NotFoundError):
        server.client("k-beta").completions.create(model="late", prompt="hello", max_tokens=5)
    listing = httpx.get(f"{server.url}/admin/adapters", headers=admin).json()
    assert "late" in {a["id"] for a in listing["data"]}
    r = httpx.post(f"{server.url}/admin/adapters/late/unload", headers=admin)
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert httpx.delete(f"{server.url}/admin/adapters/late", headers=admin).status_code == 200
    with pytest.raises(openai.NotFoundError):
        server.client("k-acme").completions.create(model="late", prompt="hello", max_tokens=5)
    (root / "adapters" / ".incoming" / "empty").mkdir()
    r = httpx.post(f"{server.url}/admin/adapters", json={"name": "bad", "source": ".incoming/empty"}, headers=admin)
    assert r.status_code == 400 and _error(r)["code"] == "adapter_load_failed"


def test_metrics_and_health(setup):
    server, _, _ = setup
    server.client("k-acme").completions.create(model="acme-lora", prompt="hello", max_tokens=3, temperature=0)
    assert httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer k-acme"}).status_code == 403
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer k-ops"}).text
    for name in (
        "adapterzoo_http_requests_total",
        "adapterzoo_tokens_total",
        "adapterzoo_queue_depth",
        "adapterzoo_adapter_hits_total",
        "adapterzoo_adapter_misses_total",
        "adapterzoo_adapter_swap_seconds_bucket",
        "adapterzoo_time_to_first_token_seconds_bucket",
        "adapterzoo_adapters_resident",
    ):
        assert name in text, name
    assert _metric(server, "adapterzoo_adapter_misses_total", 'adapter="acme-lora",tier="disk"') >= 1
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["adapters"]["host"] <= 4


def test_burst_beyond_the_queue_limit(tiny_base, tmp_path):
    server = start_serve(tiny_base, tmp_path / "burst.log", "--max-queue", "2", "--max-batch", "1")
    try:
        # long requests (200 tokens, EOS ignored), so that the burst arrives while the first ones still
        # run: with 30 tokens the engine could finish each before the next client posted (a flake)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "temperature": 0}

        def call(_):
            return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(call, range(12)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429}, codes
        assert all(_error(r)["code"] == "queue_full" for r in responses if r.status_code == 429)
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
        assert call(0).status_code == 200
    finally:
        server.stop()


def test_shutdown_drains_running_requests(tiny_base, tmp_path):
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    server = start_serve(tiny_base, tmp_path / "drain.log")
    try:
        client = server.client("any")
        stream = client.completions.create(model="tiny", prompt="abc", max_tokens=120, temperature=0, stream=True)
        chunks = iter(stream)
        first = next(chunks)
        late = concurrent.futures.ThreadPoolExecutor(1).submit(
            lambda: client.completions.create(model="tiny", prompt="x", max_tokens=100, temperature=0)
        )
        time.sleep(0.3)
        server.process.send_signal(15)  # SIGTERM while both run
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"
        assert first.choices[0].text + "".join(c.choices[0].text for c in rest) == solo(zoo, "abc", None, 120)
        assert late.result(60).choices[0].text == solo(zoo, "x", None, 100)
        assert server.process.wait(60) == 0, server.log()
        with pytest.raises(openai.APIConnectionError):
            client.models.list()
    finally:
        server.stop()
