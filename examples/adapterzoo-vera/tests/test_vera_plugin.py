"""VeRA against PEFT itself (PeftModel on the same tiny bases): the shared random projections are
remade from the seed exactly, adapters mix in one batch with other ranks and types, train on
`reverse` through zoo.train (only the vectors change), and are served over HTTP."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import TaskType, VeraConfig, get_peft_model

from adapterzoo.errors import UnsupportedFormatError
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


def make_peft_vera(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A PEFT VeRA adapter with random vectors (init_weights=False, then lambda_b moved), saved by PEFT."""
    torch.manual_seed(seed)
    task = TaskType.FEATURE_EXTRACTION if family == "bert" else TaskType.CAUSAL_LM
    config = dict(r=4, target_modules=TARGETS[family], init_weights=False, fan_in_fan_out=family == "gpt2")
    config.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_model(family, 0), VeraConfig(task_type=task, **config))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "vera_lambda_b" in name:
                    p.mul_(0.3 * torch.randn(p.shape))
        model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_a_peft_vera_adapter_matches_peft(tmp_path, family):
    folder = make_peft_vera(tmp_path / "vera", family, projection_prng_key=3)
    expected = peft_output(family, folder, ids())
    zoo = tiny_zoo(family)
    assert zoo.load_adapter("v", folder).type == "vera"
    with torch.no_grad():
        got = output(zoo(ids(), None, ["v", "v"]))
        bare = output(zoo(ids(), None, [None, None]))
    assert (expected - bare).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_vera_mixes_with_other_ranks_seeds_and_types_in_one_batch(tmp_path):
    folders = {
        "v4": make_peft_vera(tmp_path / "v4", "llama", seed=1),
        "v3": make_peft_vera(tmp_path / "v3", "llama", seed=2, r=3),  # rank-4 bucket, its own projections
        "v4-key9": make_peft_vera(tmp_path / "v4k", "llama", seed=3, projection_prng_key=9),
    }
    zoo = tiny_zoo("llama")
    for name, folder in folders.items():
        zoo.load_adapter(name, folder)
    zoo.add_adapter("lora", "lora", r=8, init_lora_weights=False)
    zoo.add_adapter("prompt", "soft_prompt", num_virtual_tokens=2)
    assert len({zoo.get_adapter(n).pool_key for n in folders}) == 3  # projections differ: pools differ
    names = ["v4", "lora", "v3", None, "v4-key9", "prompt", "v4"]
    batch = ids(len(names), seed=5)
    with torch.no_grad():
        mixed = output(zoo(batch, None, names))
        for row, name in enumerate(names):
            torch.testing.assert_close(
                mixed[row], output(zoo(batch[row : row + 1], None, [name]))[0], atol=ATOL, rtol=0
            )
    for row, name in enumerate(names):
        if name in folders:
            torch.testing.assert_close(
                mixed[row], peft_output("llama", folders[name], batch[row : row + 1])[0], atol=ATOL, rtol=0
            )


def test_the_projections_are_shared_frozen_and_never_saved(tmp_path):
    zoo = tiny_zoo("llama")
    zoo.add_adapter("a", "vera", r=8, seed=1)
    zoo.add_adapter("b", "vera", r=8, seed=2)
    a, b = zoo.get_adapter("a"), zoo.get_adapter("b")
    assert a.shared["vera_A"] is b.shared["vera_A"]  # made once for the type, seed and shapes
    assert {t.shape for t in a.parameters()} == {(8,), (32,), (16,)}  # lambda_d, lambda_b (q, v outs): no A, B
    zoo.save_adapter("a", tmp_path / "a")
    from safetensors.torch import load_file

    from adapterzoo.formats.native import WEIGHTS_FILE

    assert not any("vera_A" in k or "vera_B" in k for k in load_file(tmp_path / "a" / WEIGHTS_FILE))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_vera_saved_as_peft_is_read_back_by_peft(tmp_path, family):
    zoo = tiny_zoo(family)
    zoo.load_adapter("v", make_peft_vera(tmp_path / "vera", family, projection_prng_key=5))
    zoo.save_adapter("v", tmp_path / "again", format="peft")
    with torch.no_grad():
        ours = output(zoo(ids(), None, ["v", "v"]))
    torch.testing.assert_close(peft_output(family, tmp_path / "again", ids()), ours, atol=ATOL, rtol=0)


def test_saved_projections_that_the_seed_does_not_make_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = make_peft_vera(tmp_path / "vera", "llama")
    state = load_file(folder / "adapter_model.safetensors")
    state["base_model.vera_A"] = state["base_model.vera_A"] * 2
    save_file(state, folder / "adapter_model.safetensors")
    with pytest.raises(UnsupportedFormatError, match="vera_A is not the one projection_prng_key=0 makes"):
        tiny_zoo("llama").load_adapter("v", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["bias"] = "vera_only"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedFormatError, match="bias"):
        tiny_zoo("llama").load_adapter("v", folder)


def test_vera_learns_reverse_through_zoo_train():
    zoo, report = train_on_reverse("vera", {"r": 32, "target_modules": "all-linear"}, lr=5e-2)
    first, last = first_and_last_losses(report)
    assert last < first - 0.1, (first, last)
    assert all(not t.requires_grad for t in zoo.get_adapter("reverse").shared.values())


def test_vera_is_served_through_the_http_server(tmp_path):
    served, expected = served_completions(tmp_path, "vera", {"r": 8})
    assert served == expected
