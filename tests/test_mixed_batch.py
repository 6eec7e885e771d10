"""Any mixture of adapter types and "no adapter" in one batch: each row equals that row alone.

DESIGN.md: "A row's result in a mixed batch equals that row run alone, with or without padding,
to 1e-4 in float32." Checked with hypothesis over random mixtures, lengths and padding sides.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterzoo.testing.models import FAMILIES, output, perturb, tiny_zoo

ADAPTERS = {
    "lora4": ("lora", {"r": 4, "init_lora_weights": False}),
    "lora16": ("lora", {"r": 16, "init_lora_weights": False, "target_modules": "all-linear", "use_rslora": True}),
    "houlsby": ("houlsby", {"bottleneck": 8}),
    "pfeiffer": ("houlsby", {"bottleneck": 3, "locations": ["ffn"], "activation": "relu"}),
    "bitfit": ("bitfit", {}),
    "adapterbias": ("adapterbias", {}),
    "prefix3": ("prefix", {"num_virtual_tokens": 3}),
    "prefix5": ("prefix", {"num_virtual_tokens": 5}),
    "prompt2": ("soft_prompt", {"num_virtual_tokens": 2}),
    "prompt4": ("soft_prompt", {"num_virtual_tokens": 4, "init": "random"}),
}
NAMES = [*ADAPTERS, None]


@functools.cache
def zoo_for(family: str):
    zoo = tiny_zoo(family, slots=4)
    for i, (name, (type_name, config)) in enumerate(ADAPTERS.items()):
        zoo.add_adapter(name, type_name, seed=i, trainable=False, **config)
        perturb(zoo, name, seed=i)
    return zoo


def _run_and_compare(zoo, names, lengths, side, seed):
    T = max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (len(names), T), generator=g)
    mask = torch.zeros(len(names), T, dtype=torch.long)
    spans = []
    for i, n in enumerate(lengths):
        span = slice(T - n, T) if side == "left" else slice(0, n)
        mask[i, span] = 1
        spans.append(span)
    with torch.inference_mode():
        mixed = output(zoo(ids, mask, names))
        assert mixed.shape[:2] == ids.shape  # virtual tokens never show in the outputs
        for i, (name, span) in enumerate(zip(names, spans)):
            solo = output(zoo(ids[i : i + 1, span], None, [name]))
            torch.testing.assert_close(mixed[i, span], solo[0], atol=1e-4, rtol=1e-4, msg=f"row {i} ({name}, {side})")


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.tuples(st.sampled_from(NAMES), st.integers(1, 7)), min_size=1, max_size=7),
    side=st.sampled_from(["left", "right"]),
    seed=st.integers(0, 2**16),
)
def test_random_mixtures_equal_solo_runs(family, rows, side, seed):
    names = [r[0] for r in rows]
    lengths = [r[1] for r in rows]
    _run_and_compare(zoo_for(family), names, lengths, side, seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_type_at_once_both_paddings(family):
    for side in ("left", "right"):
        _run_and_compare(zoo_for(family), NAMES, [7, 3, 5, 2, 6, 4, 7, 1, 3, 5, 6], side, seed=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_really_change_their_rows(family):
    zoo = zoo_for(family)
    ids = torch.randint(4, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        base = output(zoo(ids, None, [None]))
        for name in ADAPTERS:
            assert (output(zoo(ids, None, [name])) - base).abs().max() > 1e-3, name


def test_the_batch_is_computed_per_pool_not_per_row():
    """The plan has one entry per pool the batch touches, whatever the number of rows."""
    zoo = zoo_for("llama")
    plan = zoo.plan(["lora4", "lora4", "houlsby", None, "prefix3", "prefix5", "lora4"] * 3, training=False)
    pools = [use.pool for use in plan.deltas + plan.prompts + plan.prefixes]
    # lora r=4, houlsby, prefix P=3 (bucket 4) and prefix P=5 (bucket 8): four pools for 21 rows
    assert len(pools) == len({id(p) for p in pools}) == 4
    lora = next(u for u in plan.deltas if u.pool.atype.name == "lora")
    assert lora.slots == zoo.pools[zoo.get_adapter("lora4").pool_key].slot_of("lora4")  # one slot, broadcast
    assert lora.rows.tolist() == [r for r in range(21) if r % 7 in (0, 1, 6)]
