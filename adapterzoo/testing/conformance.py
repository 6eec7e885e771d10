"""The conformance suite: what every adapter type, built-in or third-party, must satisfy.

Run it against every registered type (the default) or some of them:

    python -m pytest --pyargs adapterzoo.testing.conformance
    ADAPTERZOO_CONFORMANCE_TYPES=ia3 python -m pytest --pyargs adapterzoo.testing.conformance

Each check runs on tiny seeded Llama, GPT-2 and BERT bases, once per config the type lists in
`conformance_configs()` (default: its default config), so every code path a type has is checked.
A decode-shape timing smoke check (`test_decode_step_costs_at_most_3x_the_base`) flags a type
whose decode step costs over 3x the base's: usually math recomputed per forward that belongs in
`derive()`.
"""

from __future__ import annotations

import os

import pytest
import torch

from adapterzoo import plugins
from adapterzoo.base import base_state_checksum
from adapterzoo.testing.models import FAMILIES, output, perturb, tiny_zoo
from adapterzoo.testing.speed import decode_cost
from adapterzoo.types import KINDS

DECODE_LIMIT = 3.0  # a type's decode step may cost at most this many times the base's


def _type_names() -> list[str]:
    chosen = os.environ.get("ADAPTERZOO_CONFORMANCE_TYPES")
    names = sorted(plugins.adapter_types())
    return [n.strip() for n in chosen.split(",") if n.strip()] if chosen else names


def _cases(kinds_only: bool = False) -> list:
    """(type name, config) for each config each chosen type lists, with ids like `lora-0`."""
    found = plugins.adapter_types()
    cases = []
    for name in _type_names():
        cls = found[name].cls
        if kinds_only and not KINDS[cls.kind].identity_when_new:
            continue
        for i, config in enumerate(cls.conformance_configs()):
            cases.append(pytest.param((name, dict(config)), id=f"{name}-{i}"))
    return cases


@pytest.fixture(params=_cases())
def case(request) -> tuple[str, dict]:
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


@pytest.mark.parametrize("identity_case", _cases(kinds_only=True))
@torch.no_grad()
def test_fresh_adapter_is_identity(identity_case, family):
    """Delta kinds only: a prompt or prefix adds virtual tokens, which change outputs by design."""
    type_name, config = identity_case
    zoo = tiny_zoo(family)
    zoo.add_adapter("fresh", type_name, **config)
    ids, mask, _ = _batch(0, 3)
    base = output(zoo(ids, mask, [None] * 3))
    adapted = output(zoo(ids, mask, ["fresh"] * 3))
    torch.testing.assert_close(adapted, base, atol=1e-6, rtol=0)


@torch.no_grad()
def test_save_then_load_is_exact(case, family, tmp_path):
    type_name, config = case
    zoo = tiny_zoo(family)
    zoo.add_adapter("a", type_name, seed=1, **config)
    perturb(zoo, "a")
    zoo.save_adapter("a", tmp_path / "a")
    other = tiny_zoo(family)
    other.load_adapter("a", tmp_path / "a")
    for key, t in zoo.get_adapter("a").state_dict().items():
        assert torch.equal(other.get_adapter("a").state_dict()[key], t), key
    ids, mask, _ = _batch(1, 2)
    torch.testing.assert_close(output(other(ids, mask, ["a", "a"])), output(zoo(ids, mask, ["a", "a"])), atol=0, rtol=0)


@torch.no_grad()
def test_mixed_batch_equals_solo(case, family):
    type_name, config = case
    zoo = tiny_zoo(family)
    for i, name in enumerate(("a", "b")):
        zoo.add_adapter(name, type_name, seed=i, **config)
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


def test_gradients_reach_only_their_own_adapter(case, family):
    type_name, config = case
    zoo = tiny_zoo(family)
    zoo.add_adapter("a", type_name, seed=0, **config)
    zoo.add_adapter("b", type_name, seed=1, **config)
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
def test_other_adapters_are_untouched_by_add_load_remove(case, family, tmp_path):
    type_name, config = case
    zoo = tiny_zoo(family, slots=2)
    zoo.add_adapter("keep", type_name, seed=5, **config)
    perturb(zoo, "keep", seed=5)
    ids, mask, _ = _batch(4, 2)
    before = output(zoo(ids, mask, ["keep", None]))
    zoo.add_adapter("x", type_name, seed=6, **config)
    perturb(zoo, "x", seed=6)
    zoo.save_adapter("x", tmp_path / "x")
    zoo(ids, mask, ["x", "keep"])
    zoo.remove_adapter("x")
    zoo.load_adapter("y", tmp_path / "x")
    zoo(ids, mask, ["y", "y"])
    torch.testing.assert_close(output(zoo(ids, mask, ["keep", None])), before, atol=0, rtol=0)


def test_decode_step_costs_at_most_3x_the_base(case):
    """A smoke check, not a benchmark: 64 rows x 1 new token with a KV cache, 16 distinct adapters,
    on a small Llama; interleaved rounds, best times. benchmarks/mixed_batch.py measures for real."""
    type_name, config = case
    for _ in range(3):  # timings on a shared machine are noisy: a type is flagged only if every try says so
        ratio = decode_cost(type_name, config)
        if ratio <= DECODE_LIMIT:
            break
    assert ratio <= DECODE_LIMIT, (
        f"a decode step with {type_name} adapters ({config}) costs {ratio:.2f}x the base's (limit {DECODE_LIMIT}x); "
        "compute what depends only on the adapter once per slot placement, in derive() (docs/plugins.md)"
    )
