"""Automatic prefix caching: a request that opens like an earlier one reuses its prompt blocks'
keys and values, and still gets exactly what it gets alone; blocks never cross tenants or adapters."""

from __future__ import annotations

import pytest
import torch

from adapterzoo.serve import Engine, SamplingParams
from adapterzoo.serve.prefix_cache import BLOCK, PrefixCache
from adapterzoo.testing.models import tiny_zoo

from .conftest import TYPE_NAMES, make_adapters

OPENING = "the quick brown fox jumps over the lazy dog and runs "  # 53 characters: 3 full blocks
TAILS = ["far away ->", "home ->", "x", "into the woods, then back again ->"]


@pytest.fixture(scope="module")
def zoo():
    zoo = tiny_zoo("llama")
    make_adapters(zoo, None, TYPE_NAMES)
    return zoo


def params(**kw):
    return SamplingParams(max_tokens=6, logprobs=1, **kw)


def run(engine, jobs):
    """Submit (prompt, adapter, tenant) jobs at once; their completions."""
    handles = [engine.submit(p, a, params(), tenant=t) for p, a, t in jobs]
    return [h.result(60) for h in handles]


def assert_same(done, alone):
    assert done.error is None and alone.error is None, (done.error, alone.error)
    assert done.token_ids == alone.token_ids
    for mine, theirs in zip(done.logprobs, alone.logprobs):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)


@pytest.mark.parametrize("adapter", [None, *TYPE_NAMES])
def test_a_request_that_opens_like_an_earlier_one_reuses_its_blocks_and_gets_its_solo_output(zoo, adapter):
    with Engine(zoo, prefix_cache_bytes=2**20) as cached, Engine(zoo) as plain:
        first = run(cached, [(OPENING + TAILS[0], adapter, "acme")])[0]
        hits_before = cached.prefix_cache.hit_tokens
        later = run(cached, [(OPENING + tail, adapter, "acme") for tail in TAILS[1:]])
        alone = run(plain, [(OPENING + tail, adapter, "acme") for tail in TAILS])
    virtual = zoo.token_lengths(adapter) != (0, 0) if adapter else False
    if virtual:  # soft prompt and prefix rows' positions start after their virtual tokens: never cached
        assert cached.prefix_cache.hit_tokens == 0 and not cached.prefix_cache.blocks
    else:
        assert cached.prefix_cache.hit_tokens - hits_before == 3 * BLOCK * len(later)
    for done, solo in zip([first, *later], alone):
        assert_same(done, solo)


def test_rows_with_different_cached_openings_join_with_uncached_rows_and_get_their_solo_output(zoo):
    """A row with 3 cached blocks, one with 1, and rows with none (another adapter, the base, a
    soft prompt's group), submitted at once: in one prefill or several, as the engine admits them."""
    jobs = [
        (OPENING + "far away ->", "lora", "acme"),
        (OPENING[:20] + "something else entirely ->", "lora", "acme"),
        ("a fresh prompt with no cached opening at all ->", "lora", "acme"),
        (OPENING + "home ->", None, "acme"),
        (OPENING + "home ->", "prompt", "acme"),
    ]
    with Engine(zoo, prefix_cache_bytes=2**20, max_batch=8) as cached, Engine(zoo, max_batch=8) as plain:
        run(cached, [(OPENING + "warm ->", "lora", "acme")])
        got = run(cached, jobs)
        alone = [run(plain, [job])[0] for job in jobs]
    assert cached.prefix_cache.hit_tokens == 3 * BLOCK + 1 * BLOCK
    for done, solo in zip(got, alone):
        assert_same(done, solo)


def test_blocks_are_never_shared_across_tenants_or_adapters(zoo):
    prompt = OPENING + "far away ->"
    with Engine(zoo, prefix_cache_bytes=2**20) as engine:
        run(engine, [(prompt, "lora", "acme")])
        run(engine, [(prompt, "lora", "globex"), (prompt, "houlsby", "acme"), (prompt, None, "acme")])
        assert engine.prefix_cache.hit_tokens == 0  # a hit is a timing signal: other tenants get none
        run(engine, [(prompt, "lora", "acme")])
        assert engine.prefix_cache.hit_tokens == 3 * BLOCK


def test_a_reloaded_adapter_never_meets_the_blocks_of_the_one_it_replaced():
    zoo = tiny_zoo("llama")
    zoo.add_adapter("spec", "lora", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, seed=1)
    prompt = OPENING + "far away ->"
    with Engine(zoo, prefix_cache_bytes=2**20) as engine:
        run(engine, [(prompt, "spec", None)])
        zoo.remove_adapter("spec")
        zoo.add_adapter("spec", "lora", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, seed=2)
        again = run(engine, [(prompt, "spec", None)])[0]
        assert engine.prefix_cache.hit_tokens == 0
        with torch.no_grad():  # trained in place: a new version, so new blocks again
            next(iter(zoo.get_adapter("spec").parameters())).add_(0.5)
        edited = run(engine, [(prompt, "spec", None)])[0]
        assert engine.prefix_cache.hit_tokens == 0
    with Engine(zoo) as plain:
        assert_same(edited, run(plain, [(prompt, "spec", None)])[0])
    assert again.token_ids != edited.token_ids or again.logprobs[0].logprob != edited.logprobs[0].logprob


def test_the_cache_keeps_to_its_budget_dropping_the_least_recently_used_blocks():
    block = torch.zeros(2, 2, 2, BLOCK, 8)
    size = block.numel() * block.element_size()
    cache = PrefixCache(3 * size)
    first, second = list(range(100, 100 + 2 * BLOCK + 1)), list(range(500, 500 + 2 * BLOCK + 1))
    cache.store("t", first, torch.zeros(2, 2, 2, len(first), 8), 0)
    assert cache.lookup("t", first)[0] == 2 * BLOCK
    cache.store("t", second, torch.zeros(2, 2, 2, len(second), 8), 0)
    assert cache.bytes <= 3 * size and cache.evictions == 1
    assert cache.lookup("t", first)[0] == BLOCK  # its second block was the least recently used
    assert cache.lookup("other tenant", second)[0] == 0
    tiny = PrefixCache(size - 1)  # not even one block fits
    tiny.store("t", first, torch.zeros(2, 2, 2, len(first), 8), 0)
    assert not tiny.blocks and tiny.bytes == 0


def test_a_prompt_always_leaves_one_token_to_compute():
    cache = PrefixCache(2**20)
    ids = list(range(3, 3 + 2 * BLOCK))  # exactly two blocks
    cache.store(None, ids, torch.zeros(1, 2, 1, len(ids), 4), 0)
    tokens, kv = cache.lookup(None, ids)
    assert tokens == BLOCK and kv.shape[3] == BLOCK  # the second block holds the last token


def test_requests_that_arrive_together_with_one_opening_compute_it_once(zoo):
    """A leader is prefilled first; the others of the same prefill find its blocks cached."""
    jobs = [(OPENING + tail, "lora", "acme") for tail in TAILS]
    cached = Engine(zoo, prefix_cache_bytes=2**20, max_batch=8)
    handles = [cached.submit(p, a, params(), tenant=t) for p, a, t in jobs]  # queued before it starts:
    with cached, Engine(zoo, max_batch=8) as plain:  # its first step admits all four together
        got = [h.result(60) for h in handles]
        alone = [run(plain, [job])[0] for job in jobs]
    assert cached.prefix_cache.hit_tokens == 3 * BLOCK * (len(jobs) - 1)
    for done, solo in zip(got, alone):
        assert_same(done, solo)


def test_a_tenant_flooding_distinct_prompts_cannot_push_another_tenants_blocks_out_of_its_share():
    """Eviction takes a tenant's own least recently used blocks first once it holds more than an
    equal share of the budget: a flood of one-off prompts churns only its own blocks."""
    block = torch.zeros(2, 2, 2, BLOCK, 8)
    size = block.numel() * block.element_size()
    cache = PrefixCache(8 * size)
    mine = list(range(100, 100 + 3 * BLOCK + 1))
    cache.store(("acme", None), mine, torch.zeros(2, 2, 2, len(mine), 8), 0, owner="acme")
    for i in range(40):  # globex: 40 distinct two-block prompts
        theirs = [1000 + 50 * i + k for k in range(2 * BLOCK + 1)]
        cache.store(("globex", None), theirs, torch.zeros(2, 2, 2, len(theirs), 8), 0, owner="globex")
        assert cache.bytes <= cache.max_bytes
    assert cache.lookup(("acme", None), mine)[0] == 3 * BLOCK
    assert cache.held["globex"] <= 5 * size  # its share of 8 blocks, less acme's 3
