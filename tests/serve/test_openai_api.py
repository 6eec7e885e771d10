"""The API operators expect (vLLM's OpenAI server is the reference), through the official client:
logprobs, n > 1, penalties, min_tokens, ignore_eos, stop_token_ids, X-Request-Id, /tokenize,
/detokenize and vLLM's LoRA admin routes. Each option runs per row in a mixed batch (requests of
all six adapter types at once) and is checked against a solo reference written out here."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
import torch

from adapterzoo import Zoo
from adapterzoo.serve.server import build_server
from adapterzoo.serve.tenants import Tenants

from .conftest import TYPE_NAMES, make_adapters, openai_client, running_app

KEYS = {"tenants": {"acme": {"keys": ["k-acme"], "adapters": ["*"]}, "ops": {"keys": ["k-ops"], "admin": True}}}


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    reference = Zoo.from_pretrained(tiny_base, device="cpu")
    make_adapters(reference, root / "adapters", TYPE_NAMES)
    make_adapters(reference, root / "adapters" / ".incoming", ["late-lora"], seed0=50)
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    server = build_server(zoo, base_name="tiny", adapters_dir=root / "adapters", tenants=Tenants.from_dict(KEYS))
    with running_app(server) as url:
        yield url, reference


@torch.inference_mode()
def reference_run(
    zoo, prompt, adapter, n, *, presence=0.0, frequency=0.0, repetition=1.0, min_tokens=0, stop_ids=(), ignore_eos=False
):
    """Greedy decoding written out plainly: no cache, the whole sequence again at every step,
    vLLM's penalty formulas. Returns (text, [logprob of each output token under raw logits])."""
    ids = zoo.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    eos = zoo.tokenizer.eos_token_id
    out: list[int] = []
    logprobs: list[float] = []
    for _ in range(n):
        logits = zoo.forward(torch.tensor([ids + out]), adapters=[adapter]).logits[0, -1].float()
        scores = logits.clone()
        for t in set(ids + out):
            if repetition != 1:
                scores[t] = scores[t] / repetition if scores[t] > 0 else scores[t] * repetition
        for t in set(out):
            scores[t] -= frequency * out.count(t) + presence
        if len(out) < min_tokens:
            for t in (eos, *stop_ids):
                scores[t] = float("-inf")
        token = int(scores.argmax())
        if len(out) >= min_tokens and ((token == eos and not ignore_eos) or token in stop_ids):
            break
        out.append(token)
        logprobs.append(float(logits.log_softmax(-1)[token]))
    return zoo.tokenizer.decode(out, skip_special_tokens=True), logprobs


def test_logprobs_per_row_in_a_mixed_batch_equal_a_solo_run(served):
    url, reference = served
    client = openai_client(url, "k-acme")
    models = [*TYPE_NAMES, "tiny"]

    def ask(model):
        return client.completions.create(model=model, prompt="hello", max_tokens=6, temperature=0, logprobs=3)

    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(ask, models))
    for model, r in zip(models, results):
        text, logprobs = reference_run(reference, "hello", None if model == "tiny" else model, 6)
        choice = r.choices[0]
        assert choice.text == text, model
        lp = choice.logprobs
        assert "".join(lp.tokens) == text and len(lp.token_logprobs) == len(text)
        assert lp.token_logprobs == pytest.approx(logprobs, abs=1e-4), model
        assert all(len(top) == 3 for top in lp.top_logprobs)
        assert [max(top, key=top.get) for top in lp.top_logprobs] == lp.tokens  # greedy: the top one
        assert lp.text_offset == list(range(len(text)))  # one character per token here
    plain = client.completions.create(model="lora", prompt="hello", max_tokens=3, temperature=0, logprobs=0)
    assert plain.choices[0].logprobs.top_logprobs == [{}, {}, {}]


def test_chat_logprobs_and_top_logprobs(served):
    url, reference = served
    r = openai_client(url, "k-acme").chat.completions.create(
        model="houlsby",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)
    assert all(c.bytes == list(c.token.encode()) for c in content)


def test_n_choices_each_equal_a_solo_run(served):
    url, reference = served
    client = openai_client(url, "k-acme")
    r = client.completions.create(model="prefix", prompt="abc", max_tokens=6, temperature=1.1, seed=11, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for j, choice in enumerate(r.choices):
        assert (
            choice.text
            == reference.generate(["abc"], ["prefix"], max_new_tokens=6, do_sample=True, temperature=1.1, seed=11 + j)[
                0
            ]
        )
    assert r.usage.prompt_tokens == 3
    two = client.completions.create(model="lora", prompt=["ab", "cd"], max_tokens=3, temperature=0, n=2)
    assert [c.text for c in two.choices] == [
        reference_run(reference, p, "lora", 3)[0] for p in ("ab", "ab", "cd", "cd")
    ]
    chat = client.chat.completions.create(
        model="bitfit", messages=[{"role": "user", "content": "x"}], max_tokens=3, temperature=0, n=2
    )
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def test_penalties_min_tokens_ignore_eos_and_stop_ids_per_row_in_a_mixed_batch(served):
    url, reference = served
    client = openai_client(url, "k-acme")
    first = reference_run(reference, "zz top", "prompt", 8)[0]
    stop_id = reference.tokenizer(first[2], add_special_tokens=False)["input_ids"][0]
    cases = [
        ("lora", dict(presence_penalty=1.5), dict(presence=1.5)),
        ("houlsby", dict(frequency_penalty=1.2), dict(frequency=1.2)),
        ("prefix", dict(extra_body={"repetition_penalty": 1.4}), dict(repetition=1.4)),
        ("prompt", dict(extra_body={"stop_token_ids": [stop_id]}), dict(stop_ids=(stop_id,))),
        (
            "prompt",
            dict(extra_body={"stop_token_ids": [stop_id], "min_tokens": 5}),
            dict(stop_ids=(stop_id,), min_tokens=5),
        ),
        ("bitfit", dict(extra_body={"ignore_eos": True}), dict(ignore_eos=True)),
        (
            "adapterbias",
            dict(presence_penalty=-1.0, frequency_penalty=0.5, extra_body={"repetition_penalty": 0.8}),
            dict(presence=-1.0, frequency=0.5, repetition=0.8),
        ),
    ]

    def ask(case):
        model, options, _ = case
        return client.completions.create(model=model, prompt="zz top", max_tokens=8, temperature=0, **options)

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(ask, cases))
    for (model, options, ref), r in zip(cases, results):
        assert r.choices[0].text == reference_run(reference, "zz top", model, 8, **ref)[0], (model, options)
    assert results[3].choices[0].text == first[:2] and results[3].choices[0].finish_reason == "stop"
    assert len(results[4].choices[0].text) >= 5


def test_x_request_id_is_echoed_or_made(served):
    url, _ = served
    client = openai_client(url, "k-acme")
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt="x", max_tokens=1, extra_headers={"X-Request-Id": "trace-42"}
    )
    assert raw.headers["x-request-id"] == "trace-42"
    made = client.completions.with_raw_response.create(model="tiny", prompt="x", max_tokens=1)
    assert len(made.headers["x-request-id"]) >= 16
    bad = httpx.get(f"{url}/v1/models", headers={"X-Request-Id": "a b<script>", "Authorization": "Bearer k-acme"})
    assert bad.status_code == 200 and bad.headers["x-request-id"] != "a b<script>"


def test_tokenize_and_detokenize(served):
    url, reference = served
    auth = {"Authorization": "Bearer k-acme"}
    r = httpx.post(f"{url}/tokenize", json={"model": "lora", "prompt": "hello"}, headers=auth).json()
    assert r["tokens"] == reference.tokenizer("hello", add_special_tokens=False)["input_ids"] and r["count"] == 5
    assert r["max_model_len"] == 256
    usage = openai_client(url, "k-acme").completions.create(model="lora", prompt="hello", max_tokens=1).usage
    assert usage.prompt_tokens == r["count"]
    assert httpx.post(f"{url}/detokenize", json={"model": "lora", "tokens": r["tokens"]}, headers=auth).json() == {
        "prompt": "hello"
    }
    chat = httpx.post(
        f"{url}/tokenize", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, headers=auth
    ).json()
    assert chat["count"] > 2
    bad = httpx.post(f"{url}/detokenize", json={"model": "lora", "tokens": [10**9]}, headers=auth)
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    assert httpx.post(f"{url}/tokenize", json={"model": "lora", "prompt": "x"}).status_code == 401


def test_vllm_lora_admin_routes(served):
    url, reference = served
    body = {"lora_name": "late-lora", "lora_path": ".incoming/late-lora"}
    assert (
        httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer k-acme"}).status_code
        == 403
    )
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer k-ops"})
    assert r.status_code == 200 and "late-lora" in r.text
    client = openai_client(url, "k-acme")
    text = client.completions.create(model="late-lora", prompt="hello", max_tokens=5, temperature=0).choices[0].text
    assert text == reference_run(reference, "hello", "late-lora", 5)[0]
    r = httpx.post(
        f"{url}/v1/unload_lora_adapter", json={"lora_name": "late-lora"}, headers={"Authorization": "Bearer k-ops"}
    )
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late-lora", prompt="hello", max_tokens=5)
    r = httpx.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": "x", "lora_path": "/etc"},
        headers={"Authorization": "Bearer k-ops"},
    )
    assert r.status_code == 400


def test_logprobs_and_request_failures_cross_the_ray_boundary():
    """The Ray replica sends a finished request to the ingress as plain data (no Ray needed here)."""
    from adapterzoo.serve.engine import Completion, RequestFailedError, TokenLogprob
    from adapterzoo.serve.ray import _completion, _done

    done = Completion(
        id="r1",
        adapter="lora",
        text="ab",
        token_ids=[5, 6],
        finish_reason="length",
        prompt_tokens=2,
        completion_tokens=2,
        ttft=0.1,
        latency=0.2,
        logprobs=[TokenLogprob(5, -0.5, ((5, -0.5), (7, -1.5))), TokenLogprob(6, -0.25, ())],
        cached_tokens=32,
    )
    back = _completion(_done(done, "replica-1"))
    assert back.logprobs == done.logprobs and back.replica == "replica-1" and back.cached_tokens == 32
    failed = Completion(
        id="r2",
        adapter="bad",
        text="",
        token_ids=[],
        finish_reason="error",
        prompt_tokens=1,
        completion_tokens=0,
        ttft=None,
        latency=0.1,
        error=RequestFailedError("NaN scores"),
    )
    assert isinstance(_completion(_done(failed, "r")).error, RequestFailedError)


def test_n_choices_stream_by_index(served):
    url, reference = served
    client = openai_client(url, "k-acme")
    chunks = list(
        client.completions.create(
            model="houlsby",
            prompt="abc",
            max_tokens=5,
            temperature=0,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = ["", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == [reference_run(reference, "abc", "houlsby", 5)[0]] * 2
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == 3


def test_streamed_logprobs_come_with_each_choices_last_chunk(served):
    url, reference = served
    client = openai_client(url, "k-acme")
    chunks = list(
        client.completions.create(model="prefix", prompt="hello", max_tokens=5, temperature=0, logprobs=1, stream=True)
    )
    text = "".join(c.choices[0].text for c in chunks)
    last = chunks[-1].choices[0]
    assert last.finish_reason == "length" and "".join(last.logprobs.tokens) == text
    assert last.logprobs.token_logprobs == pytest.approx(reference_run(reference, "hello", "prefix", 5)[1], abs=1e-4)
    chat = list(
        client.chat.completions.create(
            model="lora",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            temperature=0,
            logprobs=True,
            top_logprobs=1,
            stream=True,
        )
    )
    final = [c for c in chat if c.choices and c.choices[0].finish_reason][0].choices[0]
    content = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert "".join(t.token for t in final.logprobs.content) == content


def test_usage_reports_the_prompt_tokens_served_from_the_prefix_cache(served):
    """As OpenAI and vLLM report them: usage.prompt_tokens_details.cached_tokens, per request."""
    url, _ = served
    client = openai_client(url, "k-acme")
    opening = "the quick brown fox jumps over the lazy dog and runs "  # 3 full blocks of 16 characters
    first = client.completions.create(model="lora", prompt=opening + "far ->", max_tokens=2, temperature=0)
    again = client.completions.create(model="lora", prompt=opening + "home ->", max_tokens=2, temperature=0)
    other = client.completions.create(model="houlsby", prompt=opening + "home ->", max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 48
    assert other.usage.prompt_tokens_details.cached_tokens == 0  # another adapter's blocks are its own
