"""A slot taken from an evicted adapter is written whole: nothing of the evicted one is read after."""

from __future__ import annotations

import pytest
import torch

from adapterzoo.testing.models import output, perturb, tiny_zoo

TYPES = {
    # r=8 and r=5 share a pool (bucket 8): the smaller adapter is padded into the slot
    "lora": ({"r": 8, "target_modules": ["q_proj", "v_proj"]}, {"r": 5, "target_modules": ["q_proj", "v_proj"]}),
    "bitfit": ({}, {}),
    "houlsby": ({"bottleneck": 8}, {"bottleneck": 5}),
}


@pytest.mark.parametrize("kind", list(TYPES))
def test_an_adapter_placed_in_an_evicted_slot_answers_as_in_a_fresh_zoo(kind):
    first, second = TYPES[kind]
    atype = "lora" if kind.startswith("lora") else kind
    ids = torch.tensor([[3, 7, 1, 4, 2]])

    fresh = tiny_zoo("llama", slots=1)
    fresh.add_adapter("b", atype, trainable=False, **second)
    perturb(fresh, "b", seed=2)
    with torch.inference_mode():
        expected = output(fresh.forward(ids, adapters=["b"]))

    zoo = tiny_zoo("llama", slots=1)  # one slot: "b" must take "a"'s
    zoo.add_adapter("a", atype, trainable=False, **first)
    zoo.add_adapter("b", atype, trainable=False, **second)
    perturb(zoo, "a", scale=5.0, seed=1)  # large: any of it left in the slot shows
    zoo.get_adapter("b").tensors.update(
        {site: {k: t.clone() for k, t in ts.items()} for site, ts in fresh.get_adapter("b").tensors.items()}
    )
    zoo.get_adapter("b").mark_edited()
    with torch.inference_mode():
        zoo.forward(ids, adapters=["a"])
        got = output(zoo.forward(ids, adapters=["b"]))
    pool = zoo.pools[zoo.get_adapter("b").pool_key]
    assert pool is zoo.pools[zoo.get_adapter("a").pool_key] and pool.slot_of("a") is None  # "b" took its slot
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
