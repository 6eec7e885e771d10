"""Attacks on the order-aware choice among specialists (adapterzoo/routing.py, `ORDER_PARTS`,
`_parts`, `_Chooser` with each distinct example line once): hostile prompts and
routing examples get finite scores, ties go to the first listed, forged records choose nothing."""

from __future__ import annotations

import math

import pytest
import torch

from adapterzoo import routing
from adapterzoo.errors import BatchError
from adapterzoo.tasks import routing_examples
from adapterzoo.testing.models import tiny_zoo

from .test_routing_fast_path import held_out

HOSTILE_LINES = [
    "",
    " \t\n",
    ": ",
    ": abc",
    "a",
    "Reverse",
    "\x00\x01\x7f",
    "\x00: abc",
    "漢字" * 100,
    "日本語を逆順にして: abc",
    "😀" * 60,
    "🙃🙃: abc",
    "x " * 300,  # past SENTENCE_TOKENS
    "Reverse the word " * 40 + ": h e l l o",  # an instruction line of 128+ tokens
    "[CLS] [SEP] [PAD]",
    "\u200b" * 500,
]


@pytest.fixture(scope="module")
def encoder():
    return routing.SentenceEncoder(fast_dtype=torch.bfloat16)


def zoo_with(encoder, examples: dict[str, list[str]]):
    zoo = tiny_zoo("llama")
    routing._cache(zoo).sentence = encoder
    for name, lines in examples.items():
        zoo.add_adapter(name, "lora", r=4, trainable=False)
        zoo.add_routing_examples(name, lines)
    return zoo


def choice_scores(zoo, prompts: list[str], exact: bool = True) -> torch.Tensor:
    """The chooser's scores of every routable adapter for `prompts`, as `_decide` computes them."""
    protos = routing._prototypes(zoo, routing.routing_records(zoo), routing.feature_space(zoo))
    candidates = list(range(len(protos.names)))
    _, lines = routing._prompt_features(zoo, protos, prompts, exact)
    return protos.chooser(candidates).scores(lines)


def test_ordered_features_of_hostile_lines_are_finite_and_the_right_width(encoder):
    for exact in (True, False):
        feats = encoder(HOSTILE_LINES, ordered=True, exact=exact)
        assert feats.shape == (len(HOSTILE_LINES), 384 * (1 + routing.ORDER_PARTS))
        assert bool(torch.isfinite(feats).all())
        parts = feats[:, 384:].view(len(HOSTILE_LINES), routing.ORDER_PARTS, 384)
        # each part unit length times ORDER_WEIGHT, even with fewer tokens than parts
        torch.testing.assert_close(parts.norm(dim=-1), torch.full(parts.shape[:2], routing.ORDER_WEIGHT))


def test_a_line_with_fewer_tokens_than_parts_fills_the_empty_parts_with_its_mean(encoder):
    for line in ["", "a", ": "]:
        feats = encoder([line], ordered=True)[0]
        mean, parts = feats[:384], feats[384:].view(routing.ORDER_PARTS, 384)
        assert torch.equal(parts[-1], routing.ORDER_WEIGHT * mean)


def test_ordered_features_of_one_line_alone_equal_those_inside_a_padded_batch(encoder):
    together = encoder(HOSTILE_LINES, ordered=True)
    alone = torch.cat([encoder([line], ordered=True) for line in HOSTILE_LINES])
    assert torch.allclose(together, alone, atol=1e-5)


def test_the_whole_prompt_features_sliced_from_the_ordered_call_equal_routing_features_exactly(encoder):
    zoo = zoo_with(encoder, {"reverse": routing_examples("reverse", 12)})
    space = routing.feature_space(zoo)
    texts = [*HOSTILE_LINES, *held_out("reverse")]
    for exact in (True, False):
        ordered = encoder(texts, exact=exact, ordered=True)
        assert torch.equal(ordered[:, :384], routing.features(zoo, texts, space, exact=exact))
    # and as the router takes them: its own call's slice, normalised, equals `features`' normalised
    protos = routing._prototypes(zoo, routing.routing_records(zoo), space)
    prompts = held_out("reverse")
    whole, _ = routing._prompt_features(zoo, protos, prompts, True)
    distinct = list(dict.fromkeys([*prompts, *map(routing.instruction_of, prompts)]))
    plain = protos.normalise(routing.features(zoo, distinct, space))[: len(prompts)]
    assert torch.equal(whole, plain)


def test_hostile_prompts_get_a_decision_with_finite_choice_scores(encoder):
    zoo = zoo_with(encoder, {t: routing_examples(t, 12) for t in ("reverse", "upper", "digits-sort")})
    decisions = zoo.route(HOSTILE_LINES)
    assert len(decisions) == len(HOSTILE_LINES)
    assert all(d.adapter in (None, "reverse", "upper", "digits-sort") for d in decisions)
    assert bool(torch.isfinite(choice_scores(zoo, HOSTILE_LINES)).all())


@pytest.mark.parametrize("bad", ["\ud800: abc", "Reverse \udfff: abc"])
def test_a_lone_surrogate_in_the_instruction_line_is_refused_naming_the_prompt(encoder, bad):
    zoo = zoo_with(encoder, {"reverse": routing_examples("reverse", 12)})
    with pytest.raises(BatchError, match="prompt 1"):
        zoo.route(["Reverse this: abc", bad])


@pytest.mark.parametrize(
    "lines",
    [
        ["", "a", ": ", "\x00", "漢字", "😀"],  # blank ones are dropped; the rest have <= parts tokens
        [": abc"] * 24,
        ["\x00\x01: abc"] * 3,
        ["😀: x", "漢字: y"],
        ["Reverse the word " * 40 + ": abc"],
    ],
)
def test_hostile_routing_examples_give_finite_choice_scores(encoder, lines):
    zoo = zoo_with(encoder, {"reverse": routing_examples("reverse", 12), "odd": lines})
    scores = choice_scores(zoo, [*HOSTILE_LINES, *held_out("reverse")])
    assert bool(torch.isfinite(scores).all())
    assert len(zoo.route(HOSTILE_LINES)) == len(HOSTILE_LINES)


def test_an_adapter_whose_examples_are_all_one_line_scores_as_that_line(encoder):
    line = routing_examples("upper", 1)[0]
    zoo = zoo_with(encoder, {"reverse": routing_examples("reverse", 12), "upper": [line] * 24})
    protos = routing._prototypes(zoo, routing.routing_records(zoo), routing.feature_space(zoo))
    assert int(protos.chooser([0, 1]).groups[1].ge(0).sum()) == 1  # one distinct line
    once = zoo_with(encoder, {"reverse": routing_examples("reverse", 12), "upper": [line]})
    torch.testing.assert_close(choice_scores(zoo, held_out("upper")), choice_scores(once, held_out("upper")))
    # one example may not fit every prompt (the base answers some), but none goes to "reverse"
    assert {d.adapter for d in zoo.route(held_out("upper"))} <= {"upper", None}


@pytest.mark.parametrize("repeats", [1, 2, 3, 24])
def test_listing_each_example_line_more_often_changes_no_choice_score(encoder, repeats):
    """Each distinct line counts once, in the nearest mean and in the whitening alike."""
    upper = routing_examples("upper", 8)
    examples = {"reverse": routing_examples("reverse", 12), "digits-sort": routing_examples("digits-sort", 12)}
    once = zoo_with(encoder, {**examples, "upper": upper})
    repeated = zoo_with(encoder, {**examples, "upper": [line for line in upper for _ in range(repeats)][:24]})
    prompts = [*held_out("reverse"), *held_out("upper"), *HOSTILE_LINES]
    if repeats * len(upper) <= 24:
        torch.testing.assert_close(choice_scores(repeated, prompts), choice_scores(once, prompts), atol=1e-6, rtol=0)
    assert bool(torch.isfinite(choice_scores(repeated, prompts)).all())


def test_many_adapters_with_identical_examples_tie_and_the_first_listed_wins(encoder, monkeypatch):
    lines = routing_examples("reverse", 12)
    names = [f"copy-{i}" for i in range(6)]
    zoo = zoo_with(encoder, {name: lines for name in names})
    prompts = [*held_out("reverse"), *HOSTILE_LINES]
    scores = choice_scores(zoo, prompts)
    assert bool((scores == scores[:, :1]).all())  # exact ties
    closes = []
    real = routing._close_calls
    monkeypatch.setattr(routing, "_close_calls", lambda *a, **k: closes.append(r := real(*a, **k)) or r)
    for order in (names, names[::-1]):
        records = routing.routing_records(zoo)
        decisions = zoo.route(prompts, records={n: records[n] for n in order})
        assert {d.adapter for d in decisions if d.adapter is not None} <= {order[0]}
        assert any(d.adapter == order[0] for d in decisions)
    # a tie is never a close call: nothing re-encoded for it
    assert all(found == [] or all(prompts[i] in HOSTILE_LINES for i in found) for found in closes)


def test_a_copy_with_each_line_repeated_does_not_take_the_tenants_prompts(encoder):
    """An adapter listing a tenant's examples, each repeated, must not outrank the tenant (listed first):
    it scored its best line alone against the tenant's mean of three, until each line counted once."""
    lines = routing_examples("reverse", 8)
    zoo = zoo_with(encoder, {"reverse": lines, "thief": [line for line in lines for _ in range(routing.NEIGHBOURS)]})
    assert {d.adapter for d in zoo.route(held_out("reverse"))} <= {"reverse", None}


def test_the_choice_features_come_from_the_examples_never_from_a_forged_records_stored_features(encoder):
    honest = zoo_with(encoder, {"reverse": routing_examples("reverse", 12), "upper": routing_examples("upper", 12)})
    records = routing.routing_records(honest)
    forged = dict(records["upper"])
    victims = held_out("reverse")
    # aimed at the victim's prompts: their whole-prompt features, each NEIGHBOURS times
    aimed = encoder([p for p in victims for _ in range(routing.NEIGHBOURS)])
    forged["features"], forged["shape"] = routing._pack(aimed), list(aimed.shape)
    forged["examples"] = list(records["upper"]["examples"])[: len(aimed)]
    zoo = zoo_with(encoder, {})
    assert len(forged["examples"]) == len(aimed)
    decisions = zoo.route(victims, records={"reverse": records["reverse"], "upper": forged})
    assert [d.adapter for d in decisions] == ["reverse"] * len(victims)
    protos = routing._prototypes(zoo, {"reverse": records["reverse"], "upper": forged}, routing.feature_space(zoo))
    assert "upper" in protos.names
    expected = encoder(sorted({routing.instruction_of(e) for e in forged["examples"]}), ordered=True)
    got = protos.instructions["upper"]
    assert got.shape[-1] == expected.shape[-1]
    assert all(any(torch.equal(row, e) for e in expected) for row in got)


def test_routing_many_records_keeps_the_instruction_cache_bounded(encoder, monkeypatch):
    monkeypatch.setattr(routing, "FEATURE_RECORDS", 8)
    zoo = zoo_with(encoder, {"reverse": routing_examples("reverse", 12)})
    records = routing.routing_records(zoo)
    for i in range(20):
        mine = dict(records["reverse"], examples=[f"Reverse the word, version {i}"])
        zoo.route(held_out("reverse", 1), records={"reverse": records["reverse"], f"r{i}": mine})
    cache = routing._cache(zoo)
    assert len(cache.instructions) <= 8
    assert len(cache.features) <= 8 + 1
    assert len(cache.prototypes) <= routing.PROTOTYPE_SETS
    # each record's rows: its examples' (at most MAX_EXAMPLES) order-aware features, nothing more
    assert all(v.shape[0] <= routing.MAX_EXAMPLES for v in cache.instructions.values())


def test_bfloat16_decisions_with_order_aware_choice_equal_the_float32_ones(encoder):
    tasks = ("reverse", "upper", "digits-sort", "sort-desc", "rotate-left")
    zoo = zoo_with(encoder, {t: routing_examples(t, 12) for t in tasks})
    prompts = [*(p for t in tasks for p in held_out(t)), *HOSTILE_LINES]
    fast = [(d.adapter, d.runner_up) for d in zoo.route(prompts)]
    routing._cache(zoo).sentence = routing.SentenceEncoder(fast_dtype=torch.float32)
    assert [(d.adapter, d.runner_up) for d in zoo.route(prompts)] == fast
    # and the fast choice scores are within the stated error of the exact ones
    routing._cache(zoo).sentence = encoder
    exact, quick = choice_scores(zoo, prompts, True), choice_scores(zoo, prompts, False)
    assert (exact - quick).abs().max() < routing.BFLOAT16_CHOICE_ERROR


def test_no_score_of_a_decision_is_nan_when_a_specialist_is_chosen(encoder):
    zoo = zoo_with(encoder, {t: routing_examples(t, n) for t, n in (("reverse", 1), ("upper", 24))})
    for d in zoo.route([*held_out("reverse"), *held_out("upper"), *HOSTILE_LINES]):
        if d.adapter is not None:
            assert math.isfinite(d.score) and math.isfinite(d.runner_up_score)
