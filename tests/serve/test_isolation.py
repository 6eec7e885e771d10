"""One request's failure is that request's alone: two tenants run at once, one of them sends what
used to take the whole batch down, the other's requests must still equal their solo runs, and
every request taken from the queue must end and release its adapter."""

from __future__ import annotations

import collections
import threading
import time

import pytest
import torch

from adapterzoo.errors import BatchError
from adapterzoo.serve import Engine, SamplingParams
from adapterzoo.serve import engine as engine_module
from adapterzoo.serve.engine import RequestFailedError
from adapterzoo.serve.resolver import HostResolver
from adapterzoo.testing.models import tiny_zoo

from .conftest import TYPE_NAMES, make_adapters

GOOD = [
    ("hello", "lora"),
    ("abc ->", "houlsby"),
    ("the quick brown", "prefix"),
    ("zz top", "prompt"),
    ("1 2 3", "bitfit"),
    ("q", None),
]


class CountingResolver(HostResolver):
    """The zoo's adapters, counting what requests hold: every acquire must be released."""

    def __init__(self, zoo):
        super().__init__(zoo)
        self.held: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def acquire(self, name: str) -> None:
        with self.lock:
            self.held[name] += 1

    def release(self, name: str) -> None:
        with self.lock:
            self.held[name] -= 1

    def in_use(self) -> dict[str, int]:
        with self.lock:
            return {k: v for k, v in self.held.items() if v}


@pytest.fixture
def zoo():
    zoo = tiny_zoo("llama", slots=16)
    make_adapters(zoo, None, TYPE_NAMES)
    make_adapters(zoo, None, ["bad"], seed0=3)  # a LoRA, made to misbehave per test
    return zoo


def solo(zoo, prompt, adapter, n):
    return zoo.generate([prompt], [adapter], max_new_tokens=n)[0]


def run_tenant_a(engine: Engine, n: int = 12):
    """Tenant A's requests, all six types and the base, decoding for a while."""
    return [(p, a, engine.submit(p, a, SamplingParams(max_tokens=n), tenant="a")) for p, a in GOOD]


def assert_tenant_a_unharmed(zoo, jobs, n: int = 12):
    for prompt, adapter, handle in jobs:
        done = handle.result(60)
        assert done.error is None, done.error
        assert done.text == solo(zoo, prompt, adapter, n), (prompt, adapter)


def wait_for_steps(engine: Engine, steps: int) -> None:
    deadline = time.monotonic() + 30
    while engine.steps < steps and time.monotonic() < deadline:
        time.sleep(0.002)


def test_a_tiny_temperature_is_greedy_and_harms_no_one(zoo):
    resolver = CountingResolver(zoo)
    with Engine(zoo, resolver=resolver) as engine:
        jobs = run_tenant_a(engine)
        wait_for_steps(engine, 2)
        b = engine.submit("x", "lora", SamplingParams(max_tokens=4, temperature=1e-40), tenant="b").result(60)
        assert_tenant_a_unharmed(zoo, jobs)
    assert b.error is None and b.text == solo(zoo, "x", "lora", 4)
    assert resolver.in_use() == {}


def test_a_nan_adapter_fails_only_its_own_request(zoo):
    with torch.no_grad():
        for t in zoo.get_adapter("bad").parameters():
            t.fill_(float("nan"))
    resolver = CountingResolver(zoo)
    with Engine(zoo, resolver=resolver) as engine:
        jobs = run_tenant_a(engine)
        wait_for_steps(engine, 2)
        bad = [engine.submit("x", "bad", SamplingParams(max_tokens=4, temperature=t), tenant="b") for t in (1.0, 0.0)]
        results = [h.result(60) for h in bad]
        assert_tenant_a_unharmed(zoo, jobs)
        after = engine.submit("hello", "lora", SamplingParams(max_tokens=5), tenant="b").result(60)
    for done in results:
        assert done.finish_reason == "error" and isinstance(done.error, RequestFailedError)
        assert "NaN" in str(done.error) and "'bad'" in str(done.error)
    assert after.text == solo(zoo, "hello", "lora", 5)
    assert resolver.in_use() == {}


def _raise_for(zoo, monkeypatch, adapter: str, *, at: str):
    """Make `zoo.forward` raise for any batch that has a row of `adapter`, at prefill or decode
    (and `zoo.forward_tokens`, the decode step that joiners join, for any such step)."""
    forward = zoo.forward

    def flaky(input_ids, attention_mask=None, adapters=None, *, plan=None, cache=None, **kw):
        names = adapters if adapters is not None else (plan.names if plan is not None else [])
        decoding = cache is not None and cache.get_seq_length() > 0
        if adapter in names and decoding == (at == "decode"):
            raise RuntimeError(f"adapter kernel crashed (simulated, {at})")
        return forward(input_ids, attention_mask, adapters, plan=plan, cache=cache, **kw)

    monkeypatch.setattr(zoo, "forward", flaky)
    forward_tokens = zoo.forward_tokens

    def flaky_tokens(tokens, positions, plan, *args, **kw):  # a step of running rows and joiners (ragged.py)
        if adapter in plan.names:  # its kernel crashes whichever rows it has: they go apart, and fail there
            raise RuntimeError(f"adapter kernel crashed (simulated, {at})")
        return forward_tokens(tokens, positions, plan, *args, **kw)

    monkeypatch.setattr(zoo, "forward_tokens", flaky_tokens)


@pytest.mark.parametrize("at", ["prefill", "decode"])
def test_an_adapter_that_raises_fails_only_its_own_request(zoo, monkeypatch, at):
    reference = {(p, a): solo(zoo, p, a, 12) for p, a in GOOD}
    _raise_for(zoo, monkeypatch, "bad", at=at)
    resolver = CountingResolver(zoo)
    with Engine(zoo, resolver=resolver) as engine:
        jobs = run_tenant_a(engine)
        wait_for_steps(engine, 2)
        bad = engine.submit("x", "bad", SamplingParams(max_tokens=6), tenant="b").result(60)
        for prompt, adapter, handle in jobs:
            done = handle.result(60)
            assert done.error is None and done.text == reference[(prompt, adapter)]
    assert bad.finish_reason == "error" and isinstance(bad.error, RequestFailedError)
    assert "'bad'" in str(bad.error) and at in str(bad.error)
    assert resolver.in_use() == {}


def test_a_sampling_error_fails_only_that_request(zoo, monkeypatch):
    real = engine_module.sample_next

    def picky(logits, **kw):
        if kw["temperature"] == 0.77:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, **kw)

    monkeypatch.setattr(engine_module, "sample_next", picky)
    resolver = CountingResolver(zoo)
    with Engine(zoo, resolver=resolver) as engine:
        jobs = run_tenant_a(engine)
        wait_for_steps(engine, 2)
        bad = engine.submit("x", "bitfit", SamplingParams(max_tokens=4, temperature=0.77), tenant="b").result(60)
        assert_tenant_a_unharmed(zoo, jobs)
    assert bad.finish_reason == "error" and "sampling failed" in str(bad.error)
    assert resolver.in_use() == {}


def test_out_of_vocabulary_token_ids_are_refused_before_queueing(zoo):
    with Engine(zoo) as engine:
        for ids in ([1_000_000], [-1], [5, engine.vocab_size]):
            with pytest.raises(BatchError, match="vocabulary"):
                engine.submit(ids, "lora", SamplingParams(max_tokens=2))
        with pytest.raises(BatchError, match="stop_token_ids"):
            engine.submit([5], None, SamplingParams(max_tokens=2, stop_token_ids=(10**9,)))
        assert engine.stats()["waiting"] == 0
        assert engine.submit([5, 6], None, SamplingParams(max_tokens=2)).result(30).error is None


def test_every_request_taken_ends_and_releases_its_adapter_when_a_step_breaks(zoo, monkeypatch):
    """A bug in the engine itself (here: merging into the batch raises once) ends every request
    it had taken, joining or running, and the engine serves the next ones."""
    resolver = CountingResolver(zoo)
    merge = Engine._merge
    broken = []

    def merge_once(self, *args):
        if not broken:
            broken.append(True)
            raise RuntimeError("simulated engine bug")
        return merge(self, *args)

    monkeypatch.setattr(Engine, "_merge", merge_once)
    with Engine(zoo, resolver=resolver) as engine:
        first = [h.result(30) for *_, h in run_tenant_a(engine)]
        assert any(d.finish_reason == "error" for d in first)
        assert all(d.finish_reason in ("error", "length", "stop") for d in first)
        assert_tenant_a_unharmed(zoo, run_tenant_a(engine))
    assert resolver.in_use() == {}


@pytest.mark.parametrize("at", ["prefill", "decode"])
def test_the_watchdog_reports_a_stuck_request_until_it_moves(zoo, monkeypatch, at):
    gate = threading.Event()
    forward = zoo.forward

    def hanging(*args, cache=None, **kw):
        decoding = cache is not None and cache.get_seq_length() > 0
        if decoding == (at == "decode"):
            gate.wait(30)
        return forward(*args, cache=cache, **kw)

    monkeypatch.setattr(zoo, "forward", hanging)
    with Engine(zoo, stuck_after=0.2) as engine:
        handle = engine.submit("hello", "lora", SamplingParams(max_tokens=3), tenant="a")
        deadline = time.monotonic() + 10
        while not engine.stuck() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stuck() == [handle.id] and not engine.healthy()
        gate.set()
        assert handle.result(30).error is None
        assert engine.stuck() == [] and engine.healthy()


def test_after_a_failed_request_its_adapter_unloads_at_once(zoo, tmp_path):
    """The issue's symptom: a failed request's adapter stayed "in use" for ever, so unloading it
    answered "pending" for ever and it could never be evicted."""
    from adapterzoo.serve.tenants import Tenant, Tenants
    from adapterzoo.serve.tiers import Tiers

    with torch.no_grad():
        for t in zoo.get_adapter("bad").parameters():
            t.fill_(float("nan"))
    tenants = Tenants([Tenant("a"), Tenant("b")], public=["*"])
    router = Tiers(zoo, spill_dir=tmp_path / "spill", tenants=tenants)
    with Engine(zoo, resolver=router) as engine:
        jobs = run_tenant_a(engine)
        wait_for_steps(engine, 2)
        failed = engine.submit("x", "bad", SamplingParams(max_tokens=4, temperature=1e-40), tenant="b").result(60)
        assert_tenant_a_unharmed(zoo, jobs)
        assert failed.finish_reason == "error"
        assert router.in_use("bad") == 0
        assert router.unload("bad") is True  # done now, not "pending"
    router.close()
