"""Hostile prompts to the router: each gets a decision, or a clear error naming the prompt."""

from __future__ import annotations

import pytest

from adapterzoo import routing
from adapterzoo.errors import BatchError
from tests import routing_fixtures

# the shared fixtures (tests/routing_fixtures.py)
encoder, zoo = routing_fixtures.encoder, routing_fixtures.zoo


def test_a_hostile_prompt_gets_a_decision(zoo):
    hostile = ["", " \t\n", "\n" * 20_000, "\x00\x01\x7f", "\u200b" * 5000, "\u0301" * 5000, "\u202eabc", "[SEP]" * 300]
    assert len(zoo.route(hostile)) == len(hostile)


@pytest.mark.parametrize("bad", ["\ud800", "fine \udfff text", None, 7])
def test_a_prompt_the_router_cannot_read_is_refused_with_an_error_naming_it(zoo, bad):
    # a lone surrogate ("\ud800" is valid JSON) made the tokenizer raise "TextInputSequence must be str"
    with pytest.raises(BatchError, match="prompt 1"):
        routing.route(zoo, ["reverse this: abc", bad])
