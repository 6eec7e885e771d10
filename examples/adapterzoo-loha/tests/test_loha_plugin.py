"""LoHa against PEFT itself (PeftModel on the same tiny bases), both derived forms, mixed with
other types and ranks in one batch, trained on `reverse` through zoo.train, served over HTTP."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, TaskType, get_peft_model

from adapterzoo.errors import UnsupportedFormatError
from adapterzoo.testing.models import output, tiny_model, tiny_zoo
from adapterzoo.testing.plugin_checks import (
    first_and_last_losses,
    peft_output,
    served_completions,
    train_on_reverse,
)
from adapterzoo.testing.plugin_checks import (
    random_ids as ids,
)

ATOL = 1e-4
FAMILIES = ("llama", "bert")  # PEFT's LoHa adapts nn.Linear only, not GPT-2's Conv1D
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "output.dense"]}


def make_peft_loha(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A PEFT LoHa adapter with all four factors random (init_weights=False), saved by PEFT."""
    torch.manual_seed(seed)
    task = TaskType.FEATURE_EXTRACTION if family == "bert" else TaskType.CAUSAL_LM
    config = dict(r=2, alpha=4, target_modules=TARGETS[family], init_weights=False)
    config.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(tiny_model(family, 0), LoHaConfig(task_type=task, **config)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("r", [2, 8], ids=["factored", "dense"])  # r^2 (in + out) vs in * out on 32-64 wide layers
def test_a_peft_loha_adapter_matches_peft(tmp_path, family, r):
    folder = make_peft_loha(tmp_path / "loha", family, r=r, alpha=2 * r + 1)
    expected = peft_output(family, folder, ids())
    zoo = tiny_zoo(family)
    assert zoo.load_adapter("h", folder).type == "loha"
    with torch.no_grad():
        got = output(zoo(ids(), None, ["h", "h"]))
        bare = output(zoo(ids(), None, [None, None]))
    assert (expected - bare).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    pool = zoo.pools[zoo.get_adapter("h").pool_key]
    derived = set(pool.site(next(iter(zoo.get_adapter("h").tensors))))
    assert ("dense" in derived) == (r == 8) and ("down" in derived) == (r == 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_loha_mixes_with_other_ranks_and_types_in_one_batch(tmp_path, family):
    loha2 = make_peft_loha(tmp_path / "loha2", family, seed=1)
    loha3 = make_peft_loha(tmp_path / "loha3", family, seed=2, r=3, alpha=3)  # rank-4 pool, zero-padded
    zoo = tiny_zoo(family)
    zoo.load_adapter("loha2", loha2)
    zoo.load_adapter("loha3", loha3)
    zoo.add_adapter("lora", "lora", r=4, init_lora_weights=False)
    zoo.add_adapter("prefix", "prefix", num_virtual_tokens=3)
    names = ["loha2", "lora", None, "loha3", "prefix", "loha2"]
    batch = ids(len(names), seed=5)
    with torch.no_grad():
        mixed = output(zoo(batch, None, names))
        for row, name in enumerate(names):
            torch.testing.assert_close(
                mixed[row], output(zoo(batch[row : row + 1], None, [name]))[0], atol=ATOL, rtol=0
            )
    for row, (name, folder) in enumerate([("loha2", loha2), (None, None), (None, None), ("loha3", loha3)]):
        if name is not None:
            torch.testing.assert_close(
                mixed[row], peft_output(family, folder, batch[row : row + 1])[0], atol=ATOL, rtol=0
            )


def test_loha_saved_as_peft_is_read_back_by_peft(tmp_path):
    zoo = tiny_zoo("llama")
    zoo.load_adapter("h", make_peft_loha(tmp_path / "loha", "llama", r=3))
    zoo.save_adapter("h", tmp_path / "again", format="peft")
    with torch.no_grad():
        ours = output(zoo(ids(), None, ["h", "h"]))
    torch.testing.assert_close(peft_output("llama", tmp_path / "again", ids()), ours, atol=ATOL, rtol=0)


def test_loha_on_gpt2_conv1d_works_natively_but_has_no_peft_form(tmp_path):
    zoo = tiny_zoo("gpt2")
    zoo.add_adapter("h", "loha", init_weights=False)
    with torch.no_grad():
        merged = zoo.merged_model("h")(input_ids=ids()).logits
        torch.testing.assert_close(merged, output(zoo(ids(), None, ["h", "h"])), atol=ATOL, rtol=0)
    with pytest.raises(UnsupportedFormatError, match="Conv1D.*format='native'"):
        zoo.save_adapter("h", tmp_path / "peft", format="peft")


def test_peft_loha_options_loha_cannot_follow_are_refused_by_name(tmp_path):
    import json

    folder = make_peft_loha(tmp_path / "loha", "llama")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": 4}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedFormatError, match="rank_pattern"):
        tiny_zoo("llama").load_adapter("h", folder)


def test_the_decode_step_reads_the_derived_weights_not_the_factors(tmp_path):
    """After placement, a forward never rebuilds delta W: derive runs once per slot write."""
    from adapterzoo_loha import LoHa

    calls = []
    original = LoHa.derive
    LoHa.derive = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        zoo = tiny_zoo("llama")
        zoo.add_adapter("h", "loha", trainable=False, init_weights=False)
        calls.clear()
        with torch.no_grad():
            for _ in range(4):
                zoo(ids(), None, ["h", None])
    finally:
        LoHa.derive = original
    assert len(calls) == len(zoo.get_adapter("h").tensors)  # once per site (q_proj, v_proj x 2 layers), not per forward


def test_loha_learns_reverse_through_zoo_train():
    _, report = train_on_reverse("loha", {"r": 4, "target_modules": "all-linear"})
    first, last = first_and_last_losses(report)
    assert last < first - 0.1, (first, last)


def test_loha_is_served_through_the_http_server(tmp_path):
    served, expected = served_completions(tmp_path, "loha", {"r": 4, "init_weights": False})
    assert served == expected
