"""The continuous-batching engine: every request gets what `zoo.generate` gives it alone."""

from __future__ import annotations

import functools
import threading
import time

import pytest

from adapterzoo.serve import ContextLengthError, Engine, QueueFullError, SamplingParams
from adapterzoo.serve.engine import _safe_end
from adapterzoo.serve.resolver import HostResolver
from adapterzoo.testing.models import tiny_zoo

from .conftest import TYPE_NAMES, make_adapters, submit_in_two_waves

PROMPTS = ["abc ->", "hello", "x", "the quick brown", "1 2 3", "zz top", "q", "a much longer prompt than the rest"]


@functools.cache
def zoo_for(family: str, slots: int = 16):
    zoo = tiny_zoo(family, slots=slots)
    make_adapters(zoo, None, TYPE_NAMES)
    return zoo


def solo(zoo, prompt, adapter, **kwargs):
    return zoo.generate([prompt], [adapter], **kwargs)[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_requests_joining_and_leaving_get_their_solo_output(family):
    """All six types and the bare base, mixed; requests arrive while others decode, with
    different lengths, so rows join and leave at many steps."""
    zoo = zoo_for(family)
    names = [*TYPE_NAMES, None]
    jobs = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)], 3 + (i * 5) % 9) for i in range(21)]
    with Engine(zoo, max_batch=6) as engine:
        results = submit_in_two_waves(engine, jobs, 7)
    assert engine.steps > 0
    outputs = set()
    for (prompt, adapter, n), done in zip(jobs, results):
        assert done.error is None, done.error
        assert done.text == solo(zoo, prompt, adapter, max_new_tokens=n), (prompt, adapter)
        assert done.adapter == adapter and done.completion_tokens <= n
        outputs.add(done.text)
    assert len(outputs) > 8  # the adapters really steer the rows apart


def test_seeded_sampling_equals_solo_sampling():
    zoo = zoo_for("llama")
    kwargs = dict(temperature=1.3, top_k=20, top_p=0.9)
    jobs = [("hello", "lora", 1), ("abc ->", "prefix", 2), ("x", None, 3), ("zz top", "prompt", 4)]
    with Engine(zoo) as engine:
        handles = [engine.submit(p, a, SamplingParams(max_tokens=8, seed=s, **kwargs)) for p, a, s in jobs]
        results = [h.result(60).text for h in handles]
    for (p, a, s), text in zip(jobs, results):
        assert text == solo(zoo, p, a, max_new_tokens=8, do_sample=True, temperature=1.3, top_k=20, top_p=0.9, seed=s)


def test_streaming_deltas_stop_sequences_and_max_tokens():
    zoo = zoo_for("llama")
    full = solo(zoo, "hello", "lora", max_new_tokens=12)
    assert len(full) > 4
    stop = full[3:5]
    with Engine(zoo) as engine:
        handle = engine.submit("hello", "lora", SamplingParams(max_tokens=12, stop=(stop, "\x00never")))
        deltas = list(handle)
        done = handle.result(30)
        assert done.finish_reason == "stop"
        assert done.text == full[: full.find(stop)] == solo(zoo, "hello", "lora", max_new_tokens=12, stop=[stop])
        assert "".join(deltas) == done.text  # the stop sequence never leaks into the stream
        short = engine.submit("hello", "lora", SamplingParams(max_tokens=3)).result(30)
        assert short.finish_reason == "length" and short.completion_tokens == 3
        assert engine.submit("hello", "lora", SamplingParams(max_tokens=0)).result(5).text == ""


def test_safe_end_holds_back_partial_stops_and_characters():
    assert _safe_end("abc", ()) == 3
    assert _safe_end("abc\ufffd", ()) == 3
    assert _safe_end("hello wo", ("world",)) == 6
    assert _safe_end("hello", ("xyz",)) == 5


def test_cancel_frees_the_row_and_its_cache():
    zoo = zoo_for("llama")
    with Engine(zoo) as engine:
        long = engine.submit("hello", "houlsby", SamplingParams(max_tokens=200, stop=("\x00",)))
        other = engine.submit("abc ->", "lora", SamplingParams(max_tokens=6))
        next(iter(long))
        long.cancel()
        done = long.result(30)
        assert done.finish_reason == "cancelled"
        assert other.result(30).text == solo(zoo, "abc ->", "lora", max_new_tokens=6)
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 0 and engine._batch.cache is None


def test_queue_limit_and_context_length():
    zoo = zoo_for("llama")
    engine = Engine(zoo, max_queue=2)  # not started: nothing leaves the queue
    engine.submit("a", None)
    engine.submit("b", "lora")
    with pytest.raises(QueueFullError):
        engine.submit("c", None)
    engine.stop(drain=False)
    with Engine(zoo) as engine:
        with pytest.raises(ContextLengthError):
            engine.submit("x" * 300, None)
        with pytest.raises(ContextLengthError):
            engine.submit("hello", None, SamplingParams(max_tokens=252))
        # the soft prompt's virtual tokens count too: found at admission, the request fails clearly
        done = engine.submit("hello", "prompt", SamplingParams(max_tokens=250)).result(30)
        assert done.finish_reason == "error" and isinstance(done.error, ContextLengthError)
        assert engine.generate("hello", "lora", max_tokens=4) == solo(zoo, "hello", "lora", max_new_tokens=4)


def test_more_distinct_adapters_than_slots():
    """A pool of 2 slots, 6 LoRA adapters at once: requests wait for a slot, none is wrong."""
    zoo = tiny_zoo("llama", slots=2)
    names = [f"l{i}" for i in range(6)]
    for i, n in enumerate(names):
        zoo.add_adapter(n, "lora", seed=i, trainable=False, init_lora_weights=False)
        from adapterzoo.testing.models import perturb

        perturb(zoo, n, scale=1.0, seed=i)
    jobs = [(PROMPTS[i % 4], names[i % 6]) for i in range(12)]
    with Engine(zoo, max_batch=8) as engine:
        results = [h.result(60).text for h in [engine.submit(p, a, SamplingParams(max_tokens=5)) for p, a in jobs]]
    assert results == [solo(zoo, p, a, max_new_tokens=5) for p, a in jobs]


class _Limited(HostResolver):
    def resident_limit(self, tenant):
        return 1 if tenant == "small" else None


def test_tenant_resident_slot_limit():
    zoo = zoo_for("llama")
    engine = Engine(zoo, resolver=_Limited(zoo))
    seen = []
    original = engine._decode

    def spy():
        seen.append({r.adapter for r in engine._batch.rows if r.tenant == "small"})
        original()

    engine._decode = spy
    with engine:
        hs = [
            engine.submit(PROMPTS[i], TYPE_NAMES[i % 3], SamplingParams(max_tokens=4), tenant="small") for i in range(6)
        ]
        hs += [
            engine.submit(PROMPTS[i], TYPE_NAMES[3 + i % 3], SamplingParams(max_tokens=4), tenant="big")
            for i in range(6)
        ]
        for h in hs:
            assert h.result(60).error is None
    assert seen and max(len(s) for s in seen) == 1


def test_loading_never_pauses_decoding(monkeypatch, tmp_path):
    """An adapter that takes a second to read: the running request keeps decoding meanwhile."""
    from adapterzoo.serve.tiers import Tiers

    zoo = tiny_zoo("llama")
    make_adapters(zoo, tmp_path, ["fast", "slow"])
    zoo.remove_adapter("slow")
    read = zoo.read_adapter
    gate = threading.Event()

    def slow_read(name, source, **kw):
        gate.wait(10)
        return read(name, source, **kw)

    monkeypatch.setattr(zoo, "read_adapter", slow_read)
    router = Tiers(zoo, adapters_dir=tmp_path)
    with Engine(zoo, resolver=router) as engine:
        slow = engine.submit("hello", "slow", SamplingParams(max_tokens=4))
        fast = engine.submit("abc ->", "fast", SamplingParams(max_tokens=20, stop=("\x00",)))
        done = fast.result(60)  # finishes while "slow" is still being read
        assert not slow.done and done.completion_tokens > 0
        gate.set()
        assert slow.result(60).text == solo(zoo, "hello", "slow", max_new_tokens=4)
    router.close()


def test_stop_drains_running_requests():
    zoo = zoo_for("llama")
    engine = Engine(zoo).start()
    handles = [engine.submit(p, a, SamplingParams(max_tokens=6)) for p, a in zip(PROMPTS, [*TYPE_NAMES, None])]
    engine.stop(drain=True, timeout=60)
    assert all(h.done and h.result().finish_reason in ("length", "stop") for h in handles)
    from adapterzoo.serve import EngineClosedError

    with pytest.raises(EngineClosedError):
        engine.submit("x", None)


def test_sampling_params_normalise_stop():
    assert SamplingParams(stop=None).stop == ()
    assert SamplingParams(stop="ab").stop == ("ab",)
    assert SamplingParams(stop=["ab", "", "c"]).stop == ("ab", "c")
    assert SamplingParams(stop=("x",)).stop == ("x",) and SamplingParams().stop == ()


def test_a_call_queued_as_the_loop_stops_still_runs():
    """`call_between_steps` racing `stop()`: its put lands as late as it can (after the loop has
    left, if nothing prevents it). The call must still run, or `Tiers._between` waits
    forever and shutdown hangs."""
    engine = Engine(zoo_for("llama")).start()
    thread, calls = engine._thread, engine._calls
    in_put = threading.Event()

    class LatePut:
        def put(self, item):
            in_put.set()
            thread.join(1.0)  # the loop may exit meanwhile only if the put is not under `_cond`
            calls.put(item)

        def get_nowait(self):
            return calls.get_nowait()

    engine._calls = LatePut()
    ran = threading.Event()
    futures = []
    caller = threading.Thread(target=lambda: futures.append(engine.call_between_steps(lambda: ran.set() or "ran")))
    caller.start()
    assert in_put.wait(10)
    stopper = threading.Thread(target=engine.stop, kwargs={"drain": False})
    stopper.start()
    caller.join(30)
    stopper.join(60)
    assert not stopper.is_alive() and futures
    assert futures[0].result(timeout=10) == "ran" and ran.is_set()
    assert engine.call_between_steps(lambda: "inline").result(0) == "inline"  # stopped: runs inline


class _BrokenLoads(HostResolver):
    def prepare(self, name, tenant=None):
        from concurrent.futures import Future

        failed = Future()
        failed.set_exception(OSError("the disk is on fire"))
        return failed


def test_cancelled_and_failed_requests_leave_the_queue_while_the_batch_is_full():
    """With every row taken, a cancelled queued request (or one whose adapter failed to load)
    must not keep its place against max_queue until a row frees up (spurious 429s)."""
    from adapterzoo.serve import AdapterLoadError

    engine = Engine(zoo_for("llama"), max_batch=1, max_queue=2, resolver=_BrokenLoads(zoo_for("llama")))
    decode = engine._decode

    def slow_decode():
        time.sleep(0.05)
        decode()

    engine._decode = slow_decode
    with engine:
        long = engine.submit("hello", None, SamplingParams(max_tokens=240, ignore_eos=True))  # ~12 s
        deadline = time.monotonic() + 30
        while engine.stats()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        queued = [engine.submit("abc", None, SamplingParams(max_tokens=2)) for _ in range(2)]
        with pytest.raises(QueueFullError):
            engine.submit("x", None)
        for h in queued:
            h.cancel()
        assert [h.result(5).finish_reason for h in queued] == ["cancelled", "cancelled"]
        failed = engine.submit("abc", "ghost", SamplingParams(max_tokens=2)).result(5)
        assert isinstance(failed.error, AdapterLoadError) and "the disk is on fire" in str(failed.error)
        assert not long.done  # all of it happened while the one row was still taken
        engine.submit("x", None, SamplingParams(max_tokens=1))  # the queue has room again
        long.cancel()


def test_a_request_that_fills_the_context_runs_to_max_tokens():
    """prompt (+ virtual tokens) + max_tokens == the context length exactly: every token comes."""
    zoo = zoo_for("llama")
    with Engine(zoo) as engine:
        n = engine.context_length - len(engine.encode("hello"))
        for adapter, virtual in [(None, 0), ("prompt", 4), ("prefix", 3)]:
            done = engine.submit("hello", adapter, SamplingParams(max_tokens=n - virtual, ignore_eos=True)).result(60)
            assert done.finish_reason == "length" and done.completion_tokens == n - virtual, adapter


def test_request_ids_come_from_no_process_wide_counter():
    """Two engines (two replicas) never hand out the same id; a caller's own id is kept."""
    zoo = zoo_for("llama")
    first, second = Engine(zoo), Engine(zoo)
    ids = [e.submit("hello", None, SamplingParams(max_tokens=1)).id for e in (first, second, first)]
    assert len(set(ids)) == 3 and all(i.startswith("req-") for i in ids)
    assert first.submit("hello", None, SamplingParams(max_tokens=1), request_id="mine").id == "mine"
    for e in (first, second):
        e.stop(drain=False)


def test_an_adapter_the_resolver_knows_not_to_exist_is_refused_at_submit_and_holds_nothing():
    from adapterzoo import UnknownAdapterError

    zoo = zoo_for("llama")
    engine = Engine(zoo)
    with pytest.raises(UnknownAdapterError):
        engine.submit("hello", "nope", SamplingParams(max_tokens=2))
    assert engine.stats()["waiting"] == 0
    engine.stop(drain=False)


def test_zoo_generate_and_the_engine_cut_at_the_same_stop_string():
    from adapterzoo.generate import find_stop

    assert find_stop("a stop here, STOP there", ("STOP", "stop")) == 2
    assert find_stop("nothing", ("x",)) == -1 and find_stop("", ()) == -1
    zoo = zoo_for("llama")
    full = solo(zoo, "hello", "lora", max_new_tokens=8)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    with Engine(zoo) as engine:
        served = engine.generate("hello", "lora", max_tokens=8, stop=(stop,))
    assert served == solo(zoo, "hello", "lora", max_new_tokens=8, stop=[stop]) == full[: find_stop(full, (stop,))]


def test_room_books_rows_pool_slots_a_tenants_resident_slots_and_the_prefill_budget():
    from adapterzoo.serve.batch import Request, Room

    pool_of = {"a": ("lora",), "b": ("lora",), "c": ("lora",)}.get
    running = [Request([1, 2], "a", SamplingParams(), tenant="t")]
    room = Room(running, pool_of, max_rows=3, max_rows_per_tenant=2, slots=2, budget=5)
    assert room.row_for("t") and room.slot_for("a", "t", 1) and room.slot_for("b", "u", None)
    assert not room.slot_for("b", "t", 1)  # "t" already holds one adapter, its limit
    assert room.prefill_for(100)  # the first joiner always fits the budget
    room.take(Request([1, 2, 3, 4], "b", SamplingParams(), tenant="u"), 4)
    assert not room.slot_for("c", "u", None) and room.slot_for("b", "t", None)  # the pool's 2 slots: a, b
    assert not room.prefill_for(2) and room.prefill_for(1)
    room.take(Request([1], None, SamplingParams(), tenant="t"), 1)
    assert not room.row_for("u")  # three rows: the batch is full


def test_joiners_wait_a_few_steps_to_share_one_prefill_and_still_get_their_solo_output():
    """While rows decode, requests that could join one by one wait (at most `prefill_wait` steps)
    until `prefill_group` of them join in the same prefill (when they prefill apart: a base
    whose decode step cannot take them, `join_in_step=False`)."""
    zoo = zoo_for("llama")
    jobs = [(PROMPTS[i % len(PROMPTS)], "lora" if i % 2 else None, 2 + (i * 3) % 7) for i in range(16)]
    prefills = []

    def counting(forward):
        def run(*args, **kwargs):
            if kwargs.get("logits_to_keep"):  # only the engine's prefills keep one position
                prefills.append(args[0].shape[0])
            return forward(*args, **kwargs)

        return run

    results = {}
    for group in (1, 4):
        prefills.clear()
        with Engine(zoo, max_batch=4, prefill_group=group, prefill_wait=6, join_in_step=False) as engine:
            zoo.forward = counting(type(zoo).forward.__get__(zoo))
            try:
                handles = [engine.submit(p, a, SamplingParams(max_tokens=n)) for p, a, n in jobs]
                results[group] = [h.result(60) for h in handles]
            finally:
                del zoo.forward
        results[group, "prefills"] = len(prefills)
    assert results[4, "prefills"] < results[1, "prefills"]
    for (prompt, adapter, n), alone, grouped in zip(jobs, results[1], results[4]):
        assert grouped.error is None and alone.error is None
        assert grouped.text == alone.text == solo(zoo, prompt, adapter, max_new_tokens=n)


def test_a_lone_waiting_request_joins_at_once():
    zoo = zoo_for("llama")
    with Engine(zoo, max_batch=4, prefill_group=4, prefill_wait=1000, join_in_step=False) as engine:
        first = engine.submit("hello", None, SamplingParams(max_tokens=40, ignore_eos=True))
        while engine.steps < 2:
            time.sleep(0.005)
        steps = engine.steps
        second = engine.submit("abc ->", "lora", SamplingParams(max_tokens=2))
        assert second.result(30).error is None
        assert not first.done or first.result().completion_tokens == 40
        assert engine.steps - steps < 40  # it did not wait for the long row to finish
    assert second.result().text == solo(zoo, "abc ->", "lora", max_new_tokens=2)


def test_a_roomy_cache_holds_what_a_dynamic_cache_holds_and_never_rewrites_a_view_it_gave():
    import torch
    from transformers import DynamicCache

    zoo = zoo_for("llama")
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.inference_mode():
        outs = {}
        for name, cache in (("dynamic", DynamicCache(config=zoo.model.config)), ("roomy", zoo.new_cache())):
            out = zoo.forward(ids, mask, adapters=["lora", None], cache=cache)
            m, logits, first_keys = out.attention_mask, [out.logits[:, -1]], None
            for step in range(70):  # past the layer's spare room: it grows
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                out = zoo.forward(out.logits[:, -1].argmax(-1)[:, None], m, adapters=["lora", None], cache=out.cache)
                logits.append(out.logits[:, -1])
                if step == 2:
                    layer = out.cache.layers[0]
                    first_keys, snapshot = layer.keys, layer.keys.clone()
                    layer.keys = layer.keys[..., 1:, :]  # replaced from outside (a trim): moved into new room
                    layer.keys = torch.cat([snapshot[..., :1, :], layer.keys], -2)
            assert torch.equal(first_keys, snapshot)
            outs[name] = torch.stack(logits)
    assert torch.equal(outs["roomy"], outs["dynamic"])


def test_a_stopped_engine_leaves_no_thread_behind():
    """Its watchdog leaves with it, not a period (up to 5 s) later: daemon threads still running
    when the interpreter exits made it abort ("terminate called without an active exception")."""
    zoo = zoo_for("llama")
    before = {t.ident for t in threading.enumerate()}
    with Engine(zoo) as engine:
        engine.submit("hello", None, SamplingParams(max_tokens=2)).result(30)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(t.ident not in before and t.is_alive() for t in threading.enumerate()):
        time.sleep(0.01)
    assert [t.name for t in threading.enumerate() if t.ident not in before] == []
