"""The engine's packed linears (serve/packed.py): the same numbers as F.linear, and nothing else changes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from adapterzoo.base import base_state_checksum
from adapterzoo.runtime import instance_forward
from adapterzoo.serve import Engine, SamplingParams
from adapterzoo.serve.packed import PackedForward, available, pack_linears, unpack_linears
from adapterzoo.testing.models import tiny_zoo

from .conftest import TYPE_NAMES, make_adapters

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN packed linear")


def packed_count(model: nn.Module) -> int:
    return sum(isinstance(instance_forward(m), PackedForward) for m in model.modules())


def test_a_packed_base_gives_the_same_logits_for_every_type_and_each_row_its_solo_result():
    zoo = tiny_zoo("llama", slots=16)
    make_adapters(zoo, None, TYPE_NAMES)
    names = [*TYPE_NAMES, None]
    ids = torch.randint(3, 40, (len(names), 6))
    with torch.inference_mode():
        before = zoo.forward(ids, None, names).logits
        assert pack_linears(zoo.model) > 0
        after = zoo.forward(ids, None, names).logits
        alone = torch.cat([zoo.forward(ids[i : i + 1], None, [names[i]]).logits for i in range(len(names))])
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, after, rtol=1e-5, atol=1e-5)


def test_the_engine_packs_the_base_and_leaves_its_weights_as_they_were():
    zoo = tiny_zoo("llama")
    checksum = base_state_checksum(zoo.model)
    with Engine(zoo, max_batch=4) as engine:
        done = engine.submit("hello", None, SamplingParams(max_tokens=3, ignore_eos=True)).result(60)
        assert done.completion_tokens == 3
    assert packed_count(zoo.model) > 0
    assert base_state_checksum(zoo.model) == checksum


def test_ADAPTERZOO_PACKED_LINEAR_0_keeps_F_linear(monkeypatch):
    monkeypatch.setenv("ADAPTERZOO_PACKED_LINEAR", "0")
    zoo = tiny_zoo("llama")
    with Engine(zoo, max_batch=4) as engine:
        engine.generate("hello", max_tokens=2, timeout=60)
    assert packed_count(zoo.model) == 0


def test_a_packed_model_deep_copies_pickles_and_merges():
    zoo = tiny_zoo("llama")
    make_adapters(zoo, None, ["lora-a"])
    pack_linears(zoo.model)
    ids = torch.randint(3, 40, (2, 5))
    with torch.inference_mode():
        expected = zoo.model(input_ids=ids).logits
        torch.testing.assert_close(copy.deepcopy(zoo.model)(input_ids=ids).logits, expected)
    plain = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)).requires_grad_(False)  # (the zoo's hooks do not pickle)
    pack_linears(plain)
    x = torch.randn(3, 8)
    torch.testing.assert_close(pickle.loads(pickle.dumps(plain))(x), plain(x))
    merged = zoo.merged_model("lora-a")  # deep-copies the packed base, then writes merged weights
    with torch.inference_mode():
        ours = zoo.forward(ids, None, ["lora-a", "lora-a"]).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_training_falls_back_to_F_linear_and_gradients_flow():
    layer = nn.Linear(8, 4).requires_grad_(False)
    pack_linears(layer)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(3, 8))


def test_a_weight_written_in_place_is_packed_again():
    layer = nn.Linear(8, 4).requires_grad_(False)
    pack_linears(layer)
    x = torch.randn(3, 8)
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    unpack_linears(layer)
    assert packed_count(layer) == 0


def test_adapters_added_after_packing_wrap_the_packed_forward_and_unpacking_keeps_their_deltas():
    # a delta site installed on a packed linear runs the packed product, then the deltas; packing or
    # unpacking under an installed site swaps only the product (runtime.set_instance_forward)
    plain = tiny_zoo("llama", slots=16)
    make_adapters(plain, None, TYPE_NAMES)
    zoo = tiny_zoo("llama", slots=16)
    assert pack_linears(zoo.model) > 0
    make_adapters(zoo, None, TYPE_NAMES)
    names = [*TYPE_NAMES, None]
    ids = torch.randint(3, 40, (len(names), 6))
    with torch.inference_mode():
        expected = plain.forward(ids, None, names).logits
        packed = zoo.forward(ids, None, names).logits
        unpack_linears(zoo.model)
        assert packed_count(zoo.model) == 0
        unpacked = zoo.forward(ids, None, names).logits
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unpacked, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(expected[0], expected[-1])  # the adapters changed their rows
