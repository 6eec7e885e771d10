"""Attacks, round 2, on the hardened multi-tenant server: each hole found is written here as the
attack first (it failed before its fix), against a real `adapterzoo serve` subprocess on
127.0.0.1 with three tenants, driven with the official `openai` client where it can send the
attack and raw HTTP where it cannot."""

from __future__ import annotations

import openai
import pytest

from adapterzoo import Zoo

from .conftest import error, make_adapters, post, start_serve, write_keys

KEYS = {
    "tenants": {
        "acme": {"keys": ["k-acme"], "adapters": ["acme-*"]},
        "globex": {"keys": ["k-globex"], "adapters": ["globex-*"]},
        "ops": {"keys": ["k-ops"], "admin": True},
        "slow": {"keys": ["k-slow"], "rps": 0.01, "burst": 2},
    },
    "public": ["shared-*"],
}
ADAPTERS = ["acme-lora", "acme-houlsby", "globex-secret", "shared-prompt"]


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks2")
    make_adapters(Zoo.from_pretrained(tiny_base, device="cpu"), root / "adapters", ADAPTERS)
    keys = write_keys(root / "keys.json", KEYS)
    served = start_serve(tiny_base, root / "serve.log", "--adapters", str(root / "adapters"), "--keys", str(keys))
    try:
        yield served
    finally:
        served.stop()


def test_many_empty_chat_messages_cannot_slip_past_the_prompt_cap(server):
    # 20,000 messages without content counted 0 characters, so the cap checked before tokenizing
    # let through a template render of 140,000 characters (200,000 messages: 1.4M tokens, 4 s)
    messages = [{"role": "user"}] * 20_000
    r = post(server.url, {"model": "tiny", "messages": messages}, path="/tokenize")
    assert r.status_code == 400 and error(r)["code"] == "context_length_exceeded"
    assert "characters" in error(r)["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        server.client("k-acme").chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert "characters" in caught.value.body["message"]  # refused before tokenizing, not after


def test_a_call_with_more_prompts_times_choices_than_the_queue_holds_is_refused_before_tokenizing(server):
    # 50,000 prompts x n=16 built 800,000 requests (a minute of the server's CPU) before the
    # queue refused them whole; a call the queue can never hold is a 400 at once
    client = server.client("k-acme")
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=["a"] * 2000, n=16, max_tokens=1)
    assert caught.value.body["param"] == "n" and "32000" in caught.value.body["message"]
    ok = client.completions.create(model="tiny", prompt=["a"] * 4, n=2, max_tokens=1)
    assert len(ok.choices) == 8


@pytest.mark.parametrize("name", ["tiny", "auto"])
def test_an_adapter_cannot_be_loaded_under_the_base_name_or_auto(server, name):
    # the load answered 201/"added successfully" for an adapter no request could ever reach (the
    # base's name and "auto" are taken before any adapter lookup)
    for path, body in (
        ("/admin/adapters", {"name": name, "source": "acme-lora"}),
        ("/v1/load_lora_adapter", {"lora_name": name, "lora_path": "acme-lora"}),
    ):
        r = post(server.url, body, key="k-ops", path=path)
        assert r.status_code == 400 and "reserved" in error(r)["message"], r.text
    listed = [m.id for m in server.client("k-ops").models.list().data]
    assert listed.count(name) <= 1


def test_a_body_sent_byte_by_byte_forever_is_cut_off_with_a_408(tiny_base, tmp_path, serve_factory):
    # a tenant that declared 100 bytes and sent one held its connection (and a server task) for
    # as long as it liked; now the whole body must arrive within --body-timeout
    import socket

    keys = write_keys(tmp_path / "keys.json", KEYS)
    slow_server = serve_factory(tiny_base, "--keys", str(keys), "--body-timeout", "1")
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=10) as slow:
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k-acme\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        answer = b""
        while chunk := slow.recv(4096):  # the server closes the connection after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    ok = slow_server.client("k-globex").completions.create(model="tiny", prompt="hi", max_tokens=1)
    assert len(ok.choices) == 1


def test_a_stop_sequence_longer_than_the_cap_is_a_400(server):
    # holding back a tail that may start a stop sequence scans every suffix of the output up to the
    # stop's length, on the engine thread, for every row and token: four 100,000-character stops
    # cost 6.5 ms per token at 8,000 characters of output, added to every tenant's decode step
    client = server.client("k-acme")
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, stop=["b" * 100_000])
    assert caught.value.body["param"] == "stop" and "256" in caught.value.body["message"]
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2, stop=["b" * 256]).choices


@pytest.mark.parametrize(
    "path, body",
    [("/tokenize", {"model": "tiny", "prompt": "hello"}), ("/detokenize", {"model": "tiny", "tokens": [21, 18]})],
)
def test_the_tokenizer_routes_count_against_the_rate_limit(server, path, body):
    # a tenant held to 0.01 requests/s called /tokenize without limit: each call takes a thread
    # of the pool that also tokenizes every tenant's completions
    # (one bucket per tenant, shared by both parametrizations: the second may find it empty)
    codes = [post(server.url, body, key="k-slow", path=path).status_code for _ in range(3)]
    assert codes[-1] == 429 and set(codes) <= {200, 429}
    r = post(server.url, body, key="k-slow", path=path)
    assert r.status_code == 429 and error(r)["code"] == "rate_limit_exceeded"
    assert post(server.url, body, key="k-globex", path=path).status_code == 200
