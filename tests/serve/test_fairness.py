"""Fairness between tenants: every prompt counts against the rate limit, each tenant has a share
of the queue and of the batch, admission is round-robin, and a refused or cancelled batch leaves
no room taken. Waits are counted in engine steps, not seconds (timings belong in benchmarks/)."""

from __future__ import annotations

import functools
import time

import pytest

from adapterzoo import Zoo
from adapterzoo.serve import Engine, QueueFullError, SamplingParams
from adapterzoo.serve.http import build_server
from adapterzoo.serve.tenants import RateLimiter, Tenant, Tenants
from adapterzoo.testing.models import tiny_zoo

from .conftest import make_adapters, openai_client, running_app


@functools.cache
def zoo():
    z = tiny_zoo("llama", slots=8)
    make_adapters(z, None, ["a-lora", "b-lora"])
    return z


def test_each_prompt_of_a_batch_counts_against_the_rate_limit():
    limiter = RateLimiter()
    tenant = Tenant("t", rps=0.001, burst=4)
    assert limiter.allow(tenant, now=0.0, cost=3)
    assert not limiter.allow(tenant, now=0.0, cost=2)  # 1 left, 2 asked
    assert limiter.allow(tenant, now=0.0, cost=1)


def test_a_batch_over_the_burst_is_refused_through_http(tiny_base):
    base = Zoo.from_pretrained(tiny_base, device="cpu")
    tenants = Tenants.from_dict(
        {"tenants": {"slow": {"keys": ["k-slow"], "rps": 0.01, "burst": 4}, "other": {"keys": ["k-other"]}}}
    )
    with running_app(build_server(base, base_name="tiny", tenants=tenants)) as url:
        client = openai_client(url, "k-slow")
        with pytest.raises(Exception) as e:
            client.completions.create(model="tiny", prompt=["x"] * 8, max_tokens=1)
        assert e.value.status_code == 429 and "8 prompts" in e.value.body["message"]
        assert len(client.completions.create(model="tiny", prompt=["x"] * 3, max_tokens=1).choices) == 3
        with pytest.raises(Exception) as e:  # 1 token left in the bucket, 2 prompts x 1 choice
            client.completions.create(model="tiny", prompt=["x", "y"], max_tokens=1)
        assert e.value.status_code == 429
        with pytest.raises(Exception) as e:  # n counts too
            client.completions.create(model="tiny", prompt="x", max_tokens=1, n=2)
        assert e.value.status_code == 429
        assert openai_client(url, "k-other").completions.create(model="tiny", prompt="x", max_tokens=1).choices


def test_a_refused_batch_leaves_nothing_in_the_queue():
    engine = Engine(zoo(), max_queue=4)  # not started: what is queued stays queued
    with pytest.raises(QueueFullError):
        engine.submit_many(["x"] * 6, None, [SamplingParams(max_tokens=2)] * 6, tenant="a")
    assert engine.stats()["waiting"] == 0
    engine.submit_many(["x"] * 4, None, [SamplingParams(max_tokens=2)] * 4, tenant="b")
    engine.stop(drain=False)


def test_cancelled_requests_take_no_room_in_the_queue():
    engine = Engine(zoo(), max_queue=4)
    handles = engine.submit_many(["x"] * 4, None, [SamplingParams(max_tokens=2)] * 4, tenant="a")
    with pytest.raises(QueueFullError):
        engine.submit("y", None, SamplingParams(max_tokens=2), tenant="b")
    for h in handles:
        h.cancel()
    engine.submit_many(["y"] * 4, None, [SamplingParams(max_tokens=2)] * 4, tenant="b")  # room again
    engine.stop(drain=False)


def test_a_tenant_cannot_fill_more_than_its_share_of_the_queue():
    engine = Engine(zoo(), max_queue=8, max_queue_per_tenant=4)
    engine.submit_many(["x"] * 4, None, [SamplingParams(max_tokens=2)] * 4, tenant="flood")
    with pytest.raises(QueueFullError, match="share"):
        engine.submit("x", None, SamplingParams(max_tokens=2), tenant="flood")
    engine.submit("y", "b-lora", SamplingParams(max_tokens=2), tenant="other")  # the other tenant gets in
    engine.stop(drain=False)


def _steps_to_finish(engine: Engine, prompt: str, adapter: str, tenant: str) -> int:
    """Engine steps from a 4-token request's submission to its end, both counted on the engine
    thread: the submit runs between two steps, and the end is noted as the engine hands over the
    result, so however long this (test) thread is descheduled, no step is miscounted."""
    marks: dict[str, int] = {}

    def submit():
        handle = engine.submit(prompt, adapter, SamplingParams(max_tokens=4, ignore_eos=True), tenant=tenant)
        marks["start"] = engine.steps
        push = handle._push

        def push_and_mark(kind, value):
            if kind == "done":
                marks["end"] = engine.steps
            push(kind, value)

        handle._push = push_and_mark
        return handle

    done = engine.call_between_steps(submit).result(60).result(120)
    assert done.error is None and done.completion_tokens == 4
    return marks["end"] - marks["start"]


def _steps_waited(max_rows_per_tenant: int | None) -> tuple[int, int]:
    """Tenant "flood" sends three 8-prompt batches of 160 tokens; then tenant "b" sends one
    4-token request. Returns (steps b took, steps b takes alone)."""
    z = zoo()
    with Engine(z, max_batch=4, max_rows_per_tenant=max_rows_per_tenant) as engine:
        idle = _steps_to_finish(engine, "hello", "b-lora", "b")
        flood = []
        for _ in range(3):
            # long rows: even if this thread is descheduled for a while, the flood is still running
            flood += engine.submit_many(
                ["abc"] * 8, "a-lora", [SamplingParams(max_tokens=160, ignore_eos=True)] * 8, tenant="flood"
            )
        while engine.stats()["running"] < 3:
            time.sleep(0.001)
        waited = _steps_to_finish(engine, "hello", "b-lora", "b")
        for h in flood:
            h.cancel()
    return waited, idle


def test_a_flooding_tenant_does_not_starve_another():
    """With a row share, the 4-token request joins at the next step and takes about as many steps
    as alone (it shares each step with the flood's rows); without one, it waits for the flood."""
    waited, idle = _steps_waited(max_rows_per_tenant=3)
    assert waited <= 2 * idle + 1, (waited, idle)
    unfair, _ = _steps_waited(max_rows_per_tenant=None)
    assert unfair > 2 * idle + 1, unfair  # the test can tell starvation from fairness


def test_admission_is_round_robin_across_tenants():
    engine = Engine(zoo())
    a = engine.submit_many(["x"] * 3, None, [SamplingParams(max_tokens=1)] * 3, tenant="a")
    b = engine.submit_many(["y"] * 2, None, [SamplingParams(max_tokens=1)] * 2, tenant="b")
    order = [r.handle for r in engine._in_turn(list(engine._waiting))]
    assert order[:4] in ([b[0], a[0], b[1], a[1]], [a[0], b[0], a[1], b[1]]) and order[4] is a[2]
    engine.stop(drain=False)


def test_the_server_gives_fair_shares_by_default_with_several_tenants(tiny_base):
    base = Zoo.from_pretrained(tiny_base, device="cpu")
    two = Tenants.from_dict({"tenants": {"a": {"keys": ["ka"]}, "b": {"keys": ["kb"]}}})
    server = build_server(base, base_name="tiny", tenants=two, max_batch=16, max_queue=64)
    assert server.engine.max_queue_per_tenant == 32 and server.engine.max_rows_per_tenant == 14
    alone = build_server(base, base_name="tiny", tenants=Tenants.open())
    assert alone.engine.max_queue_per_tenant is None and alone.engine.max_rows_per_tenant is None
