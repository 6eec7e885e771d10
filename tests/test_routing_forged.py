"""A routing record is written by whoever publishes the adapter: its stored features must not let
it take prompts its examples do not describe (adapterzoo/routing.py, `_check_stored`)."""

from __future__ import annotations

import torch

from adapterzoo import routing
from adapterzoo.demo import SPECIALISTS
from adapterzoo.tasks import instructed_examples
from adapterzoo.testing.models import tiny_zoo
from tests import routing_fixtures

# the shared fixtures (tests/routing_fixtures.py)
encoder, zoo, victims_prompts = routing_fixtures.encoder, routing_fixtures.zoo, routing_fixtures.victims_prompts


def forged_record(encoder, aimed_at: list[str]) -> dict:
    """Harmless examples, with the features of the prompts it wants (as a forger computes them),
    each NEIGHBOURS times: the score is the mean of that many nearest rows."""
    aimed_at = [prompt for prompt in aimed_at for _ in range(routing.NEIGHBOURS)]
    examples = [f"A recipe for banana bread, number {i}" for i in range(len(aimed_at))]
    return routing_fixtures.record_with(examples, encoder(aimed_at))


def test_a_record_whose_features_do_not_match_its_examples_cannot_take_another_tenants_prompts(zoo, encoder):
    honest = routing.routing_records(zoo)
    forged = forged_record(encoder, victims_prompts())
    # the tenant's own adapters are listed first, as the server lists them
    decisions = zoo.route(victims_prompts(), records={**honest, "forged": forged})
    assert [d.adapter for d in decisions] == ["reverse"] * 4
    assert "forged" not in {d.runner_up for d in decisions}  # its prototypes are now its examples'


def test_a_forged_record_cannot_take_general_prompts_from_the_base(zoo, encoder):
    general = ["Who painted the Mona Lisa?", "Write a haiku about autumn leaves.", "How do vaccines work?"]
    decisions = zoo.route(general, records={"forged": forged_record(encoder, general)})
    assert [d.adapter for d in decisions] == [None] * 3


def test_honest_stored_features_pass_the_check_and_routing_decides_as_before(encoder, caplog):
    """The specialists shipped with adapterzoo were encoded elsewhere and stored in float16: checked,
    they are replaced by what their examples encode to here (within float16's rounding, so none
    is called forged), and routing after it decides as it did before it."""
    zoo = tiny_zoo("llama")
    routing._cache(zoo).sentence = encoder
    records = {}
    for folder in sorted(p for p in SPECIALISTS.iterdir() if p.is_dir()):
        records[folder.name] = routing.read_routing_record(folder)
    prompts = [ex.prompt for name in records for ex in instructed_examples(name, 2, "test", seed=3, held_out=True)]
    first = [d.adapter for d in zoo.route(prompts, records=records)]
    cache = routing._cache(zoo)
    assert not cache.unchecked & {(routing.feature_space(zoo), routing._record_key(n, r)) for n, r in records.items()}
    stored = {name: routing._unpack(record) for name, record in records.items()}
    for name, record in records.items():
        key = (routing.feature_space(zoo), routing._record_key(name, record))
        torch.testing.assert_close(cache.features[key], stored[name], atol=2e-3, rtol=0)
    assert "not what its examples encode to" not in caplog.text
    assert [d.adapter for d in zoo.route(prompts, records=records)] == first


def test_a_forged_record_is_checked_once_and_its_replacement_kept(zoo, encoder, monkeypatch):
    records = {**routing.routing_records(zoo), "forged": forged_record(encoder, victims_prompts())}
    zoo.route(victims_prompts(), records=records)
    encoded = []
    real_features = routing.features
    monkeypatch.setattr(routing, "features", lambda *a, **k: encoded.append(a[1]) or real_features(*a, **k))
    zoo.route(victims_prompts(), records=records)
    prompts_and_instructions = [*victims_prompts(), *dict.fromkeys(map(routing.instruction_of, victims_prompts()))]
    assert all(batch == prompts_and_instructions for batch in encoded)  # only the prompts: nothing re-checked
