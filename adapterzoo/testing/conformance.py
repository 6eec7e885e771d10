"""The conformance suite: what every adapter type, built-in or third-party, must satisfy.

Run it against every registered type (the default) or some of them:

    python -m pytest --pyargs adapterzoo.testing.conformance
    ADAPTERZOO_CONFORMANCE_TYPES=ia3 python -m pytest --pyargs adapterzoo.testing.conformance

Each check runs on tiny seeded Llama, GPT-2 and BERT bases, with the type's default config.
"""

from __future__ import annotations

import os

import pytest
import torch

from adapterzoo import plugins
from adapterzoo.base import base_state_checksum
from adapterzoo.testing.models import FAMILIES, output, perturb, tiny_zoo


def _type_names() -> list[str]:
    chosen = os.environ.get("ADAPTERZOO_CONFORMANCE_TYPES")
    names = sorted(plugins.adapter_types())
    return [n.strip() for n in chosen.split(",") if n.strip()] if chosen else names


@pytest.fixture(params=_type_names())
def type_name(request) -> str:
    return request.param


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def _batch(seed: int, rows: int, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (rows, length), generator=g)
    lengths = torch.randint(2, length + 1, (rows,), generator=g)
    mask = (torch.arange(length)[None, :] >= length - lengths[:, None]).long()  # left padding
    return ids, mask, lengths


def _identity_types() -> list[str]:
    """Types whose fresh adapters must leave the base's outputs unchanged: the delta kinds (a
    prompt or prefix adds virtual tokens, which change outputs by design)."""
    found = plugins.adapter_types()
    return [n for n in _type_names() if found[n].cls.kind == "delta"]


@pytest.mark.parametrize("identity_type", _identity_types())
@torch.no_grad()
def test_fresh_adapter_is_identity(identity_type, family):
    zoo = tiny_zoo(family)
    zoo.add_adapter("fresh", identity_type)
    ids, mask, _ = _batch(0, 3)
    base = output(zoo(ids, mask, [None] * 3))
    adapted = output(zoo(ids, mask, ["fresh"] * 3))
    torch.testing.assert_close(adapted, base, atol=1e-6, rtol=0)


@torch.no_grad()
def test_save_then_load_is_exact(type_name, family, tmp_path):
    zoo = tiny_zoo(family)
    zoo.add_adapter("a", type_name, seed=1)
    perturb(zoo, "a")
    zoo.save_adapter("a", tmp_path / "a")
    other = tiny_zoo(family)
    other.load_adapter("a", tmp_path / "a")
    for key, t in zoo.get_adapter("a").state_dict().items():
        assert torch.equal(other.get_adapter("a").state_dict()[key], t), key
    ids, mask, _ = _batch(1, 2)
    torch.testing.assert_close(output(other(ids, mask, ["a", "a"])), output(zoo(ids, mask, ["a", "a"])), atol=0, rtol=0)


@torch.no_grad()
def test_mixed_batch_equals_solo(type_name, family):
    zoo = tiny_zoo(family)
    for i, name in enumerate(("a", "b")):
        zoo.add_adapter(name, type_name, seed=i)
        perturb(zoo, name, seed=i)
    zoo.add_adapter("lora", "lora", init_lora_weights=False)
    names = ["a", None, "b", "lora", "a"]
    ids, mask, lengths = _batch(2, len(names))
    mixed = output(zoo(ids, mask, names))
    T = ids.shape[1]
    for i, name in enumerate(names):
        real = slice(T - int(lengths[i]), T)
        solo = output(zoo(ids[i : i + 1, real], None, [name]))
        torch.testing.assert_close(mixed[i, real], solo[0], atol=1e-4, rtol=1e-4, msg=f"row {i} ({name})")


def test_gradients_reach_only_their_own_adapter(type_name, family):
    zoo = tiny_zoo(family)
    zoo.add_adapter("a", type_name, seed=0)
    zoo.add_adapter("b", type_name, seed=1)
    perturb(zoo, "a")  # so that every tensor lies on the gradient's path (e.g. LoRA's A behind B = 0)
    perturb(zoo, "b")
    before = base_state_checksum(zoo.model)
    ids, mask, _ = _batch(3, 3)
    out = output(zoo(ids, mask, ["a", "b", None]))
    out[0].float().pow(2).mean().backward()  # a loss on row 0 only, which uses "a"
    a_grads = [p.grad for p in zoo.get_adapter("a").parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in a_grads)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in zoo.get_adapter("b").parameters())
    assert all(p.grad is None for p in zoo.model.parameters())
    assert base_state_checksum(zoo.model) == before


@torch.no_grad()
def test_other_adapters_are_untouched_by_add_load_remove(type_name, family, tmp_path):
    zoo = tiny_zoo(family, slots=2)
    zoo.add_adapter("keep", type_name, seed=5)
    perturb(zoo, "keep", seed=5)
    ids, mask, _ = _batch(4, 2)
    before = output(zoo(ids, mask, ["keep", None]))
    zoo.add_adapter("x", type_name, seed=6)
    perturb(zoo, "x", seed=6)
    zoo.save_adapter("x", tmp_path / "x")
    zoo(ids, mask, ["x", "keep"])
    zoo.remove_adapter("x")
    zoo.load_adapter("y", tmp_path / "x")
    zoo(ids, mask, ["y", "y"])
    torch.testing.assert_close(output(zoo(ids, mask, ["keep", None])), before, atol=0, rtol=0)
