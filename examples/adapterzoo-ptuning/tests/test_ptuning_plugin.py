"""P-tuning against PEFT itself: PEFT's PromptEncoder (MLP and LSTM) with the same weights gives
the same outputs; PEFT's saved folders (the encoder's output) load; adapters mix in one batch with
other prompt lengths and types; training reaches the encoder through zoo.train; served over HTTP."""

from __future__ import annotations

import warnings

import pytest
import torch
from adapterzoo_ptuning import state_from_peft_encoder
from peft import PeftModel, PromptEncoderConfig, TaskType, get_peft_model

from adapterzoo.testing.models import output, tiny_model, tiny_zoo
from adapterzoo.testing.plugin_checks import (
    first_and_last_losses,
    served_completions,
    train_on_reverse,
)
from adapterzoo.testing.plugin_checks import (
    random_ids as ids,
)

ATOL = 1e-4
ENCODERS = {
    "mlp": {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": 24},
    "lstm": {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 12, "encoder_num_layers": 2},
}


def peft_p_tuning(family: str, seed: int = 0, num_virtual_tokens: int = 5, **encoder):
    """A PEFT P-tuning model on the tiny base, its encoder's weights random (PyTorch's defaults)."""
    torch.manual_seed(seed)
    task = TaskType.FEATURE_EXTRACTION if family == "bert" else TaskType.CAUSAL_LM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(
            tiny_model(family, 0), PromptEncoderConfig(task_type=task, num_virtual_tokens=num_virtual_tokens, **encoder)
        ).eval()


def run(model, family: str, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    result = out.logits if family != "bert" else out.last_hidden_state
    return result[:, -ids.shape[1] :]  # PEFT returns the virtual positions too


def copy_encoder(zoo, name: str, peft_model) -> None:
    """PEFT's encoder weights into our adapter, through the public adapter tensors (then mark_edited)."""
    adapter = zoo.get_adapter(name)
    (site,) = adapter.tensors
    flat = state_from_peft_encoder(peft_model.prompt_encoder["default"].state_dict(), site)
    with torch.no_grad():
        for key, tensor in flat.items():
            adapter.tensors[site][key.rpartition(".")[2]].copy_(tensor)
    adapter.mark_edited()


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_the_prompt_encoder_matches_peft(family, encoder):
    peft_model = peft_p_tuning(family, **ENCODERS[encoder])
    expected = run(peft_model, family, ids())
    zoo = tiny_zoo(family)
    zoo.add_adapter("p", "p_tuning", num_virtual_tokens=5, **ENCODERS[encoder])
    copy_encoder(zoo, "p", peft_model)
    with torch.no_grad():
        got = output(zoo(ids(), None, ["p", "p"]))
    assert (expected - output(zoo(ids()))).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_a_saved_peft_p_tuning_folder_loads_and_matches_peft(tmp_path, encoder):
    peft_model = peft_p_tuning("llama", **ENCODERS[encoder])
    peft_model.save_pretrained(tmp_path / "pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = run(PeftModel.from_pretrained(tiny_model("llama", 0), tmp_path / "pt").eval(), "llama", ids())
    zoo = tiny_zoo("llama")
    info = zoo.load_adapter("p", tmp_path / "pt")
    assert info.type == "p_tuning" and info.config["inference_mode"] is True
    with torch.no_grad():
        torch.testing.assert_close(output(zoo(ids(), None, ["p", "p"])), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_our_p_tuning_saved_as_peft_is_read_by_peft(tmp_path, encoder):
    zoo = tiny_zoo("llama")
    zoo.add_adapter("p", "p_tuning", num_virtual_tokens=3, **ENCODERS[encoder])
    zoo.save_adapter("p", tmp_path / "pt", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = run(PeftModel.from_pretrained(tiny_model("llama", 0), tmp_path / "pt").eval(), "llama", ids())
    with torch.no_grad():
        torch.testing.assert_close(output(zoo(ids(), None, ["p", "p"])), expected, atol=ATOL, rtol=0)


def test_lstm_prompts_of_other_lengths_mix_in_one_batch_and_see_only_their_own_length():
    """P=3 and P=4 share the 4-token pool; the LSTM runs backwards from each adapter's true P."""
    zoo = tiny_zoo("llama")
    peft3 = peft_p_tuning("llama", seed=1, num_virtual_tokens=3, **ENCODERS["lstm"])
    peft4 = peft_p_tuning("llama", seed=2, num_virtual_tokens=4, **ENCODERS["lstm"])
    for name, model, p in [("p3", peft3, 3), ("p4", peft4, 4)]:
        zoo.add_adapter(name, "p_tuning", num_virtual_tokens=p, **ENCODERS["lstm"])
        copy_encoder(zoo, name, model)
    zoo.add_adapter("mlp", "p_tuning", num_virtual_tokens=6, **ENCODERS["mlp"])
    zoo.add_adapter("lora", "lora", init_lora_weights=False)
    zoo.add_adapter("soft", "soft_prompt", num_virtual_tokens=2)
    assert zoo.get_adapter("p3").pool_key == zoo.get_adapter("p4").pool_key
    names = ["p3", "mlp", "p4", None, "lora", "soft", "p3"]
    batch = ids(len(names), seed=4)
    with torch.no_grad():
        mixed = output(zoo(batch, None, names))
        for row, name in enumerate(names):
            torch.testing.assert_close(
                mixed[row], output(zoo(batch[row : row + 1], None, [name]))[0], atol=ATOL, rtol=0
            )
    torch.testing.assert_close(mixed[0], run(peft3, "llama", batch[:1])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[2], run(peft4, "llama", batch[2:3])[0], atol=ATOL, rtol=0)


def test_the_encoder_hidden_size_defaults_to_the_bases_width():
    zoo = tiny_zoo("llama")
    zoo.add_adapter("p", "p_tuning", num_virtual_tokens=2)
    (site,) = zoo.get_adapter("p").tensors
    assert zoo.get_adapter("p").tensors[site]["mlp_head_0_weight"].shape == (32, 32)


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_p_tuning_learns_reverse_through_zoo_train_and_the_gradient_reaches_the_encoder(encoder):
    config = {"num_virtual_tokens": 8, **ENCODERS[encoder]}
    zoo, report = train_on_reverse("p_tuning", config, lr=3e-2)
    first, last = first_and_last_losses(report)
    # a prompt barely moves a 2-layer random base (soft_prompt plateaus alike, near 4.545): the loss falls a little
    assert last < first - 0.02, (first, last)
    fresh = tiny_zoo("llama")
    fresh.add_adapter("reverse", "p_tuning", **config)
    (site,) = fresh.get_adapter("reverse").tensors
    for name, before in fresh.get_adapter("reverse").tensors[site].items():
        assert not torch.equal(zoo.get_adapter("reverse").tensors[site][name], before), name  # every tensor trained


def test_p_tuning_is_served_through_the_http_server(tmp_path):
    served, expected = served_completions(tmp_path, "p_tuning", {"num_virtual_tokens": 4, **ENCODERS["lstm"]})
    assert served == expected
