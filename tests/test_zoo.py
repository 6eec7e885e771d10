"""The Zoo's public API: add, save, load, remove, hot-swap, LRU spill to host and back."""

from __future__ import annotations

import json

import pytest
import torch

from adapterzoo import UnknownAdapterError, Zoo
from adapterzoo.base import base_state_checksum
from adapterzoo.formats.native import CONFIG_FILE, WEIGHTS_FILE
from adapterzoo.testing.models import output, perturb, tiny_model, tiny_zoo

IDS = torch.randint(4, 100, (3, 6), generator=torch.Generator().manual_seed(0))


def run(zoo, names, ids=IDS):
    with torch.inference_mode():
        return output(zoo(ids[: len(names)], None, names))


def test_base_is_frozen_in_eval_mode_and_never_changes():
    zoo = tiny_zoo("llama")
    before = base_state_checksum(zoo.model)
    assert not zoo.model.training
    assert not any(p.requires_grad for p in zoo.model.parameters())
    zoo.add_adapter("a", "lora", init_lora_weights=False)
    zoo.add_adapter("b", "bitfit")
    perturb(zoo, "b")
    loss = output(zoo(IDS, None, ["a", "b", None])).pow(2).mean()
    loss.backward()
    run(zoo, ["a", "b", None])
    assert base_state_checksum(zoo.model) == before


def test_adapters_lists_type_config_and_where():
    zoo = tiny_zoo("gpt2")
    info = zoo.add_adapter("sql", "lora", r=4, target_modules=["c_attn"])
    assert info.type == "lora" and info.config["r"] == 4 and info.trainable
    assert zoo.adapters["sql"].where == "host"  # not yet used
    run(zoo, ["sql"])
    assert zoo.adapters["sql"].where == "device"
    assert zoo.adapters["sql"].parameters == 2 * 4 * (32 + 96)  # A (4 x 32) + B (96 x 4) per layer


def test_save_writes_safetensors_and_json_with_the_fingerprint(tmp_path):
    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", "houlsby", bottleneck=4)
    folder = zoo.save_adapter("a", tmp_path / "a", metadata={"task": "demo"})
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files left
    record = json.loads((folder / CONFIG_FILE).read_text())
    assert record["adapter_type"] == "houlsby" and record["config"]["bottleneck"] == 4
    assert record["base"]["id"] == zoo.fingerprint.id
    assert record["metadata"]["task"] == "demo"
    # saving again replaces both files atomically and keeps other files in the folder
    (folder / "README.md").write_text("mine")
    perturb(zoo, "a")
    zoo.save_adapter("a", folder)
    assert (folder / "README.md").read_text() == "mine"
    other = tiny_zoo("llama")
    other.load_adapter("a", folder)
    torch.testing.assert_close(run(other, ["a"]), run(zoo, ["a"]), atol=0, rtol=0)


def test_remove_then_reuse_the_name():
    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", "lora", init_lora_weights=False)
    first = run(zoo, ["a"])
    zoo.remove_adapter("a")
    assert "a" not in zoo.adapters
    assert all(p.slot_of("a") is None for p in zoo.pools.values())
    zoo.add_adapter("a", "lora", init_lora_weights=False, seed=9)
    assert not torch.equal(run(zoo, ["a"]), first)


def test_lru_spills_to_host_and_comes_back_with_the_same_results():
    zoo = tiny_zoo("llama", slots=2)
    for i in range(3):
        zoo.add_adapter(f"l{i}", "lora", r=4, init_lora_weights=False, seed=i, trainable=False)
    first = {n: run(zoo, [n]) for n in ("l0", "l1")}
    assert zoo.adapters["l0"].where == zoo.adapters["l1"].where == "device"
    run(zoo, ["l2"])  # the pool is full: l0, least recently used, goes back to host memory
    assert zoo.adapters["l0"].where == "host"
    assert zoo.adapters["l1"].where == zoo.adapters["l2"].where == "device"
    torch.testing.assert_close(run(zoo, ["l0"]), first["l0"], atol=0, rtol=0)  # back, same result
    assert zoo.adapters["l0"].where == "device" and zoo.adapters["l1"].where == "host"
    torch.testing.assert_close(run(zoo, ["l1"]), first["l1"], atol=0, rtol=0)


def test_residency_says_which_adapters_exist_where_each_lives_and_how_many_slots_hold_one():
    zoo = tiny_zoo("llama", slots=2)
    for i in range(3):
        zoo.add_adapter(f"l{i}", "lora", r=4, init_lora_weights=False, seed=i, trainable=False)
    zoo.add_adapter("p", "soft_prompt", num_virtual_tokens=4, trainable=False)
    assert zoo.adapter_names() == ["l0", "l1", "l2", "p"] and zoo.find_adapter("nope") is None
    assert [zoo.where(n) for n in ("l0", "nope")] == ["host", None] and zoo.slots_in_use() == 0
    run(zoo, ["l0"])
    run(zoo, ["l1", "l2"])  # two slots: l0, least recently used, goes back to host memory
    assert [zoo.where(n) for n in ("l0", "l1", "l2")] == ["host", "device", "device"]
    assert zoo.slots_in_use() == 2 and zoo.where("l1") == zoo.adapters["l1"].where
    zoo.remove_adapter("l1")
    assert zoo.where("l1") is None and zoo.slots_in_use() == 1


def test_token_lengths_are_an_adapters_virtual_and_prefix_tokens():
    zoo = tiny_zoo("llama")
    zoo.add_adapter("l", "lora", r=4)
    zoo.add_adapter("p", "soft_prompt", num_virtual_tokens=4)
    zoo.add_adapter("x", "prefix", num_virtual_tokens=3)
    assert [zoo.token_lengths(n) for n in "lpx"] == [(0, 0), (4, 0), (0, 3)]
    with pytest.raises(UnknownAdapterError):
        zoo.token_lengths("nope")


def test_exclusive_holds_off_other_threads_until_it_ends():
    import threading

    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", "lora", r=4)
    added = threading.Event()
    with zoo.exclusive():
        with zoo.exclusive():  # re-entrant: the thread holding it may plan, add and remove
            pass
        adder = threading.Thread(target=lambda: (zoo.add_adapter("b", "lora", r=4), added.set()))
        adder.start()
        assert not added.wait(0.3) and zoo.find_adapter("b") is None
    adder.join(30)
    assert added.is_set() and zoo.where("b") == "host"


def test_a_plan_whose_slot_was_taken_is_planned_again():
    # slots=1: planning "b" evicts "a" and writes "b" into the very slot plan_a points at
    zoo = tiny_zoo("llama", slots=1)
    for i, name in enumerate("ab"):
        zoo.add_adapter(name, "lora", r=4, init_lora_weights=False, seed=i, trainable=False)
    alone = run(zoo, ["a"])
    plan_a = zoo.plan(["a"])
    zoo.plan(["b"])
    assert not plan_a.is_current()
    with torch.inference_mode():
        again = output(zoo(IDS[:1], None, plan=plan_a))
    torch.testing.assert_close(again, alone, atol=0, rtol=0)


def test_threads_sharing_one_slot_each_get_their_own_adapter():
    import threading

    zoo = tiny_zoo("llama", slots=1)
    for i, name in enumerate("ab"):
        zoo.add_adapter(name, "lora", r=4, init_lora_weights=False, seed=i, trainable=False)
    prompts = ["abc", "hello"]
    solo = {n: zoo.generate(prompts, [n, n], max_new_tokens=6) for n in "ab"}
    results: dict[str, list] = {n: [] for n in "ab"}

    def work(name: str) -> None:
        for _ in range(3):
            results[name].append(zoo.generate(prompts, [name, name], max_new_tokens=6))

    threads = [threading.Thread(target=work, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n: [solo[n]] * 3 for n in "ab"}


def test_adding_adapters_after_a_prefix_generation_changes_no_other_output():
    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", "lora", r=4, init_lora_weights=False, trainable=False)
    zoo.add_adapter("p", "prefix", num_virtual_tokens=3, trainable=False)
    before = run(zoo, ["a", "p"])
    zoo.generate(["abc"], ["p"], max_new_tokens=2)  # prefixes written into a KV cache
    zoo.add_adapter("b", "lora", r=4, init_lora_weights=False, seed=1, trainable=False)  # same sites as "a"
    torch.testing.assert_close(run(zoo, ["a", "p"]), before, atol=0, rtol=0)


def test_ranks_share_pools_by_bucket():
    zoo = tiny_zoo("llama")
    for name, r in [("r5", 5), ("r8", 8), ("r12", 12)]:
        zoo.add_adapter(name, "lora", r=r, init_lora_weights=False, trainable=False)
    run(zoo, ["r5", "r8", "r12"])
    assert {key[2] for key in zoo.pools} == {(("r", 8),), (("r", 16),)}
    assert zoo.pools[zoo.get_adapter("r5").pool_key] is zoo.pools[zoo.get_adapter("r8").pool_key]


def test_hot_swap_changes_only_that_adapter():
    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", "lora", init_lora_weights=False, trainable=False)
    zoo.add_adapter("b", "lora", init_lora_weights=False, seed=1, trainable=False)
    before = run(zoo, ["a", "b", None])
    perturb(zoo, "b", seed=3)  # an in-place edit (as an optimizer step would make) is picked up
    after = run(zoo, ["a", "b", None])
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], atol=0, rtol=0)
    assert not torch.allclose(after[1], before[1])
    assert zoo.adapters["b"].where == "device"


def test_trainable_adapters_train_from_their_own_tensors():
    zoo = tiny_zoo("llama")
    zoo.add_adapter("t", "lora", init_lora_weights=False)
    out = output(zoo(IDS[:1], None, ["t"]))
    assert out.requires_grad  # grad mode: the adapter's own parameters, not a slot copy
    with torch.inference_mode():
        torch.testing.assert_close(output(zoo(IDS[:1], None, ["t"])), out.detach(), atol=1e-6, rtol=0)


def test_from_pretrained_folder_and_dtype(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    zoo = Zoo.from_pretrained(tmp_path / "base", device="cpu", dtype=torch.bfloat16)
    assert zoo.dtype == torch.bfloat16 and next(zoo.model.parameters()).dtype == torch.bfloat16
    fp32 = Zoo.from_pretrained(tmp_path / "base", device="cpu")
    assert zoo.fingerprint.id == fp32.fingerprint.id  # same base, whatever the dtype
    zoo.add_adapter("a", "lora", init_lora_weights=False)
    with torch.inference_mode():
        assert zoo(IDS, None, ["a", None, "a"]).logits.dtype == torch.bfloat16


def test_encoder_base_returns_hidden_states():
    zoo = tiny_zoo("bert")
    zoo.add_adapter("p", "soft_prompt", num_virtual_tokens=3)
    with torch.inference_mode():
        out = zoo(IDS, None, ["p", None, None])
    assert out.logits is None and out.last_hidden_state.shape == (3, 6, 32)
