"""Joiners prefill inside the running rows' decode step (serve/ragged.py): one forward whose rows
are single tokens, and every request still gets exactly its solo output."""

from __future__ import annotations

import functools
import time

import pytest
import torch

from adapterzoo.serve import Engine, SamplingParams
from adapterzoo.serve.ragged import JoinStep
from adapterzoo.testing.models import tiny_zoo

from .conftest import TYPE_NAMES, make_adapters, submit_in_two_waves

PROMPTS = ["abc ->", "hello", "x", "the quick brown", "1 2 3", "zz top", "q", "a much longer prompt than the rest"]


@functools.cache
def zoo_for(family: str = "llama"):
    zoo = tiny_zoo(family, slots=16)
    make_adapters(zoo, None, TYPE_NAMES)
    return zoo


def solo(zoo, prompt, adapter, n):
    return zoo.generate([prompt], [adapter], max_new_tokens=n)[0]


def test_requests_that_join_inside_a_decode_step_get_their_solo_output_with_every_type_running():
    """All six types and the base arrive while rows decode and join inside decode steps: soft
    prompts with their virtual tokens before their prompt, prefixes in their cache's first columns."""
    zoo = zoo_for()
    names = [*TYPE_NAMES, None]
    jobs = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)], 2 + (i * 5) % 9) for i in range(28)]
    with Engine(zoo, max_batch=6) as engine:
        assert engine.join_in_step
        results = submit_in_two_waves(engine, jobs, 4)
        joined_in_step = engine.stats()["joined_in_step"]
    assert joined_in_step >= 20  # of the 24 that came while rows decoded
    for (prompt, adapter, n), done in zip(jobs, results):
        assert done.error is None, done.error
        assert done.text == solo(zoo, prompt, adapter, n), (prompt, adapter)


def test_joining_inside_the_step_and_apart_give_the_same_tokens_and_joining_inside_runs_fewer_forwards():
    zoo = zoo_for()
    jobs = [(PROMPTS[i % len(PROMPTS)], ["lora", "houlsby", None, "bitfit"][i % 4], 3 + i % 7) for i in range(16)]
    out = {}
    for flag in (True, False):
        forwards = []
        for method in ("forward", "forward_tokens"):
            real = getattr(type(zoo), method).__get__(zoo)
            setattr(zoo, method, lambda *a, real=real, n=forwards, **k: n.append(1) or real(*a, **k))
        try:
            with Engine(zoo, max_batch=4, join_in_step=flag) as engine:
                handles = [engine.submit(p, a, SamplingParams(max_tokens=n, ignore_eos=True)) for p, a, n in jobs]
                out[flag] = [h.result(60) for h in handles]
                out[flag, "in step"] = engine.stats()["joined_in_step"]
        finally:
            del zoo.forward, zoo.forward_tokens
        out[flag, "forwards"] = len(forwards)
    assert out[True, "in step"] >= 12 and out[False, "in step"] == 0  # those that start the batch: apart
    assert [r.token_ids for r in out[True]] == [r.token_ids for r in out[False]]
    assert out[True, "forwards"] < out[False, "forwards"]  # a join costs no forward of its own


def _prefill(zoo, prompts, adapters):
    ids = [zoo.tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    x = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        x[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return x, mask


@torch.inference_mode()
def test_a_step_of_one_token_rows_computes_what_a_decode_step_and_a_separate_prefill_compute():
    """`Zoo.forward_tokens` with a `JoinStep`: the running rows' logits and cache equal a decode
    step's, the joiners' last-token logits and cache equal their own prefill's (1e-5)."""
    zoo = zoo_for()
    running = ["lora", None, "bitfit"]
    x, mask = _prefill(zoo, ["hello", "abc ->", "zz top"], running)
    out = zoo.forward(x, mask, running, cache=zoo.new_cache())
    nxt = out.logits[:, -1].argmax(-1)
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    import copy

    reference_cache = copy.deepcopy(out.cache)
    decode = zoo.forward(nxt[:, None], step_mask, running, cache=reference_cache)
    joiners = ["houlsby", "lora", None]
    jx, jmask = _prefill(zoo, ["a much longer prompt", "q", "1 2 3"], joiners)
    prefill = zoo.forward(jx, jmask, joiners, cache=zoo.new_cache(), logits_to_keep=1)

    joining = zoo.new_cache()
    lengths = jmask.sum(1).tolist()
    step = JoinStep(out.cache, step_mask, joining, jmask, lengths)
    names = running + [a for a, n in zip(joiners, lengths) for _ in range(n)]
    plan = zoo.plan(names, training=False)
    tokens = torch.cat([nxt, jx.flatten()[step.padded_at]])  # no padding among the step's rows
    assert len(tokens) == step.rows == 3 + sum(lengths)
    got = zoo.forward_tokens(tokens, step.positions(), plan, step, step, step.last_tokens()).logits
    torch.testing.assert_close(got[:3], decode.logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3:], prefill.logits[:, -1], atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(out.cache.layers, reference_cache.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(joining.layers, prefill.cache.layers):
        real = jmask.bool()  # padding columns differ (each pad sees only itself) and are never attended
        torch.testing.assert_close(
            mine.keys.transpose(1, 2)[real], theirs.keys.transpose(1, 2)[real], atol=1e-5, rtol=1e-5
        )
        assert torch.isfinite(mine.keys).all() and torch.isfinite(mine.values).all()


def test_a_base_whose_step_cannot_take_joiners_prefills_them_apart_and_still_serves():
    zoo = zoo_for("gpt2")
    assert not zoo.runs_token_rows()
    with Engine(zoo, max_batch=4) as engine:
        assert not engine.join_in_step
        handles = [engine.submit(p, "lora", SamplingParams(max_tokens=3)) for p in PROMPTS[:6]]
        results = [h.result(60) for h in handles]
        assert engine.stats()["joined_in_step"] == 0
    assert [r.text for r in results] == [solo(zoo, p, "lora", 3) for p in PROMPTS[:6]]


def test_an_adapter_on_the_lm_head_keeps_joiners_apart():
    zoo = tiny_zoo("llama", slots=4)
    assert zoo.runs_token_rows()
    zoo.add_adapter("head", "lora", r=2, target_modules=["lm_head"], seed=0, trainable=False)
    assert not zoo.runs_token_rows()  # forward_tokens projects only the kept rows: a hook there would see others
    with pytest.raises(Exception, match="runs_token_rows"):
        zoo.forward_tokens(torch.tensor([5]), torch.tensor([0]), zoo.plan([None]), None, None, torch.tensor([0]))


def test_a_soft_prompt_and_a_prefix_joiner_join_a_running_step_with_their_virtual_tokens_and_get_their_solo_output():
    zoo = zoo_for()
    with Engine(zoo, max_batch=4) as engine:
        running = engine.submit("the quick brown", "lora", SamplingParams(max_tokens=30, ignore_eos=True))
        while engine.steps < 2:
            time.sleep(0.002)
        joiners = [
            engine.submit(p, a, SamplingParams(max_tokens=6))
            for p, a in [("hello", "prompt"), ("abc ->", "prefix"), ("x", "prompt")]
        ]
        results = [h.result(60) for h in joiners]
        assert engine.stats()["joined_in_step"] == 3
        assert running.result(60).error is None
    for (prompt, adapter), done in zip([("hello", "prompt"), ("abc ->", "prefix"), ("x", "prompt")], results):
        assert done.text == solo(zoo, prompt, adapter, 6), adapter


def test_an_adapter_giving_nan_that_joins_a_step_fails_alone_and_its_step_mates_stay_exact():
    """Attack: a tenant's adapter whose weights are NaN joins the same step as another tenant's
    joiner and running row. Its NaN must reach neither (their rows share every linear layer's
    call with it), and it must fail with a clear error, not be merged into the batch."""
    zoo = tiny_zoo("llama", slots=8)
    make_adapters(zoo, None, TYPE_NAMES)
    zoo.add_adapter("bad", "lora", r=2, seed=9, trainable=False, init_lora_weights=False)
    with torch.no_grad():
        for t in zoo.get_adapter("bad").parameters():
            t.fill_(float("nan"))
    with Engine(zoo, max_batch=4) as engine:
        running = engine.submit("the quick brown", "houlsby", SamplingParams(max_tokens=12), tenant="a")
        while engine.steps < 2:
            time.sleep(0.002)
        bad = engine.submit("hello", "bad", SamplingParams(max_tokens=5), tenant="b")
        good = engine.submit("abc ->", "lora", SamplingParams(max_tokens=5), tenant="a")
        bad, good, running = bad.result(60), good.result(60), running.result(60)
        assert engine.stats()["joined_in_step"] >= 1
    assert bad.finish_reason == "error" and "NaN" in str(bad.error)
    assert good.error is None and good.text == solo(zoo, "abc ->", "lora", 5)
    assert running.error is None and running.text == solo(zoo, "the quick brown", "houlsby", 12)
