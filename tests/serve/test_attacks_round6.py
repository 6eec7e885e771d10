"""Attacks on joiners prefilled inside the running rows' decode step (serve/ragged.py), as a
hostile tenant (or a careless training thread) would try them. Each test is one attack; its
docstring says what it tries."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from adapterzoo.serve import Engine, SamplingParams
from adapterzoo.serve.ragged import JoinStep
from adapterzoo.testing.models import ONE_OF_EACH, perturb, tiny_zoo

from .conftest import TYPE_NAMES, make_adapters

LONG = "the opening every request of tenant a shares, long enough for blocks: "


def _zoo(slots: int = 8):
    zoo = tiny_zoo("llama", slots=slots)
    make_adapters(zoo, None, TYPE_NAMES)
    return zoo


def _solo(zoo, prompt, adapter, n):
    return zoo.generate([prompt], [adapter], max_new_tokens=n)[0]


def _add(zoo, name, kind, seed, **config):
    type_name, base = ONE_OF_EACH[kind]
    zoo.add_adapter(name, type_name, seed=seed, trainable=False, **{**base, **config})
    perturb(zoo, name, scale=1.0, seed=seed)


def _wait_steps(engine, n):
    while engine.steps < n:
        time.sleep(0.002)


def _in_one_step(engine, jobs):
    """Submit `jobs` [(prompt, adapter, params, tenant)] between two steps, so that all of them are
    waiting at the same admission."""
    return engine.call_between_steps(
        lambda: [engine.submit(p, a, params, tenant=t) for p, a, params, t in jobs]
    ).result(30)


@pytest.mark.parametrize("kind, hooked", [("prompt", "virtual_tokens"), ("prefix", "write_prefixes")])
def test_a_training_threads_plan_between_a_joiners_plan_and_its_step_never_gives_it_another_tenants_vectors(
    kind, hooked
):
    """Attack: tenant b's soft prompt (or prefix) shares the one slot of tenant a's. A training thread plans b's
    adapter just after the engine planned a joiner of tenant a for the step and before it reads the
    joiner's virtual vectors (or prefix keys): a must get its own vectors, never b's."""
    zoo = tiny_zoo("llama", slots=1)
    _add(zoo, "a", kind, seed=1)
    _add(zoo, "b", kind, seed=2)
    want = _solo(zoo, "zz top", "a", 6)
    assert want != _solo(zoo, "zz top", "b", 6)
    target = zoo if hooked == "virtual_tokens" else zoo.runtime
    real = getattr(target, hooked)
    seen = []

    def training_plans_b_meanwhile(*args, **kwargs):
        if not seen and threading.current_thread().name != "MainThread":

            def train():
                if zoo.exclusive().acquire(blocking=False):  # the engine does not hold the zoo
                    try:
                        zoo.plan(["b"], training=False)
                        seen.append("planned b in between")
                    finally:
                        zoo.exclusive().release()
                else:
                    seen.append("the engine held the zoo")

            t = threading.Thread(target=train)
            t.start()
            t.join()
        return real(*args, **kwargs)

    with Engine(zoo, max_batch=4) as engine:
        running = engine.submit("the quick brown", None, SamplingParams(max_tokens=20, ignore_eos=True))
        _wait_steps(engine, 2)
        setattr(target, hooked, training_plans_b_meanwhile)
        try:
            joiner = engine.submit("zz top", "a", SamplingParams(max_tokens=6), tenant="a").result(60)
        finally:
            delattr(target, hooked)
        assert engine.stats()["joined_in_step"] == 1
        assert running.result(60).error is None
    assert seen
    assert joiner.error is None and joiner.text == want, seen


def test_a_soft_prompt_joiner_in_the_same_step_does_not_cost_another_tenants_joiner_its_cached_opening():
    """Attack: tenant b sends soft-prompt (and prefix) requests so that they join the same decode
    step as tenant a's request with a cached opening. Before, any joiner with virtual tokens
    switched the prefix cache off for the whole step: a recomputed its whole opening."""
    zoo = _zoo()
    prompt_a1, prompt_a2 = LONG + "first", LONG + "second"
    with Engine(zoo, max_batch=6, prefix_cache_bytes=1 << 24) as engine:
        engine.submit(prompt_a1, "lora", SamplingParams(max_tokens=2), tenant="a").result(60)
        running = engine.submit("the quick brown", None, SamplingParams(max_tokens=30, ignore_eos=True))
        _wait_steps(engine, 2)
        before = engine.stats()["joined_in_step"]
        handles = _in_one_step(
            engine,
            [
                (prompt_a2, "lora", SamplingParams(max_tokens=5), "a"),
                ("hello", "prompt", SamplingParams(max_tokens=5), "b"),
                ("abc ->", "prefix", SamplingParams(max_tokens=5), "b"),
                ("x", None, SamplingParams(max_tokens=5), "b"),
            ],
        )
        results = [h.result(60) for h in handles]
        assert engine.stats()["joined_in_step"] - before == 4
        assert running.result(60).error is None
    assert results[0].cached_tokens >= 16 * ((len(LONG) + 1) // 16 - 1)
    for done, (prompt, adapter) in zip(
        results, [(prompt_a2, "lora"), ("hello", "prompt"), ("abc ->", "prefix"), ("x", None)]
    ):
        assert done.error is None and done.text == _solo(zoo, prompt, adapter, 5), adapter


def _before_the_step(engine, meanwhile) -> None:
    """The next decode step that requests join first runs `meanwhile(joiners)`: after the joiners'
    admission, before their step (once)."""
    real = engine._decode_and_join

    def step(joiners):
        meanwhile(joiners)
        engine._decode_and_join = real
        return real(joiners)

    engine._decode_and_join = step


def _replace_before_the_step(engine, zoo, name: str, virtual_tokens: int) -> None:
    """Before the joiners' step, soft prompt `name` is replaced by one with `virtual_tokens` tokens."""

    def replaced_meanwhile(joiners):
        zoo.remove_adapter(name)
        _add(zoo, name, "prompt", seed=6, num_virtual_tokens=virtual_tokens)

    _before_the_step(engine, replaced_meanwhile)


def test_a_soft_prompt_replaced_by_a_longer_one_between_admission_and_the_step_gives_the_new_ones_solo_output():
    """Attack: a tenant replaces its soft prompt (4 virtual tokens -> 7) after its request was
    admitted and before the step it joins: the request must not run with 4 of the 7 new vectors."""
    zoo = _zoo()
    _add(zoo, "mine", "prompt", seed=5)
    with Engine(zoo, max_batch=4) as engine:
        running = engine.submit("the quick brown", "lora", SamplingParams(max_tokens=20, ignore_eos=True))
        _wait_steps(engine, 2)
        _replace_before_the_step(engine, zoo, "mine", virtual_tokens=7)
        done = engine.submit("hello", "mine", SamplingParams(max_tokens=6)).result(60)
        assert running.result(60).error is None
    assert done.error is None and done.text == _solo(zoo, "hello", "mine", 6)


def test_seeded_sampling_penalties_logprobs_and_n_joining_inside_a_step_equal_joining_apart():
    zoo = _zoo()
    params = [
        SamplingParams(max_tokens=6, temperature=0.9, seed=7, logprobs=2),
        SamplingParams(max_tokens=6, temperature=1.3, top_k=5, seed=3, presence_penalty=0.5),
        SamplingParams(max_tokens=6, temperature=0.7, top_p=0.8, seed=11, repetition_penalty=1.3),
        SamplingParams(max_tokens=6, frequency_penalty=1.0, logprobs=1),
    ]
    jobs = [
        (p, a, params[i % 4])
        for i, (p, a) in enumerate(
            [
                ("hello", "prompt"),
                ("abc ->", "prefix"),
                ("x", "lora"),
                ("zz top", None),
                ("1 2 3", "houlsby"),
                ("q", "bitfit"),
            ]
        )
    ]
    out = {}
    for flag in (True, False):
        with Engine(zoo, max_batch=8, join_in_step=flag) as engine:
            running = engine.submit("the quick brown", "adapterbias", SamplingParams(max_tokens=20, ignore_eos=True))
            _wait_steps(engine, 2)
            handles = _in_one_step(engine, [(p, a, s, "t") for p, a, s in jobs])
            handles += _in_one_step(engine, [(p, a, s, "u") for p, a, s in jobs])  # the same again: n = 2
            out[flag] = [h.result(60) for h in handles] + [running.result(60)]
            out[flag, "in step"] = engine.stats()["joined_in_step"]
    assert out[True, "in step"] == 12 and out[False, "in step"] == 0
    for mine, theirs in zip(out[True], out[False]):
        assert mine.error is None and mine.token_ids == theirs.token_ids
        for a, b in zip(mine.logprobs or [], theirs.logprobs or []):
            assert abs(a.logprob - b.logprob) < 1e-4
    for i in range(len(jobs)):
        assert out[True][i].token_ids == out[True][i + len(jobs)].token_ids  # the same seed: the same tokens


def test_a_step_where_every_joiner_fails_fails_only_them_and_the_running_rows_stay_exact():
    zoo = _zoo()
    for name in ("bad1", "bad2"):
        _add(zoo, name, "lora", seed=9)
        with torch.no_grad():
            for t in zoo.get_adapter(name).parameters():
                t.fill_(float("inf"))
    with Engine(zoo, max_batch=6) as engine:
        running = engine.submit("the quick brown", "houlsby", SamplingParams(max_tokens=12), tenant="a")
        _wait_steps(engine, 2)
        bad = _in_one_step(
            engine,
            [("hello", "bad1", SamplingParams(max_tokens=4), "b"), ("abc", "bad2", SamplingParams(max_tokens=4), "b")],
        )
        bad = [h.result(60) for h in bad]
        running = running.result(60)
    assert all(b.finish_reason == "error" for b in bad)
    assert running.error is None and running.text == _solo(zoo, "the quick brown", "houlsby", 12)


def test_a_step_that_raises_after_some_layers_wrote_both_caches_runs_again_apart_exactly():
    """An exception in the middle of the step (after layer 0 appended to the running cache and the
    joiners' cache): the running rows' cache is cut back, the joiners prefill apart, and every
    output is the solo one."""
    zoo = _zoo()
    real = JoinStep.update
    raised = []

    def update(self, keys, values, layer_idx, *args, **kwargs):
        out = real(self, keys, values, layer_idx, *args, **kwargs)
        if layer_idx == 1 and not raised:
            raised.append(1)
            raise RuntimeError("boom after layer 1 wrote")
        return out

    jobs = [("hello", "prompt"), ("abc ->", "lora"), ("x", None)]
    with Engine(zoo, max_batch=6) as engine:
        running = engine.submit("the quick brown", "prefix", SamplingParams(max_tokens=14, ignore_eos=True))
        _wait_steps(engine, 2)
        JoinStep.update = update
        try:
            handles = _in_one_step(engine, [(p, a, SamplingParams(max_tokens=5), "b") for p, a in jobs])
            results = [h.result(60) for h in handles]
        finally:
            JoinStep.update = real
        running = running.result(60)
    assert raised
    assert running.error is None and running.text == _solo(zoo, "the quick brown", "prefix", 14)
    for done, (p, a) in zip(results, jobs):
        assert done.error is None and done.text == _solo(zoo, p, a, 5), a


def test_nan_soft_prompt_vectors_and_inf_prefix_keys_joining_a_step_fail_alone_and_their_step_mates_stay_exact():
    zoo = _zoo()
    _add(zoo, "nan_prompt", "prompt", seed=3)
    _add(zoo, "inf_prefix", "prefix", seed=4)
    with torch.no_grad():
        for name, value in (("nan_prompt", float("nan")), ("inf_prefix", float("inf"))):
            for t in zoo.get_adapter(name).parameters():
                t.fill_(value)
    good = [("abc ->", "prompt"), ("x", "prefix"), ("zz top", None), ("1 2 3", "houlsby")]
    with Engine(zoo, max_batch=8) as engine:
        running = engine.submit("the quick brown", "lora", SamplingParams(max_tokens=12), tenant="a")
        _wait_steps(engine, 2)
        jobs = [("hello", "nan_prompt", "b"), ("q", "inf_prefix", "b")] + [(p, a, "a") for p, a in good]
        handles = _in_one_step(engine, [(p, a, SamplingParams(max_tokens=5), t) for p, a, t in jobs])
        results = [h.result(60) for h in handles]
        assert engine.stats()["joined_in_step"] >= len(good)
        running = running.result(60)
    assert all(r.finish_reason == "error" for r in results[:2])
    assert running.error is None and running.text == _solo(zoo, "the quick brown", "lora", 12)
    for done, (p, a) in zip(results[2:], good):
        assert done.error is None and done.text == _solo(zoo, p, a, 5), a


def test_a_plugin_type_without_the_zero_slot_promise_and_one_that_raises_for_many_rows_join_a_step_exactly():
    """A third-party delta type (no `zero_slot_is_identity`) joins inside a step; another raises
    whenever more than 4 rows use it at once (a joiner's 5+ tokens in one step): that step runs
    apart, and every output is still the solo one."""
    from tests.test_decode_plan_reuse import _Bottleneck, _registered

    class _Flaky(_Bottleneck):
        name = "round6_flaky"

        def delta(self, x, y, w, training):
            if x.shape[0] > 4:
                raise RuntimeError("too many rows")
            return super().delta(x, y, w, training)

    with _registered(_Bottleneck), _registered(_Flaky):
        zoo = _zoo()
        for name, kind in (("third", _Bottleneck.name), ("flaky", _Flaky.name)):
            zoo.add_adapter(name, kind, seed=9, trainable=False)
            perturb(zoo, name, seed=9)
        jobs = [("hello", "third"), ("abc ->", "flaky"), ("x", "prompt"), ("zz top", "lora")]
        want = [_solo(zoo, p, a, 5) for p, a in jobs]
        with Engine(zoo, max_batch=8) as engine:
            running = engine.submit("the quick brown", "third", SamplingParams(max_tokens=14, ignore_eos=True))
            _wait_steps(engine, 2)
            first = _in_one_step(engine, [(p, a, SamplingParams(max_tokens=5), "b") for p, a in jobs[:1]])
            first[0].result(60)
            assert engine.stats()["joined_in_step"] == 1  # the plugin type joined inside a step
            handles = _in_one_step(engine, [(p, a, SamplingParams(max_tokens=5), "b") for p, a in jobs])
            results = first + handles
            done = [h.result(60) for h in results]
            running = running.result(60)
        assert running.error is None
        assert [d.text for d in done] == [want[0], *want], [d.error for d in done]


def test_a_joiner_cancelled_between_admission_and_its_step_ends_cancelled_and_frees_its_row_and_adapter():
    zoo = _zoo()
    with Engine(zoo, max_batch=4) as engine:
        running = engine.submit("the quick brown", "lora", SamplingParams(max_tokens=16, ignore_eos=True))
        _wait_steps(engine, 2)
        _before_the_step(engine, lambda joiners: [r.handle.cancel() for r in joiners])
        handles = _in_one_step(
            engine,
            [("hello", "prompt", SamplingParams(max_tokens=8), "b"), ("abc", None, SamplingParams(max_tokens=8), "b")],
        )
        results = [h.result(60) for h in handles]
        running = running.result(60)
        engine.submit("q", None, SamplingParams(max_tokens=2)).result(60)  # a step after they ended
        live = engine.call_between_steps(lambda: [r for r in engine._batch.rows if not r.handle.done]).result(30)
    assert [r.finish_reason for r in results] == ["cancelled", "cancelled"]
    assert live == []
    assert running.error is None and running.text == _solo(zoo, "the quick brown", "lora", 16)


def test_a_joiner_whose_prompt_and_virtual_tokens_fill_the_context_exactly_joins_a_step_and_one_more_token_is_refused():
    zoo = _zoo()
    with Engine(zoo, max_batch=4) as engine:
        context = engine.context_length
        virtual = zoo.token_lengths("prompt")[0]
        prompt = ("abcdefghij" * 40)[: context - virtual - 3]
        running = engine.submit("the quick brown", "lora", SamplingParams(max_tokens=16, ignore_eos=True))
        _wait_steps(engine, 2)
        fits = engine.submit(prompt, "prompt", SamplingParams(max_tokens=3)).result(60)
        over = engine.submit(prompt + "a", "prompt", SamplingParams(max_tokens=3)).result(60)
        assert engine.stats()["joined_in_step"] == 1
        assert running.result(60).error is None
    assert fits.error is None and fits.text == _solo(zoo, prompt, "prompt", 3)
    assert over.finish_reason == "error" and "context length" in str(over.error)


def test_an_adapter_removed_between_admission_and_the_step_fails_or_refetches_its_own_request_only():
    zoo = _zoo()
    with Engine(zoo, max_batch=4) as engine:
        running = engine.submit("the quick brown", "houlsby", SamplingParams(max_tokens=16, ignore_eos=True))
        _wait_steps(engine, 2)
        _before_the_step(engine, lambda joiners: zoo.remove_adapter("bitfit"))
        handles = _in_one_step(
            engine,
            [
                ("hello", "bitfit", SamplingParams(max_tokens=5), "b"),
                ("abc ->", "lora", SamplingParams(max_tokens=5), "a"),
            ],
        )
        gone, other = [h.result(60) for h in handles]
        running = running.result(60)
    assert gone.finish_reason == "error" and "bitfit" in str(gone.error)
    assert other.error is None and other.text == _solo(zoo, "abc ->", "lora", 5)
    assert running.error is None and running.text == _solo(zoo, "the quick brown", "houlsby", 16)


def test_huge_prompts_joining_a_running_batch_keep_to_the_prefill_budget_and_the_running_row_a_token_a_forward():
    """Attack: tenant b sends prompts as long as the prefill budget while tenant a's row decodes.
    Every forward holds at most the budget's prompt tokens (one prompt over it joins alone), and a's
    row takes a token at every forward: none of b's prompts is a forward a's row waits through."""
    zoo = _zoo()
    sizes = []
    real = type(zoo).forward_tokens.__get__(zoo)
    forwards = []

    def forward_tokens(tokens, *args, **kwargs):
        sizes.append(len(tokens))
        return real(tokens, *args, **kwargs)

    real_forward = type(zoo).forward.__get__(zoo)
    zoo.forward = lambda *a, **k: forwards.append(1) or real_forward(*a, **k)
    zoo.forward_tokens = forward_tokens
    try:
        with Engine(zoo, max_batch=8, max_prefill_tokens=64) as engine:
            running = engine.submit(
                "the quick brown", "lora", SamplingParams(max_tokens=24, ignore_eos=True), tenant="a"
            )
            _wait_steps(engine, 2)
            before = len(sizes) + len(forwards)
            prompts = [("abcdefghij" * 10)[i : i + 60] for i in range(3)] + ["z" * 100]
            handles = _in_one_step(engine, [(p, None, SamplingParams(max_tokens=2), "b") for p in prompts])
            done = [h.result(60) for h in handles]
            running = running.result(60)
            during = len(sizes) + len(forwards) - before
    finally:
        del zoo.forward, zoo.forward_tokens
    assert all(d.error is None for d in done) and running.error is None
    # at most 8 rows decode; two 60-token prompts never share a step, the 100-token one joins alone
    assert all(s <= 8 + 64 or 100 <= s <= 100 + 8 for s in sizes), sizes
    assert during <= 24  # a's row took a token at every forward after the flood came
    assert running.text == _solo(zoo, "the quick brown", "lora", 24)


@pytest.mark.parametrize("adapter", ["prompt", "prefix"])
def test_a_soft_prompt_or_prefix_joiner_is_never_held_back_for_a_group_when_it_can_join_inside_the_step(adapter):
    """Joiners inside a step share the running rows' forward, so holding them back for a group
    (`prefill_wait`) only delays their first token: a soft-prompt or prefix request that has a row
    joins at the first admission, even while other requests wait for rows."""
    zoo = _zoo()
    with Engine(zoo, max_batch=3, prefill_group=4) as engine:
        running = engine.submit("the quick brown", "lora", SamplingParams(max_tokens=30, ignore_eos=True), tenant="a")
        _wait_steps(engine, 2)
        real = engine._admit
        admitted: list[list] = []
        engine._admit = lambda: admitted.append(real()) or admitted[-1]

        def submit():
            admitted.clear()
            jobs = [("hello", adapter, "b"), ("x", None, "c"), ("q", None, "c")]
            return [engine.submit(p, a, SamplingParams(max_tokens=3), tenant=t) for p, a, t in jobs]

        handles = engine.call_between_steps(submit).result(30)
        first = handles[0].result(60)
        engine._admit = real
        assert first.error is None and first.text == _solo(zoo, "hello", adapter, 3)
        assert handles[0] in [r.handle for r in admitted[0]], (adapter, admitted)
        assert engine.stats()["joined_in_step"] >= 1
        running.cancel()


@pytest.mark.parametrize("in_step", [True, False])
def test_storing_a_joiners_blocks_failing_after_its_step_fails_no_request(in_step):
    """Fault: offering a joiner's new prompt blocks to the prefix cache raises after the step's
    forward (say, out of memory copying them). Caching is only a saving: every request of that step
    still gets its solo output, nothing is cached for it, and the running rows go on exactly."""
    zoo = _zoo()
    with Engine(zoo, max_batch=6, prefix_cache_bytes=1 << 24, join_in_step=in_step) as engine:
        running = engine.submit(
            "the quick brown", "houlsby", SamplingParams(max_tokens=14, ignore_eos=True), tenant="a"
        )
        _wait_steps(engine, 2)
        real = engine.prefix_cache.store

        def store(root, *args, **kwargs):
            if root[0] == "b":
                raise MemoryError("no room to copy the blocks")
            return real(root, *args, **kwargs)

        engine.prefix_cache.store = store
        jobs = [(LONG + "b", "lora", "b"), (LONG + "a", "lora", "a"), ("x", None, "a")]
        handles = _in_one_step(engine, [(p, ad, SamplingParams(max_tokens=5), t) for p, ad, t in jobs])
        results = [h.result(60) for h in handles]
        assert engine.stats()["joined_in_step"] == (3 if in_step else 0)
        running = running.result(60)
    assert running.error is None and running.text == _solo(zoo, "the quick brown", "houlsby", 14)
    for done, (p, ad, _) in zip(results, jobs):
        assert done.error is None and done.text == _solo(zoo, p, ad, 5), ad


@torch.inference_mode()
def test_the_virtual_vectors_zoo_virtual_tokens_returns_stay_the_adapters_when_another_takes_its_slot():
    """`Zoo.virtual_tokens` gave a view of the slot itself when every row used one soft prompt:
    a caller holding the vectors (as `Engine._prompts` holds them until the step) saw them turn
    into another tenant's once a later plan took the slot. They are a copy now; and a stale plan
    is planned again rather than read from a slot that holds another adapter."""
    zoo = tiny_zoo("llama", slots=1)
    _add(zoo, "a", "prompt", seed=1)
    _add(zoo, "b", "prompt", seed=2)
    plan_a = zoo.plan(["a"], training=False)
    mine, _ = zoo.virtual_tokens(plan_a)
    kept = mine.clone()
    theirs, _ = zoo.virtual_tokens(zoo.plan(["b"], training=False))
    assert not torch.equal(kept, theirs)
    assert torch.equal(mine, kept)
    assert torch.equal(zoo.virtual_tokens(plan_a)[0], kept)  # a stale plan reads a's vectors, not b's


def test_a_step_whose_joiners_all_raise_fails_them_alone_and_a_forced_step_on_gpt2_still_serves():
    """Every joiner of a step has an adapter that raises: the step runs apart, each fails with
    its own error, the running row is exact. And `join_in_step=True` forced on a base whose step
    cannot take joiners (GPT-2) runs them apart instead of failing."""
    from tests.test_decode_plan_reuse import _Bottleneck, _registered

    class _Raises(_Bottleneck):
        name = "round6_raises"
        armed = False

        def delta(self, x, y, w, training):
            if type(self).armed:
                raise RuntimeError("this adapter always raises")
            return super().delta(x, y, w, training)

    with _registered(_Raises):
        zoo = _zoo()
        for name in ("r1", "r2"):
            zoo.add_adapter(name, _Raises.name, seed=3, trainable=False)
        _Raises.armed = True
        with Engine(zoo, max_batch=6) as engine:
            running = engine.submit("the quick brown", "prompt", SamplingParams(max_tokens=12), tenant="a")
            _wait_steps(engine, 2)
            jobs = [("hello", "r1", "b"), ("abc", "r2", "c"), ("x", "r1", "b")]
            handles = _in_one_step(engine, [(p, a, SamplingParams(max_tokens=4), t) for p, a, t in jobs])
            bad = [h.result(60) for h in handles]
            running = running.result(60)
    assert all(b.finish_reason == "error" and "always raises" in str(b.error) for b in bad)
    assert running.error is None and running.text == _solo(zoo, "the quick brown", "prompt", 12)

    gpt2 = tiny_zoo("gpt2", slots=4)
    make_adapters(gpt2, None, TYPE_NAMES)
    with Engine(gpt2, max_batch=4, join_in_step=True) as engine:
        running = engine.submit("the quick brown", "lora", SamplingParams(max_tokens=10, ignore_eos=True))
        _wait_steps(engine, 2)
        jobs = [("hello", "prompt"), ("abc ->", "prefix"), ("x", None)]
        handles = _in_one_step(engine, [(p, a, SamplingParams(max_tokens=4), "b") for p, a in jobs])
        done = [h.result(60) for h in handles]
        assert running.result(60).error is None
        assert engine.stats()["joined_in_step"] == 0
    for d, (p, a) in zip(done, jobs):
        assert d.error is None and d.text == _solo(gpt2, p, a, 4), a


def test_a_soft_prompt_replaced_by_one_too_long_for_the_context_before_the_step_fails_only_its_request():
    zoo = _zoo()
    _add(zoo, "mine", "prompt", seed=5)
    prompt = ("abcdefghij" * 30)[:200]
    with Engine(zoo, max_batch=4) as engine:
        running = engine.submit("the quick brown", "lora", SamplingParams(max_tokens=20, ignore_eos=True))
        _wait_steps(engine, 2)
        _replace_before_the_step(engine, zoo, "mine", virtual_tokens=60)
        jobs = [(prompt, "mine", "b"), ("abc ->", "houlsby", "a")]
        over, other = [
            h.result(60) for h in _in_one_step(engine, [(p, a, SamplingParams(max_tokens=10), t) for p, a, t in jobs])
        ]
        running = running.result(60)
    assert over.finish_reason == "error" and "context length" in str(over.error)
    assert other.error is None and other.text == _solo(zoo, "abc ->", "houlsby", 10)
    assert running.error is None and running.text == _solo(zoo, "the quick brown", "lora", 20)


def test_soft_prompts_and_prefixes_of_different_lengths_and_cached_openings_in_one_step_each_get_their_solo_output():
    zoo = _zoo()
    for name, kind, n, seed in (
        ("p2", "prompt", 2, 11),
        ("p9", "prompt", 9, 12),
        ("x1", "prefix", 1, 13),
        ("x5", "prefix", 5, 14),
    ):
        _add(zoo, name, kind, seed=seed, num_virtual_tokens=n)
    jobs = [
        (LONG + "one", "lora", "a"),
        ("hello", "p2", "b"),
        ("q", "p9", "c"),
        (LONG + "two", None, "a"),
        ("abc ->", "x1", "b"),
        ("the quick brown fox", "x5", "c"),
        ("zz", "prompt", "d"),
        ("1 2 3 4 5 6 7", "prefix", "d"),
    ]
    with Engine(zoo, max_batch=12, prefix_cache_bytes=1 << 24) as engine:
        for p, a, t in ((LONG, "lora", "a"), (LONG, None, "a")):
            engine.submit(p, a, SamplingParams(max_tokens=1), tenant=t).result(60)  # their openings cached
        running = engine.submit("the quick brown", "bitfit", SamplingParams(max_tokens=20, ignore_eos=True), tenant="e")
        _wait_steps(engine, 2)
        before = engine.stats()["joined_in_step"]
        handles = _in_one_step(engine, [(p, a, SamplingParams(max_tokens=6), t) for p, a, t in jobs])
        done = [h.result(60) for h in handles]
        assert engine.stats()["joined_in_step"] - before == len(jobs)
        running = running.result(60)
    assert done[0].cached_tokens > 0 and done[3].cached_tokens > 0
    assert running.error is None and running.text == _solo(zoo, "the quick brown", "bitfit", 20)
    for d, (p, a, _) in zip(done, jobs):
        assert d.error is None and d.text == _solo(zoo, p, a, 6), a
