"""BatchPlan and SlotWeights: every way of computing x @ W[slot] per row gives the same answer."""

from __future__ import annotations

import types

import pytest
import torch

from adapterzoo.plan import PoolUse, _equal_runs, build_plan
from adapterzoo.types import KINDS


def fake_pool(slots: int = 6, fan_in: int = 5, fan_out: int = 3):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(slots, fan_in, fan_out, generator=g)
    W[0] = 0  # slot 0: no adapter
    return types.SimpleNamespace(
        atype=types.SimpleNamespace(kind="delta", facts=KINDS["delta"]), constants={}, variant="", shared={}
    ), W


@pytest.mark.parametrize("slots", [[3, 3, 3, 3], [1, 4, 2, 5], [2, 2, 5, 5, 1, 1], [1, 1, 1, 2, 2, 2], [4, 1, 1, 4]])
@pytest.mark.parametrize("tokens", [1, 3])
def test_matmul_by_slot_matches_the_naive_loop(slots, tokens):
    pool, W = fake_pool()
    plan = build_plan([(pool, s, 0) for s in slots], torch.device("cpu"))
    use = plan.deltas[0]
    x = torch.randn(len(slots), tokens, W.shape[1])
    w = use.gather({"W": W})
    got = w.matmul(x, "W")
    expected = torch.stack([x[i] @ W[s] for i, s in enumerate(slots)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    if len(set(slots)) > 1:
        torch.testing.assert_close(w["W"], W[torch.tensor(slots)])  # the gathered view a type may use


def test_plan_marks_runs_and_shared_slots():
    pool, _ = fake_pool()
    plan = build_plan([(pool, 2, 0)] * 3 + [(pool, 5, 0)] * 3, torch.device("cpu"))
    assert plan.deltas[0].run_slots.tolist() == [2, 5] and plan.deltas[0].rows is None
    plan = build_plan([(pool, 2, 0), None, (pool, 2, 0)], torch.device("cpu"))
    assert plan.deltas[0].slots == 2 and plan.deltas[0].rows.tolist() == [0, 2]


@pytest.mark.parametrize(
    "slots,runs",
    [
        ([1, 1, 2, 2], [1, 2]),
        ([1, 2, 3], None),
        ([1, 1, 1], None),
        ([1, 1, 2, 2, 2], None),
        ([1, 1, 2, 2, 1, 1], [1, 2, 1]),
    ],
)
def test_equal_runs(slots, runs):
    assert _equal_runs(slots) == runs


def test_bag_indices_are_made_once_per_plan():
    pool, W = fake_pool()
    use = PoolUse(pool=pool, rows=None, slots=torch.tensor([1, 3]))
    first = use.bag_index(5, torch.device("cpu"))
    assert use.bag_index(5, torch.device("cpu")) is first


def test_a_decode_step_over_every_row_reads_no_weights_for_the_rows_of_other_pools():
    # every_row() gives other pools' rows slot 0 (zeros): their bags are empty, so they add exactly
    # nothing, and what they hold (even inf) never reaches the product
    pool, W = fake_pool()
    plan = build_plan([None, (pool, 3, 0), None, (pool, 1, 0)], torch.device("cpu"))
    use = plan.deltas[0].every_row()
    assert use.slots.tolist() == [0, 3, 0, 1]
    index, offsets, weighed = use.bag_index(5, torch.device("cpu"))
    assert (
        len(index) == 2 * 5 and offsets.tolist() == [0, 0, 5, 5] and weighed.tolist() == [*range(5, 10), *range(15, 20)]
    )
    x = torch.randn(4, 1, 5)
    x[0] = x[2] = float("inf")
    got = use.gather({"W": W}).matmul(x, "W")
    assert torch.equal(got[0], torch.zeros(1, 3)) and torch.equal(got[2], torch.zeros(1, 3))
    torch.testing.assert_close(got[1], x[1] @ W[3])
    torch.testing.assert_close(got[3], x[3] @ W[1])


def test_a_kept_plan_hands_back_the_same_weights_and_site_lookups_at_every_step():
    pool, W = fake_pool()
    pool.slots_are_stamped = True
    pool.site = lambda site: {"W": W} if site == "here" else None
    plan = build_plan([(pool, 1, 0), (pool, 2, 0)], torch.device("cpu"))
    with torch.inference_mode():
        at = plan.deltas_at("here")
        assert plan.deltas_at("here") is at and plan.deltas_at("elsewhere") == []
        use, tensors = at[0]
        w = use.gather(tensors, "here")
        assert use.gather(tensors, "here") is w
        assert use.gather({"W": W.clone()}, "here") is not w  # the pool's tensors replaced: gathered again
