"""Attacks, round 4: on grouped prefills (joiners held up to `prefill_wait` steps so that
`prefill_group` requests share one prefill) and on the KV cache that appends into spare room.
Each hole found is written here as the attack first (it failed before its fix)."""

from __future__ import annotations

import time

from adapterzoo.serve import Engine, SamplingParams

from .test_fairness import _steps_to_finish, zoo


def test_a_tenant_at_its_row_share_does_not_hold_back_another_tenants_first_prefill():
    """Tenant "flood" fills its row share and queues many more requests, which cannot join until
    its own rows end. Tenant "b"'s lone 4-token request must not be held back waiting for them
    to share its prefill (it was held `prefill_wait` steps: 9 steps against 3 alone)."""
    with Engine(zoo(), max_batch=16, max_rows_per_tenant=3, prefill_group=4, prefill_wait=6) as engine:
        idle = _steps_to_finish(engine, "hello", "b-lora", "b")
        flood = engine.submit_many(
            ["abc"] * 12, "a-lora", [SamplingParams(max_tokens=160, ignore_eos=True)] * 12, tenant="flood"
        )
        while engine.stats()["running"] < 3:
            time.sleep(0.001)
        waited = _steps_to_finish(engine, "hello", "b-lora", "b")
        for h in flood:
            h.cancel()
    assert waited <= idle + 1, (waited, idle)
