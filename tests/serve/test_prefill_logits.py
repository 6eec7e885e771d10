"""A prefill that samples one token computes the last position's logits only (`logits_to_keep`)."""

from __future__ import annotations

import pytest
import torch

from adapterzoo.testing.models import tiny_zoo

from .conftest import TYPE_NAMES, make_adapters


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_keeping_the_last_logits_gives_the_full_forwards_last_row_for_every_type(family):
    zoo = tiny_zoo(family, slots=16)
    make_adapters(zoo, None, TYPE_NAMES)
    names = [*TYPE_NAMES, None]  # soft prompts put virtual tokens first: they must not shift the kept row
    ids = torch.randint(3, 40, (len(names), 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    with torch.inference_mode():
        full = zoo.forward(ids, mask, names).logits
        kept = zoo.forward(ids, mask, names, logits_to_keep=1).logits
    assert kept.shape == (len(names), 1, full.shape[-1])
    torch.testing.assert_close(kept[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
