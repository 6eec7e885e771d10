"""What keeps `model="auto"` cheap without changing a decision (adapterzoo/routing.py): MiniLM's
forward written out, bfloat16 for a request's prompt with float32 settling close calls, prototypes
built once per records' content, and every adapter scored in one gather."""

from __future__ import annotations

import pytest
import torch

from adapterzoo import routing
from adapterzoo.tasks import instructed_examples, routing_examples
from adapterzoo.testing.models import tiny_zoo

TASKS = ("reverse", "upper", "digits-sort")


@pytest.fixture(scope="module")
def encoder():
    return routing.SentenceEncoder(fast_dtype=torch.bfloat16)


def sentence_zoo(encoder, tasks=TASKS):
    """Adapters with their tasks' routing examples, sharing one loaded sentence encoder."""
    zoo = tiny_zoo("llama")
    routing._cache(zoo).sentence = encoder
    for task in tasks:
        zoo.add_adapter(task, "lora", r=4, trainable=False)
        zoo.add_routing_examples(task, routing_examples(task, 12))
    return zoo


def held_out(task: str, n: int = 4) -> list[str]:
    return [ex.prompt for ex in instructed_examples(task, n, "test", seed=3, held_out=True)]


PROMPTS = [
    *held_out("reverse"),
    *held_out("upper"),
    *held_out("digits-sort"),
    "Who painted the Mona Lisa?",
    "import numpy as np",
    "x " * 300,  # past SENTENCE_TOKENS
    "漢字" * 100,
]


def test_the_written_out_minilm_forward_equals_transformers_bert_model(encoder):
    from transformers import AutoModel

    from adapterzoo.base import resolve_source

    bert = AutoModel.from_pretrained(resolve_source(routing.SENTENCE_ENCODER)).eval()
    batch = encoder.tokenizer(PROMPTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        expected = bert(**batch).last_hidden_state
    ours = encoder.exact_forward(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"][..., None].bool()  # padded positions are never read
    assert ((ours - expected).abs() * real).max() < 1e-5


def test_one_unpadded_prompt_encodes_as_it_does_inside_a_padded_batch(encoder):
    together = encoder(PROMPTS)
    alone = torch.cat([encoder([p]) for p in PROMPTS])
    assert torch.allclose(together, alone, atol=1e-5)


def test_bfloat16_features_move_no_score_by_more_than_the_stated_error(encoder):
    prototypes = encoder([*routing_examples("reverse", 24), *routing_examples("digits-sort", 24)])
    exact, fast = encoder(PROMPTS) @ prototypes.T, encoder(PROMPTS, exact=False) @ prototypes.T
    assert encoder.score_error == routing.BFLOAT16_SCORE_ERROR
    assert 0 < (exact - fast).abs().max() < routing.BFLOAT16_SCORE_ERROR


def test_routed_decisions_equal_those_of_the_float32_encoder_alone(encoder):
    zoo = sentence_zoo(encoder)
    fast = [d.adapter for d in zoo.route(PROMPTS)]
    float32_only = routing.SentenceEncoder(fast_dtype=torch.float32)
    assert float32_only.score_error == 0
    routing._cache(zoo).sentence = float32_only
    assert [d.adapter for d in zoo.route(PROMPTS)] == fast


def test_a_close_call_is_settled_by_the_float32_features(encoder, monkeypatch):
    zoo = sentence_zoo(encoder)
    zoo.route(PROMPTS[:1])  # the background's prototypes, encoded exactly once
    settled = []
    real_call = routing.SentenceEncoder.__call__

    def spy(self, prompts, batch_size=64, exact=True, ordered=False):
        if exact:
            settled.extend(prompts)
        return real_call(self, prompts, batch_size, exact, ordered)

    monkeypatch.setattr(routing.SentenceEncoder, "__call__", spy)
    zoo.route(PROMPTS)
    assert settled == []  # no decision here is within bfloat16's error
    monkeypatch.setattr(encoder, "score_error", 1.0)  # now every decision is
    assert [d.adapter for d in zoo.route(PROMPTS)] == [d.adapter for d in zoo.route(PROMPTS)]
    # each prompt and its instruction line, every distinct text once
    encoded = list(dict.fromkeys([*PROMPTS, *map(routing.instruction_of, PROMPTS)]))
    assert settled == encoded * 2


@pytest.mark.parametrize(
    ("whole", "base", "choice", "close"),
    [
        ((0.80, 0.50), 0.30, (0.9, 0.5), False),  # clearly a specialist, clearly this one
        ((0.80, 0.795), 0.30, (0.9, 0.5), False),  # whole prompts close: only the choice's scores choose
        ((0.80, 0.50), 0.30, (0.9, 0.895), True),  # the choice's runner-up within 2 * its error
        ((0.80, 0.50), 0.30, (0.9, 0.9), False),  # an exact tie (the same examples): the first listed, always
        ((0.80, 0.80), 0.795, (0.9, 0.5), True),  # the background within 2 * error
        ((0.503, 0.20), 0.10, (0.9, 0.5), True),  # the threshold (0.5) within error
        ((0.30, 0.299), 0.60, (0.9, 0.899), False),  # below the background: the base answers, whatever the choice
        ((0.40, 0.399), 0.10, (0.9, 0.899), False),  # below the threshold: likewise
    ],
)
def test_a_decision_is_a_close_call_only_if_an_error_could_change_the_adapter_chosen(whole, base, choice, close):
    scores, base_score = torch.tensor([whole]), torch.tensor([base])
    found = routing._close_calls(scores, base_score, 0.5, 0.004, torch.tensor([choice]), 0.004)
    assert found == ([0] if close else [])


def test_prototypes_are_built_once_for_the_same_records(encoder, monkeypatch):
    zoo = sentence_zoo(encoder)
    builds = []
    real_build = routing._build_prototypes
    monkeypatch.setattr(routing, "_build_prototypes", lambda *a: builds.append(1) or real_build(*a))
    for _ in range(3):
        zoo.route(held_out("upper", 1))
    assert builds == [1]
    zoo.route(held_out("upper", 1), records=routing.routing_records(zoo))  # the same content: no build
    assert builds == [1]


def test_new_routing_examples_take_effect_on_the_next_route(encoder):
    zoo = sentence_zoo(encoder)
    prompts = held_out("digits-sort")
    assert {d.adapter for d in zoo.route(prompts)} == {"digits-sort"}
    zoo.add_routing_examples("digits-sort", routing_examples("reverse", 12))
    assert "digits-sort" not in {d.adapter for d in zoo.route(prompts)}


def test_a_routing_record_changed_in_place_takes_effect_on_the_next_route(encoder):
    zoo = sentence_zoo(encoder)
    prompts = held_out("digits-sort")
    assert {d.adapter for d in zoo.route(prompts)} == {"digits-sort"}
    record = zoo.find_adapter("digits-sort").metadata["routing"]
    record["examples"][:] = routing_examples("reverse", 12)  # the list itself, as JSON editing would
    record["kind"] = "edited"  # its stored features no longer describe it: recomputed from the examples
    assert "digits-sort" not in {d.adapter for d in zoo.route(prompts)}


def test_a_removed_adapter_is_never_routed_to_again(encoder):
    zoo = sentence_zoo(encoder)
    assert {d.adapter for d in zoo.route(held_out("upper"))} == {"upper"}
    zoo.remove_adapter("upper")
    assert "upper" not in {d.adapter for d in zoo.route(held_out("upper"))}


def test_one_gather_scores_each_adapter_as_the_mean_of_its_nearest_examples(encoder):
    """Adapters with fewer examples than NEIGHBOURS score the mean over all of theirs."""
    zoo = sentence_zoo(encoder, tasks=())
    for task, count in (("reverse", 1), ("upper", 2), ("digits-sort", 12)):
        zoo.add_adapter(task, "lora", r=4, trainable=False)
        zoo.add_routing_examples(task, routing_examples(task, count))
    space = routing.feature_space(zoo)
    protos = routing._prototypes(zoo, routing.routing_records(zoo), space)
    queries = protos.normalise(routing.features(zoo, PROMPTS, space))
    scores, base = protos.scores(queries, [2, 0])  # any subset, in any order
    for column, name in enumerate(["digits-sort", "reverse"]):
        stored = routing._unpack(zoo.find_adapter(name).metadata["routing"])  # 12 rows and 1 row
        mine = queries @ protos.normalise(stored).T
        expected = mine.topk(min(routing.NEIGHBOURS, mine.shape[1]), dim=1).values.mean(1)
        assert torch.allclose(scores[:, column], expected, atol=1e-3)  # router: float32; record: float16
    background = queries @ protos.normalise(routing.features(zoo, list(routing.BACKGROUND_PROMPTS), space)).T
    assert torch.allclose(base, background.topk(routing.NEIGHBOURS, dim=1).values.mean(1), atol=1e-6)


def test_a_bfloat16_linear_reordered_for_onednn_equals_f_linear_to_the_bit():
    weight, bias = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    linear = routing.Linear(weight, bias)
    for shape in [(1, 64), (15, 64), (3, 7, 64)]:
        x = torch.randn(*shape).bfloat16()
        assert torch.equal(linear(x), torch.nn.functional.linear(x, weight, bias))


def test_without_onednn_s_reordering_ops_a_linear_falls_back_to_f_linear(monkeypatch):
    def missing(*args):
        raise RuntimeError("no such op in this build")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", missing)
    plain = routing.Linear(torch.randn(8, 4).bfloat16(), torch.zeros(8).bfloat16())
    assert plain.packed is None
    x = torch.randn(2, 4).bfloat16()
    assert torch.equal(plain(x), torch.nn.functional.linear(x, plain.weight, plain.bias))


def test_the_encoders_own_tokenizing_gives_the_ids_and_mask_the_hf_tokenizer_gives(encoder):
    texts = [
        *PROMPTS,
        *routing.BACKGROUND_PROMPTS,
        "word " * 400,  # past SENTENCE_TOKENS: cut the same way, [SEP] kept
        "é" * 3000,
        "a\nb",
        "日本語のテキスト" * 200,
        " ",
    ]
    for start in range(0, len(texts), 5):
        chunk = texts[start : start + 5]
        ids, mask = encoder.tokenize(chunk)
        expected = encoder.tokenizer(
            [text[: routing.SENTENCE_CHARS] for text in chunk],
            padding=True,
            truncation=True,
            max_length=routing.SENTENCE_TOKENS,
            return_tensors="pt",
        )
        assert torch.equal(ids, expected["input_ids"]), chunk
        assert torch.equal(mask, expected["attention_mask"]), chunk
