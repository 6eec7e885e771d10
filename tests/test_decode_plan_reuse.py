"""A plan kept across decode steps (as the serving engine keeps it until its rows change):
what it gathers is kept, delta types run over every row with slot 0 for other pools' rows, and
each row still equals its solo run."""

from __future__ import annotations

import types
from contextlib import contextmanager

import pytest
import torch
from transformers import DynamicCache

from adapterzoo import AdapterConfig, AdapterType, PluginError, hookimpl, plugins
from adapterzoo.plan import build_plan
from adapterzoo.sites import find_linear, linear_dims
from adapterzoo.testing.models import output, perturb, tiny_zoo
from tests.test_plan import fake_pool

ADAPTERS = {
    "lora": ("lora", {"r": 4, "init_lora_weights": False}),
    "houlsby": ("houlsby", {"bottleneck": 8}),
    "bitfit": ("bitfit", {}),
    "adapterbias": ("adapterbias", {}),
    "prefix": ("prefix", {"num_virtual_tokens": 3}),
    "prompt": ("soft_prompt", {"num_virtual_tokens": 2}),
}


def _zoo():
    zoo = tiny_zoo("llama", slots=4)
    for i, (name, (type_name, config)) in enumerate(ADAPTERS.items()):
        zoo.add_adapter(name, type_name, seed=i, trainable=False, **config)
        perturb(zoo, name, seed=i)
    return zoo


def _decode(zoo, names: list, prompt: torch.Tensor, steps: int, plan=None, between=None) -> list[torch.Tensor]:
    """Prefill `prompt` (rows, T), then `steps` greedy-free decode steps feeding fixed tokens;
    the logits of each step. With `plan`, every decode step reuses it (as the engine keeps one);
    `between(step)` runs before each decode step (another thread's work between two steps)."""
    out = zoo.forward(prompt, None, names, cache=DynamicCache(config=zoo.model.config))
    cache, mask = out.cache, out.attention_mask
    logits = []
    for step in range(steps):
        if between is not None:
            between(step)
        token = torch.full((len(names), 1), 5 + step)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = zoo.forward(token, mask, names if plan is None else None, plan=plan, cache=cache)
        cache = out.cache
        logits.append(output(out)[:, -1])
    return logits


def _assert_each_row_of_a_kept_plan_equals_its_solo_run(zoo, names: list, prompt: torch.Tensor, steps: int) -> None:
    with torch.inference_mode():
        plan = zoo.plan(names, training=False)
        mixed = _decode(zoo, names, prompt, steps, plan=plan)
        for i, name in enumerate(names):
            solo = _decode(zoo, [name], prompt[i : i + 1], steps)
            for step, (m, s) in enumerate(zip(mixed, solo)):
                torch.testing.assert_close(m[i], s[0], atol=1e-4, rtol=1e-4, msg=f"row {i} ({name}) step {step}")


def test_each_row_of_a_kept_plan_equals_its_solo_run_at_every_decode_step():
    zoo = _zoo()
    names = ["lora", None, "houlsby", "bitfit", "prompt", "adapterbias", "prefix", "lora", None]
    prompt = torch.randint(4, 100, (len(names), 6), generator=torch.Generator().manual_seed(0))
    _assert_each_row_of_a_kept_plan_equals_its_solo_run(zoo, names, prompt, 3)


def test_a_kept_plan_gathers_each_tensor_once_without_gradients():
    pool, W = fake_pool()
    pool.slots_are_stamped = True
    use = build_plan([(pool, 2, 0), (pool, 4, 0)], torch.device("cpu")).deltas[0]
    tensors = {"W": W}
    with torch.inference_mode():
        first = use.gather(tensors, "site")["W"]
        assert use.gather(tensors, "site")["W"] is first
        assert use.gather(tensors, "another site")["W"] is not first


def test_gathers_are_made_afresh_while_gradients_are_on():
    pool, W = fake_pool()
    pool.slots_are_stamped = True
    use = build_plan([(pool, 2, 0), (pool, 4, 0)], torch.device("cpu")).deltas[0]
    W = W.requires_grad_()
    assert use.gather({"W": W}, "site")["W"] is not use.gather({"W": W}, "site")["W"]


def test_a_use_widened_to_every_row_reads_slot_zero_for_the_other_rows():
    pool, W = fake_pool()
    plan = build_plan([(pool, 3, 0), None, (pool, 5, 0), None], torch.device("cpu"))
    wide = plan.deltas[0].every_row()
    assert wide.rows is None and wide.slots.tolist() == [3, 0, 5, 0]
    x = torch.randn(4, 1, W.shape[1])
    got = wide.gather({"W": W}).matmul(x, "W")
    assert got[1].abs().max() == 0 and got[3].abs().max() == 0
    torch.testing.assert_close(got[0], x[0] @ W[3])


def test_a_slot_written_again_makes_the_kept_plan_gather_again():
    """An adapter edited and placed again changes its slot's stamp: the zoo re-plans, and the
    next decode step reads the new weights, not what the old plan had gathered."""
    zoo = _zoo()
    names = ["bitfit", None]
    prompt = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plan = zoo.plan(names, training=False)
        before = _decode(zoo, names, prompt, 2, plan=plan)[-1]
    perturb(zoo, "bitfit", seed=7)
    with torch.inference_mode():
        zoo.plan(["bitfit"], training=False)  # places the edited adapter again (a new stamp)
        after = _decode(zoo, names, prompt, 2, plan=plan)[-1]
        solo = _decode(zoo, ["bitfit"], prompt[:1], 2)[-1]
    assert (after[0] - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(after[0], solo[0], atol=1e-4, rtol=1e-4)


def test_every_type_that_promises_a_zero_delta_at_slot_zero_keeps_it():
    """`zero_slot_is_identity` lets the core run a type's delta over rows of other pools (slot 0):
    for those rows the delta must be exactly zero, whatever x and y are."""
    zoo = _zoo()
    with torch.inference_mode():
        zoo.plan(list(ADAPTERS), training=False)  # every adapter into its pool
    modules = dict(zoo.model.named_modules())
    promising = [pool for pool in zoo.pools.values() if getattr(pool.atype, "zero_slot_is_identity", False)]
    assert {pool.atype.name for pool in promising} == {"lora", "houlsby", "bitfit", "adapterbias"}
    g = torch.Generator().manual_seed(0)
    for pool in promising:
        use = build_plan([(pool, 0, 0), (pool, 0, 0)], torch.device("cpu")).deltas[0]
        for site, tensors in pool.tensors.items():
            module = modules[site]
            width_in = module.weight.shape[-1] if module.weight.dim() > 1 else module.weight.shape[0]
            x = torch.randn(2, 1, width_in, generator=g)
            y = module(x)
            delta = pool.atype.delta(x, y, use.gather(tensors, site, module), False)
            assert torch.count_nonzero(delta) == 0, f"{pool.atype.name} at {site}"


class _Bottleneck(AdapterType):
    """A third-party delta type: down (in, 4), up (4, out) at each MLP's down projection."""

    name = "plan_reuse_bottleneck"
    Config = AdapterConfig

    def sites(self, model, config):
        return find_linear(model, ["down_proj"])

    def tensors(self, model, site, module, config):
        fan_in, fan_out = linear_dims(module)
        return {"down": (fan_in, 4), "up": (4, fan_out)}

    def delta(self, x, y, w, training):
        return w.matmul(w.matmul(x, "down"), "up")


class _ClaimsZeroSlot(_Bottleneck):
    """Promises a zero delta at slot 0 but adds a constant shift to every row it is given."""

    name = "plan_reuse_liar"
    zero_slot_is_identity = True

    def delta(self, x, y, w, training):
        return super().delta(x, y, w, training) + 1e-3


@contextmanager
def _registered(cls):
    plugin = types.SimpleNamespace(register_adapter_types=hookimpl(lambda register: register(cls)))
    plugins.pm.register(plugin, name=f"plan-reuse-{cls.name}")
    try:
        yield
    finally:
        plugins.pm.unregister(name=f"plan-reuse-{cls.name}")


def test_a_type_without_the_zero_slot_promise_mixed_with_built_ins_equals_its_solo_run_at_every_step():
    with _registered(_Bottleneck):
        zoo = _zoo()
        zoo.add_adapter("third", _Bottleneck.name, seed=9, trainable=False)
        perturb(zoo, "third", seed=9)
        names = ["third", "lora", None, "houlsby", "third", "bitfit"]
        prompt = torch.randint(4, 100, (len(names), 5), generator=torch.Generator().manual_seed(2))
        _assert_each_row_of_a_kept_plan_equals_its_solo_run(zoo, names, prompt, 4)


def test_a_type_whose_delta_at_slot_zero_is_not_zero_cannot_claim_zero_slot_is_identity():
    """Else, run over every row of a decode step, it would shift the bare base's rows and other
    adapters' rows: the contract check refuses it when its first adapter is added."""
    with _registered(_ClaimsZeroSlot):
        zoo = tiny_zoo("llama", slots=4)
        with pytest.raises(PluginError, match="zero_slot_is_identity"):
            zoo.add_adapter("liar", _ClaimsZeroSlot.name, seed=1, trainable=False)
        assert "liar" not in zoo.adapter_names()


def test_an_adapter_removed_and_added_again_under_its_name_is_read_anew_by_a_kept_plan():
    zoo = _zoo()
    names = ["lora", None, "houlsby"]
    prompt = torch.randint(4, 100, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        plan = zoo.plan(names, training=False)
        _decode(zoo, names, prompt, 2, plan=plan)
    zoo.remove_adapter("lora")
    zoo.add_adapter("lora", "lora", seed=11, trainable=False, r=4, init_lora_weights=False)
    perturb(zoo, "lora", seed=11)
    with torch.inference_mode():
        after = _decode(zoo, names, prompt, 3, plan=plan)
        for i, name in enumerate(names):
            solo = _decode(zoo, [name], prompt[i : i + 1], 3)
            for m, s in zip(after, solo):
                torch.testing.assert_close(m[i], s[0], atol=1e-4, rtol=1e-4, msg=f"row {i} ({name})")


def test_a_slot_taken_by_another_adapter_between_decode_steps_is_not_read_through_a_kept_plan():
    """One LoRA slot: a plan for "a" is kept while "b" takes the slot between two decode steps."""
    zoo = tiny_zoo("llama", slots=1)
    for i, name in enumerate(["a", "b"]):
        zoo.add_adapter(name, "lora", seed=i, trainable=False, r=4, init_lora_weights=False)
        perturb(zoo, name, seed=i)
    prompt = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(4))
    names = ["a", None]
    with torch.inference_mode():
        plan = zoo.plan(names, training=False)
        out = zoo.forward(prompt, None, plan=plan, cache=zoo.new_cache())
        cache, mask, mixed = out.cache, out.attention_mask, []
        for step in range(3):
            zoo.plan(["b"], training=False)  # evicts "a": its slot now holds "b"
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = zoo.forward(torch.full((2, 1), 5 + step), mask, plan=plan, cache=cache)
            cache = out.cache
            mixed.append(output(out)[:, -1])
        for i, name in enumerate(names):
            solo = _decode(zoo, [name], prompt[i : i + 1], 3)
            for m, s in zip(mixed, solo):
                torch.testing.assert_close(m[i], s[0], atol=1e-4, rtol=1e-4, msg=f"row {i} ({name})")


def test_a_zoo_puts_no_forward_hook_on_the_base_so_base_only_steps_take_torchs_fast_call_path():
    # a module with any forward hook is called through PyTorch's slower path (~10 us a call); the
    # delta sites wrap the modules' forwards instead (runtime.DeltaSite)
    zoo = _zoo()
    with torch.inference_mode():
        zoo.forward(torch.randint(3, 40, (2, 4)), None, ["houlsby", None])
    assert zoo.runtime.delta_sites
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in zoo.model.modules())


def test_a_plans_first_forward_takes_each_pools_own_rows_and_later_decode_steps_widen_to_every_row(monkeypatch):
    from adapterzoo.plan import PoolUse

    monkeypatch.setenv("ADAPTERZOO_KERNELS", "0")  # the eager deltas widen; the kernels take their own rows

    widened = []
    real = PoolUse.every_row
    monkeypatch.setattr(PoolUse, "every_row", lambda self: widened.append(1) or real(self))
    zoo = _zoo()
    names = ["lora", None, "houlsby", "bitfit", "adapterbias", "lora"]
    prompt = torch.randint(3, 40, (len(names), 4), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = zoo.forward(prompt, None, names, cache=DynamicCache(config=zoo.model.config))
        plan = zoo.plan(names, training=False)  # the decode steps' plan, as the engine makes one
        mask = torch.cat([out.attention_mask, torch.ones_like(out.attention_mask[:, :1])], 1)
        zoo.forward(torch.full((len(names), 1), 5), mask, plan=plan, cache=out.cache)
        assert widened == []  # the first decode forward of this plan: the pools' own rows only
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        zoo.forward(torch.full((len(names), 1), 6), mask, plan=plan, cache=out.cache)
    assert widened  # from the second on, every row
    _assert_each_row_of_a_kept_plan_equals_its_solo_run(_zoo(), names, prompt, steps=4)
