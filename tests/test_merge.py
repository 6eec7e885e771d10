"""Merging one adapter into a copy of the base, for single-adapter deployment."""

from __future__ import annotations

import pytest
import torch

from adapterzoo import AdapterZooError
from adapterzoo.base import base_state_checksum
from adapterzoo.testing.models import output, perturb, tiny_zoo

IDS = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "family,type_name,config",
    [
        ("llama", "lora", {"init_lora_weights": False}),
        ("gpt2", "lora", {"init_lora_weights": False, "use_rslora": True, "r": 4}),
        ("bert", "lora", {"init_lora_weights": False, "target_modules": "all-linear"}),
        ("gpt2", "bitfit", {}),
        ("bert", "bitfit", {}),
        ("llama", "bitfit", {"include_norms": False}),  # Llama's linears have no bias: merging adds one
    ],
)
def test_merged_model_equals_the_adapter_in_the_zoo(family, type_name, config):
    zoo = tiny_zoo(family)
    zoo.add_adapter("a", type_name, **config)
    perturb(zoo, "a")
    before = base_state_checksum(zoo.model)
    merged = zoo.merged_model("a")
    with torch.inference_mode():
        expected = output(zoo(IDS, None, ["a", "a"]))
        out = merged(input_ids=IDS)
        got = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert base_state_checksum(zoo.model) == before  # the zoo's base is untouched


def test_types_without_merge_say_so():
    zoo = tiny_zoo("llama")
    zoo.add_adapter("p", "prefix")
    with pytest.raises(AdapterZooError, match="cannot be merged"):
        zoo.merged_model("p")
    zoo.add_adapter("b", "bitfit")  # includes RMSNorm sites, which have no bias to fold into
    with pytest.raises(AdapterZooError, match="no bias to fold"):
        zoo.merged_model("b")
