"""Attacks, round 4: on grouped prefills (joiners held up to `prefill_wait` steps so that
`prefill_group` requests share one prefill) and on the KV cache that appends into spare room.
Each hole found is written here as the attack first (it failed before its fix)."""

from __future__ import annotations

import collections
import time

import torch
from transformers import DynamicCache

from adapterzoo.serve import Engine, SamplingParams
from adapterzoo.serve.resolver import HostResolver
from adapterzoo.testing.models import output, perturb, tiny_zoo

from .test_fairness import _steps_to_finish, zoo


def test_a_tenant_at_its_row_share_does_not_hold_back_another_tenants_first_prefill():
    """Tenant "flood" fills its row share and queues many more requests, which cannot join until
    its own rows end. Tenant "b"'s lone 4-token request must not be held back waiting for them
    to share its prefill (it was held `prefill_wait` steps: 9 steps against 3 alone)."""
    with Engine(zoo(), max_batch=16, max_rows_per_tenant=3, prefill_group=4, prefill_wait=6) as engine:
        idle = _steps_to_finish(engine, "hello", "b-lora", "b")
        flood = engine.submit_many(
            ["abc"] * 12, "a-lora", [SamplingParams(max_tokens=160, ignore_eos=True)] * 12, tenant="flood"
        )
        while engine.stats()["running"] < 3:
            time.sleep(0.001)
        waited = _steps_to_finish(engine, "hello", "b-lora", "b")
        for h in flood:
            h.cancel()
    assert waited <= idle + 1, (waited, idle)


class CountingResolver(HostResolver):
    """The zoo's host memory, counting each adapter's holds (an unload waits until they are 0)."""

    def __init__(self, zoo):
        super().__init__(zoo)
        self.holds: collections.Counter[str] = collections.Counter()

    def acquire(self, name: str) -> None:
        self.holds[name] += 1

    def release(self, name: str) -> None:
        self.holds[name] -= 1


def _held_group(engine: Engine) -> tuple:
    """A long base row fills one of two rows; then three "b-lora" requests come at once: one has a
    row, two wait for rows, so the one is held to share their prefill (engines that prefill joiners
    apart, `join_in_step=False`). Returns (long, the three)."""
    long = engine.submit("abc", None, SamplingParams(max_tokens=40, ignore_eos=True), tenant="x")
    while engine.stats()["running"] < 1:
        time.sleep(0.001)
    three = engine.submit_many(["hi"] * 3, "b-lora", [SamplingParams(max_tokens=2, ignore_eos=True)] * 3, tenant="b")
    start = engine.steps
    while engine.steps < start + 4:
        time.sleep(0.001)
    return long, three


def test_a_held_group_that_is_cancelled_leaves_no_row_and_no_hold_on_its_adapter():
    resolver = CountingResolver(zoo())
    with Engine(
        zoo(), max_batch=2, prefill_group=4, prefill_wait=10_000, resolver=resolver, join_in_step=False
    ) as engine:
        long, three = _held_group(engine)
        assert engine.stats()["waiting"] == 3 and engine.stats()["running"] == 1  # held, not joined
        for h in three:
            h.cancel()
        assert all(h.result(30).finish_reason == "cancelled" for h in three)
        assert resolver.holds["b-lora"] == 0  # an unload of b-lora may complete now
        assert engine.stats()["waiting"] == 0 and engine.stats()["running"] == 1
        long.cancel()


def test_a_draining_stop_finishes_held_joiners():
    with Engine(zoo(), max_batch=2, prefill_group=4, prefill_wait=10_000, join_in_step=False) as engine:
        long, three = _held_group(engine)
        engine.stop(drain=True, timeout=60)
    assert long.result(1).finish_reason == "length"
    assert [h.result(1).finish_reason for h in three] == ["length"] * 3


def test_the_roomy_kv_cache_equals_a_plain_one_with_prefixes_dropped_rows_and_growth_past_its_room():
    """`zoo.new_cache()` appends in place into spare room; rows leaving (`batch_select_indices`),
    columns cut (as `RunningBatch.trim` does) and 150 steps (past its 64 spare columns, twice)
    must give exactly the logits of transformers' own cache."""
    z = tiny_zoo("llama", slots=4)
    for i, (name, kind, config) in enumerate(
        [
            ("lora", "lora", {"r": 4, "init_lora_weights": False}),
            ("prefix", "prefix", {"num_virtual_tokens": 3}),
            ("prompt", "soft_prompt", {"num_virtual_tokens": 2}),
        ]
    ):
        z.add_adapter(name, kind, seed=i, trainable=False, **config)
        perturb(z, name, seed=i)
    names = ["prefix", None, "lora", "prompt", "prefix"]
    prompt = torch.randint(4, 100, (5, 7), generator=torch.Generator().manual_seed(0))

    def decode(cache) -> list[torch.Tensor]:
        rows = list(names)
        with torch.inference_mode():
            out = z.forward(prompt, None, rows, cache=cache)
            cache, mask, logits = out.cache, out.attention_mask, []
            for step in range(150):
                if step == 30:  # rows 1 and 4 leave
                    keep = torch.tensor([0, 2, 3])
                    cache.batch_select_indices(keep)
                    mask, rows = mask.index_select(0, keep), [rows[i] for i in keep]
                if step == 90:  # the oldest column is cut
                    for layer in cache.layers:
                        layer.keys, layer.values = layer.keys[..., 1:, :], layer.values[..., 1:, :]
                    mask = mask[:, 1:]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out = z.forward(torch.full((len(rows), 1), 5 + step % 50), mask, rows, cache=cache)
                cache = out.cache
                logits.append(output(out)[:, -1].clone())
        return logits

    for roomy, plain in zip(decode(z.new_cache()), decode(DynamicCache(config=z.model.config))):
        torch.testing.assert_close(roomy, plain, atol=0, rtol=0)
