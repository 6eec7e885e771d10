"""DoRA against PEFT itself (PeftModel on the same tiny bases), mixed with LoRA adapters of other
ranks in one batch, trained on `reverse` through zoo.train, and served through the HTTP server."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model

from adapterzoo.testing.models import FAMILIES, output, tiny_model, tiny_zoo
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
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "output.dense"]}


def make_peft_dora(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A PEFT DoRA adapter with random B and magnitudes moved off their initial norms, saved by PEFT."""
    torch.manual_seed(seed)
    task = TaskType.FEATURE_EXTRACTION if family == "bert" else TaskType.CAUSAL_LM
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=False, use_dora=True)
    config.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_model(family, 0), LoraConfig(task_type=task, **config))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.3 * torch.randn(p.shape))
        model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_a_peft_dora_adapter_loads_as_dora_and_matches_peft(tmp_path, family):
    folder = make_peft_dora(tmp_path / "dora", family, use_rslora=family == "gpt2")
    expected = peft_output(family, folder, ids())
    zoo = tiny_zoo(family)
    info = zoo.load_adapter("d", folder)
    assert info.type == "dora"
    with torch.no_grad():
        got = output(zoo(ids(), None, ["d", "d"]))
        bare = output(zoo(ids(), None, [None, None]))
    assert (expected - bare).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_dora_mixes_with_lora_of_other_ranks_in_one_batch(tmp_path, family):
    dora4 = make_peft_dora(tmp_path / "dora4", family, seed=1)
    dora2 = make_peft_dora(tmp_path / "dora2", family, seed=2, r=2, lora_alpha=3)
    lora8 = tmp_path / "lora8"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task = TaskType.FEATURE_EXTRACTION if family == "bert" else TaskType.CAUSAL_LM
        torch.manual_seed(3)
        get_peft_model(
            tiny_model(family, 0),
            LoraConfig(task_type=task, r=8, target_modules=TARGETS[family], init_lora_weights=False),
        ).save_pretrained(lora8)
    zoo = tiny_zoo(family)
    for name, folder in [("dora4", dora4), ("dora2", dora2), ("lora8", lora8)]:
        zoo.load_adapter(name, folder)
    zoo.add_adapter("lora16", "lora", r=16, init_lora_weights=False, seed=4)
    names = ["dora4", "lora8", None, "dora2", "lora16", "dora4"]
    batch = ids(len(names), seed=5)
    with torch.no_grad():
        mixed = output(zoo(batch, None, names))
        for row, name in enumerate(names):
            solo = output(zoo(batch[row : row + 1], None, [name]))[0]
            torch.testing.assert_close(mixed[row], solo, atol=ATOL, rtol=0, msg=f"row {row} ({name})")
    for row, name in enumerate(names):
        if name in ("dora4", "dora2", "lora8"):
            folder = {"dora4": dora4, "dora2": dora2, "lora8": lora8}[name]
            torch.testing.assert_close(
                mixed[row], peft_output(family, folder, batch[row : row + 1])[0], atol=ATOL, rtol=0
            )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dora_saved_as_peft_is_read_back_by_peft(tmp_path, family):
    folder = make_peft_dora(tmp_path / "dora", family)
    zoo = tiny_zoo(family)
    zoo.load_adapter("d", folder)
    zoo.save_adapter("d", tmp_path / "again", format="peft")
    with torch.no_grad():
        ours = output(zoo(ids(), None, ["d", "d"]))
    torch.testing.assert_close(peft_output(family, tmp_path / "again", ids()), ours, atol=ATOL, rtol=0)


def test_a_fresh_dora_adapter_is_the_base_and_merges_into_it(tmp_path):
    zoo = tiny_zoo("llama")
    zoo.add_adapter("fresh", "dora")
    zoo.load_adapter("d", make_peft_dora(tmp_path / "dora", "llama"))
    with torch.no_grad():
        torch.testing.assert_close(output(zoo(ids(), None, ["fresh", "fresh"])), output(zoo(ids())), atol=1e-6, rtol=0)
        merged = zoo.merged_model("d")(input_ids=ids()).logits
        torch.testing.assert_close(merged, output(zoo(ids(), None, ["d", "d"])), atol=ATOL, rtol=0)


def test_a_plain_lora_folder_still_loads_as_lora():
    from adapterzoo.formats.peft import type_for

    zoo = tiny_zoo("llama")
    assert type_for(zoo, "LORA", "x", {"peft_type": "LORA", "use_dora": False}).name == "lora"
    assert type_for(zoo, "LORA", "x", {"peft_type": "LORA", "use_dora": True}).name == "dora"


def test_dora_learns_reverse_through_zoo_train():
    _, report = train_on_reverse("dora", {"r": 8, "target_modules": "all-linear"})
    first, last = first_and_last_losses(report)
    assert last < first - 0.1, (first, last)  # 40 steps on a tiny random base: the loss moves, little more


def test_dora_is_served_through_the_http_server(tmp_path):
    served, expected = served_completions(tmp_path, "dora", {"r": 4, "init_lora_weights": False})
    assert served == expected


@pytest.mark.parametrize("field", [{"bias": "all"}, {"lora_bias": True}, {"modules_to_save": ["lm_head"]}])
def test_lora_extras_that_dora_does_not_compute_are_refused_by_name(field):
    from adapterzoo.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError, match=f"DoRA adapters .*{next(iter(field))}"):
        tiny_zoo("llama").add_adapter("d", "dora", **field)
