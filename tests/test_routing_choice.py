"""Which specialist a routed prompt gets (adapterzoo/routing.py, `_Chooser`): its instruction line,
whitened by the visible candidates' own examples, and nothing outside what the caller may see."""

from __future__ import annotations

import pytest
import torch

from adapterzoo import routing
from adapterzoo.tasks import routing_examples

from .test_routing_fast_path import held_out, sentence_zoo

TENANT = ("reverse", "upper")
OTHERS = ("digits-sort", "sort-desc", "rotate-left")


@pytest.fixture(scope="module")
def encoder():
    return routing.SentenceEncoder(fast_dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("prompt", "line"),
    [
        ("Reverse the word: h e l l o ->", "Reverse the word"),
        ("Sort these\n3 1 2", "Sort these"),
        ("Who painted the Mona Lisa?", "Who painted the Mona Lisa?"),  # no input: the whole prompt
        ("At 10:30, remind me", "At 10:30, remind me"),  # a colon inside a word does not end it
        (": h e l l o", ": h e l l o"),  # nothing before the colon: the whole prompt
    ],
)
def test_a_prompts_instruction_line_ends_at_its_first_colon_and_space_or_line_break(prompt, line):
    assert routing.instruction_of(prompt) == line


def test_a_tenants_decisions_are_the_same_whatever_adapters_other_tenants_hold(encoder):
    """The whitening is fit to the candidates a caller may see: adapters outside them change no
    score, so a tenant's routing reveals nothing of another tenant's adapters."""
    alone = sentence_zoo(encoder, TENANT)
    shared = sentence_zoo(encoder, (*TENANT, *OTHERS))
    prompts = [*held_out("reverse"), *held_out("upper"), *held_out("digits-sort"), "Who painted the Mona Lisa?"]
    mine = alone.route(prompts)
    among = shared.route(prompts, among=list(TENANT))
    assert [d.adapter for d in among] == [d.adapter for d in mine]
    assert [d.runner_up for d in among] == [d.runner_up for d in mine]
    torch.testing.assert_close(torch.tensor([d.score for d in among]), torch.tensor([d.score for d in mine]))
    records = routing.routing_records(shared)  # a server's path: the tenant's records only
    by_records = shared.route(prompts, records={name: records[name] for name in TENANT})
    assert [d.score for d in by_records] == [d.score for d in among]


def test_an_adapter_added_later_with_routing_examples_is_routed_to(encoder):
    zoo = sentence_zoo(encoder, TENANT)
    assert "digits-sort" not in {d.adapter for d in zoo.route(held_out("digits-sort"))}
    zoo.add_adapter("digits-sort", "lora", r=4, trainable=False)  # a third party's, after routing began
    zoo.add_routing_examples("digits-sort", routing_examples("digits-sort", 12))
    assert {d.adapter for d in zoo.route(held_out("digits-sort"))} == {"digits-sort"}
    assert {d.adapter for d in zoo.route(held_out("reverse"))} == {"reverse"}


def test_whitening_discounts_a_direction_along_which_one_adapters_own_examples_vary():
    """Two adapters whose examples differ a little along axis 1 and each vary a lot along axis 0
    (one task's many phrasings): a query on adapter a's side of axis 1 but with much of axis 0 is,
    by plain cosine, nearer b's examples; whitened, axis 0 counts less and a is chosen."""
    spread = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])

    def examples(side: float, lean: float) -> torch.Tensor:
        rows = torch.zeros(len(spread), 4)
        rows[:, 0], rows[:, 1], rows[:, 2] = spread + lean, side, 1.0
        return routing._unit(rows)

    a, b = examples(0.2, 0.0), examples(-0.2, 0.6)
    query = routing._unit(torch.tensor([[1.0, 0.2, 1.0, 0.0]]))
    plain = [float((query @ rows.T).topk(routing.NEIGHBOURS).values.mean()) for rows in (a, b)]
    assert plain[1] > plain[0]
    scores = routing._Chooser([a, b]).scores(query)
    assert int(scores.argmax()) == 0


def test_bfloat16_features_move_no_choice_score_by_more_than_the_stated_error(encoder):
    tasks = ("reverse", "digits-sort", "upper", "sort-desc")
    per_adapter = [encoder([routing.instruction_of(p) for p in routing_examples(t, 24)], ordered=True) for t in tasks]
    chooser = routing._Chooser(per_adapter)
    lines = [routing.instruction_of(p) for t in tasks for p in held_out(t, 2)] + ["Who painted the Mona Lisa?"]
    exact = chooser.scores(encoder(lines, ordered=True))
    fast = chooser.scores(encoder(lines, exact=False, ordered=True))
    assert 0 < (exact - fast).abs().max() < routing.BFLOAT16_CHOICE_ERROR


def test_adapters_with_the_same_examples_tie_and_the_first_listed_wins_without_a_close_call(encoder, monkeypatch):
    zoo = sentence_zoo(encoder, TENANT)
    records = routing.routing_records(zoo)
    copy = {**records, "copycat": dict(records["reverse"])}
    zoo.route(held_out("reverse"), records=copy)  # warm: the copy is checked once
    settled = []
    real_call = routing.SentenceEncoder.__call__

    def spy(self, prompts, batch_size=64, exact=True, ordered=False):
        settled.extend(prompts * exact)
        return real_call(self, prompts, batch_size, exact, ordered)

    monkeypatch.setattr(routing.SentenceEncoder, "__call__", spy)
    assert {d.adapter for d in zoo.route(held_out("reverse"), records=copy)} == {"reverse"}
    assert settled == []
    monkeypatch.setattr(encoder, "score_error", 1.0)  # the spy sees a settled close call
    zoo.route(held_out("reverse"), records=copy)
    assert settled


def test_a_number_in_the_instruction_rules_out_numbered_tasks_of_other_numbers():
    """Only tasks whose examples name numbers, none of them the prompt's, are ruled out; a task with
    no number never is, and when every candidate would be, none is."""
    protos = routing._Prototypes(
        ["reverse", "caesar-3", "caesar-5", "perm-05"], torch.zeros(0), torch.zeros(0), torch.zeros(0), None, set()
    )
    protos.numbers = {"reverse": frozenset(), "caesar-3": frozenset({3}), "caesar-5": frozenset({5})}
    protos.numbers["perm-05"] = routing.numbers_of("Apply letter cipher 05")
    candidates = [0, 1, 2, 3]
    prompts = [
        "Move every letter 5 steps along the alphabet: h e l l o ->",  # rules out caesar-3
        "Reverse the word: h e l l o ->",  # no number: nothing ruled out
        "Shift the 7 letters by 9: h e l l o ->",  # no numbered task says 7 or 9: all of them out
    ]
    choice = routing._rule_out_other_numbers(torch.ones(3, 4), prompts, protos, candidates)
    assert choice.tolist() == [
        [1.0, float("-inf"), 1.0, 1.0],
        [1.0, 1.0, 1.0, 1.0],
        [1.0, float("-inf"), float("-inf"), float("-inf")],
    ]
    only_numbered = routing._rule_out_other_numbers(torch.ones(1, 2), prompts[2:], protos, [1, 2])
    assert only_numbered.tolist() == [[1.0, 1.0]]  # all would be ruled out: the choice stands


def test_a_digit_shift_paraphrase_saying_nine_reaches_the_shift_its_number_names(encoder, monkeypatch):
    """ "Increase all digits by 1, wrapping past nine" (a held-out paraphrase) went to dshift-9 among
    the 116 tasks; the number 1 now rules dshift-9 out. General prompts with numbers still fall back."""
    zoo = sentence_zoo(encoder, ("dshift-1", "dshift-2", "dshift-9", "addmod-19", "reverse"))
    asked = [*held_out("dshift-1", 4), *held_out("dshift-2", 4)]
    assert [d.adapter for d in zoo.route(asked)] == ["dshift-1"] * 4 + ["dshift-2"] * 4
    general = ["Convert 10 miles to kilometers.", "What year did the first moon landing happen in 1969?"]
    assert [d.adapter for d in zoo.route(general)] == [None, None]
    decisions = zoo.route(held_out("dshift-1", 2))
    assert all(d.runner_up != "dshift-9" for d in decisions)  # ruled out: never the runner-up either


def test_order_aware_features_are_the_plain_features_then_each_part_of_the_line_weighted(encoder):
    lines = ["Move the first letter to the end", "Sort", "Who painted the Mona Lisa?"]
    plain, ordered = encoder(lines), encoder(lines, ordered=True)
    width = plain.shape[1]
    assert ordered.shape == (len(lines), width * (1 + routing.ORDER_PARTS))
    torch.testing.assert_close(ordered[:, :width], plain)
    parts = ordered[:, width:].reshape(len(lines), routing.ORDER_PARTS, width)
    torch.testing.assert_close(parts.norm(dim=-1), torch.full((len(lines), routing.ORDER_PARTS), routing.ORDER_WEIGHT))
    # the same words in another order: each part moves further than the whole line's mean does
    swapped = encoder(["the end to the first letter Move", "Move the first letter to the end"], ordered=True)
    means = float(swapped[0, :width] @ swapped[1, :width])
    moved, kept = swapped[:, width:].reshape(2, routing.ORDER_PARTS, width)
    assert float((moved * kept).sum(-1).max()) / routing.ORDER_WEIGHT**2 < means


def test_the_choice_reads_word_order_so_mirrored_instructions_reach_their_own_tasks(encoder):
    """A mean of the line's token states cannot tell "first ... last" from "last ... first": among
    rotate-left and rotate-right (and sort and sort-desc), lines written for this test go to the
    mirrored task by plain features and to their own by the order-aware ones (`ORDER_PARTS`)."""
    tasks = ["reverse", "upper", "double", "rotate-left", "rotate-right", "pair-swap", "sort", "sort-desc"]
    lines = {t: [routing.instruction_of(p) for p in routing_examples(t, 12)] for t in tasks}
    asks = {"The first letter goes last": "rotate-left", "Sort from a up to z": "sort"}
    plain = routing._Chooser([encoder(lines[t]) for t in tasks]).scores(encoder(list(asks)))
    assert [tasks[int(i)] for i in plain.argmax(1)] == ["rotate-right", "sort-desc"]
    zoo = sentence_zoo(encoder, tasks)
    assert [d.adapter for d in zoo.route([f"{line}: h e l l o ->" for line in asks])] == list(asks.values())


def test_a_repeated_example_line_counts_once():
    """The chooser keeps each adapter's distinct example lines: its scores are those of the
    adapters' examples listed once each, however often a line repeats."""
    torch.manual_seed(0)
    for _ in range(50):
        once, repeated = [], []
        for _ in range(int(torch.randint(1, 6, ()))):
            distinct = torch.randn(int(torch.randint(1, 5, ())), 8)
            rows = distinct.repeat_interleave(torch.randint(1, 4, (len(distinct),)), 0)
            once.append(distinct)
            repeated.append(rows[torch.randperm(len(rows))])
        queries = torch.randn(3, 8)
        torch.testing.assert_close(routing._Chooser(repeated).scores(queries), routing._Chooser(once).scores(queries))
