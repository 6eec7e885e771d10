"""The library build's faster training step trains exactly what the old one did.

The step now left-pads answer rows, projects only the columns that predict answer tokens onto the
vocabulary (`logits_to_keep`) and splits a micro-batch into forwards of similar length. None of
that may change the loss or its gradient: adapters of every type, trained together on examples of
many lengths, end where the old step (one right-padded forward, logits everywhere) takes them.
Training under bfloat16 autocast, which is faster but not exact, is opt-in.
"""

from __future__ import annotations

import random

import pytest
import torch

from adapterzoo import TrainingError, Zoo
from adapterzoo.formats.native import CONFIG_FILE
from adapterzoo.library import build_library
from adapterzoo.storage import read_json
from adapterzoo.tasks import Example, LabeledExample
from adapterzoo.testing.models import char_tokenizer, tiny_model
from adapterzoo.training import loop
from adapterzoo.training.data import Item, answer_columns, length_groups, loss_terms

from ..test_train import one_thread  # noqa: F401 - the fixture (autouse): tiny models on one thread

TYPES = {
    "lora": {"r": 4, "target_modules": "all-linear", "lora_alpha": 8},
    "houlsby": {"bottleneck": 8},
    "bitfit": {},
    "prefix": {"num_virtual_tokens": 3},
    "soft_prompt": {"num_virtual_tokens": 3},
}


def ragged_examples(n: int, seed: int) -> list[Example]:
    """Prompts of 2-9 letters and answers of 1-6: rows of very different lengths and answer spans."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9)))
        out.append(Example(f"{word} ->", f" {word[: rng.randint(1, 6)][::-1]}\n"))
    return out


def trained(old_step: bool, monkeypatch, steps: int = 4) -> tuple[dict, dict]:
    """Every type's adapter trained together for `steps` steps, the old or the new way."""
    if old_step:
        monkeypatch.setattr(loop, "LOGITS_AT_ANSWERS_ONLY", False)
        monkeypatch.setattr(loop, "FORWARD_OVERHEAD_TOKENS", 10**9)
    else:
        monkeypatch.setattr(loop, "FORWARD_OVERHEAD_TOKENS", 0)  # as many forwards as lengths
    zoo = Zoo(tiny_model("llama"), char_tokenizer(), device="cpu")
    for i, (type_name, config) in enumerate(TYPES.items()):
        zoo.add_adapter(type_name, type_name, seed=i, **config)
    names = list(TYPES)
    data = [ragged_examples(8 * steps, seed=i) for i in range(len(names))]
    report = zoo.train(names, data, max_steps=steps, batch_size=8, lr=1e-2, progress=False)
    params = {n: [p.detach().clone() for p in zoo.get_adapter(n).parameters()] for n in names}
    losses = {n: [h["train_loss"] for h in report[n].history] for n in names}
    return params, losses


def test_the_answer_only_step_trains_every_type_as_the_old_step_did(monkeypatch):
    old_params, old_losses = trained(True, monkeypatch)
    new_params, new_losses = trained(False, monkeypatch)
    for name in TYPES:
        assert new_losses[name] == pytest.approx(old_losses[name], abs=1e-5), name
        for a, b in zip(old_params[name], new_params[name]):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_a_classifier_beside_answer_adapters_trains_as_before(monkeypatch):
    def run(old_step: bool):
        with monkeypatch.context() as m:
            if old_step:
                m.setattr(loop, "LOGITS_AT_ANSWERS_ONLY", False)
                m.setattr(loop, "FORWARD_OVERHEAD_TOKENS", 10**9)
            zoo = Zoo(tiny_model("llama"), char_tokenizer(), device="cpu")
            zoo.add_adapter("words", "lora", seed=0, **TYPES["lora"])
            zoo.add_adapter("sorts", "lora", seed=1, head={"num_labels": 2}, **TYPES["lora"])
            labeled = [LabeledExample(e.prompt, int(len(e.prompt) > 6)) for e in ragged_examples(16, 3)]
            zoo.train(["words", "sorts"], [ragged_examples(16, 2), labeled], max_steps=2, batch_size=8, progress=False)
            return [p.detach().clone() for n in ("words", "sorts") for p in zoo.get_adapter(n).parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_answer_columns_start_one_before_the_first_labelled_token():
    labels = torch.tensor([[-100, -100, -100, 5, 6], [-100, -100, -100, -100, 7]])
    assert answer_columns(labels) == 3  # columns 2, 3, 4: column 2 predicts the first answer token
    assert answer_columns(torch.full((2, 4), -100)) == 0


def test_loss_terms_count_the_tokens_a_job_is_scored_on():
    assert loss_terms(Item(ids=[1, 2, 3, 4], labels=[-100, -100, 3, 4])) == 2
    assert loss_terms(Item(ids=[1, 2], label=1)) == 1


def test_length_groups_cover_every_row_once_shortest_first():
    lengths = [5, 20, 6, 21, 5, 19]
    groups = length_groups(lengths, overhead=8)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [[lengths[i] for i in g] for g in groups] == [[5, 5, 6], [19, 20, 21]]
    assert length_groups(lengths, overhead=10**9) == [sorted(range(6), key=lambda i: lengths[i])]
    assert len(length_groups(lengths, overhead=0)) == 5  # one forward per distinct length


def test_bfloat16_autocast_is_opt_in_trains_close_to_float32_and_names_a_bad_value(tmp_path):
    def losses(autocast):
        zoo = Zoo(tiny_model("llama"), char_tokenizer(), device="cpu")
        zoo.add_adapter("a", "lora", seed=0, **TYPES["lora"])
        report = zoo.train("a", ragged_examples(32, 0), max_steps=4, lr=1e-2, progress=False, autocast=autocast)
        assert all(p.dtype == torch.float32 for p in zoo.get_adapter("a").parameters())  # the adapter stays float32
        return [h["train_loss"] for h in report["a"].history]

    exact, autocast = losses(None), losses("bfloat16")
    assert autocast != exact  # not the same loss to the last bit: why it is opt-in
    assert autocast == pytest.approx(exact, rel=0.05)
    zoo = Zoo(tiny_model("llama"), char_tokenizer(), device="cpu")
    zoo.add_adapter("a", "lora", **TYPES["lora"])
    with pytest.raises(TrainingError, match="autocast must be None or 'bfloat16'"):
        zoo.train("a", ragged_examples(8, 0), max_steps=1, progress=False, autocast="float16")


def test_the_library_build_records_its_autocast_on_each_card(tmp_path):
    zoo = Zoo(tiny_model("llama"), char_tokenizer(), device="cpu")
    build_library(zoo, ["upper"], tmp_path, steps=2, batch_size=2, n_test=2, autocast="bfloat16", progress=False)
    assert read_json(tmp_path / "upper" / CONFIG_FILE)["metadata"]["metrics"]["autocast"] == "bfloat16"
