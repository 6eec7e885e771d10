"""Automatic routing (adapterzoo/routing.py) on a tiny seeded base: `adapters="auto"`, per-row
"auto", fallback to the base, tenants' allowed sets, prototypes that travel with the saved
adapter, the early exit that keeps routing cheap, and Arrow's rule for LoRA."""

from __future__ import annotations

import pytest
import torch

from adapterzoo import routing
from adapterzoo.errors import BatchError
from adapterzoo.tasks import instructed_examples
from adapterzoo.testing.models import perturb, tiny_zoo

TASKS = ("reverse", "upper", "digits-sort")


@pytest.fixture(scope="module", autouse=True)
def one_layer_router():
    """The tiny base's character embeddings are random, so on their own (the default, layer 0)
    they barely tell these instructions apart; these tests route on one decoder layer instead.
    The mechanism is the same at every layer, and layer 0 has its own test below."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routing, "default_layer", lambda zoo: 1)
        yield


def specialists_zoo():
    """Three perturbed LoRAs, each with its task's training prompts as routing examples."""
    zoo = tiny_zoo("llama")
    for i, task in enumerate(TASKS):
        zoo.add_adapter(task, "lora", r=4, seed=i, trainable=False)
        perturb(zoo, task, seed=i)
        zoo.add_routing_examples(task, [ex.prompt for ex in instructed_examples(task, 12, "train")])
    return zoo


@pytest.fixture(scope="module")
def zoo():
    return specialists_zoo()


def held_out(task: str, n: int = 4):
    """Test-split inputs (never seen as routing examples), with the training phrasings."""
    return [ex.prompt for ex in instructed_examples(task, n, "test", seed=3)]


@pytest.mark.parametrize("encoder", ["sentence", "base"])
def test_every_auto_row_goes_to_the_adapter_whose_examples_match_its_prompt(zoo, encoder):
    for task in TASKS:
        decisions = zoo.route(held_out(task), encoder=encoder)
        assert [d.adapter for d in decisions] == [task] * 4, decisions


def test_the_sentence_encoder_routes_paraphrased_instructions_better_than_the_base(zoo):
    """The routing examples use each task's three training phrasings; these prompts use its two
    held-out paraphrases ("Order the numerals low to high"), worded differently on purpose.
    (Measured here: 20 of 24 right with the sentence encoder, 6 with the tiny base's features.)"""
    prompts, truth = [], []
    for task in TASKS:
        prompts += [ex.prompt for ex in instructed_examples(task, 8, "test", seed=3, held_out=True)]
        truth += [task] * 8
    right = {
        encoder: sum(d.adapter == t for d, t in zip(zoo.route(prompts, encoder=encoder), truth))
        for encoder in ("sentence", "base")
    }
    assert right["sentence"] >= 0.75 * len(prompts) and right["sentence"] > right["base"], right


def test_the_sentence_encoder_sends_general_prompts_to_the_base(zoo):
    general = ["Who painted the Mona Lisa?", "Write a haiku about autumn leaves.", "How do vaccines work?"]
    assert [d.adapter for d in zoo.route(general)] == [None] * 3


def test_layer_chooses_the_base_encoder_and_the_sentence_encoder_refuses_it(zoo):
    assert routing.feature_space(zoo, layer=1) == routing.FeatureSpace("base", 1)
    assert routing.feature_space(zoo) == routing.FeatureSpace(routing.DEFAULT_ENCODER)
    with pytest.raises(BatchError, match="needs encoder='base'"):
        zoo.route(["x ->"], encoder="sentence", layer=1)
    with pytest.raises(BatchError, match="unknown routing encoder"):
        zoo.route(["x ->"], encoder="magic")


def test_features_stored_by_one_encoder_are_recomputed_for_the_other(zoo, tmp_path):
    zoo.save_adapter("upper", tmp_path / "upper")
    fresh = tiny_zoo("llama")
    fresh.load_adapter("upper", tmp_path / "upper")
    assert fresh.find_adapter("upper").metadata["routing"]["encoder"] == routing.DEFAULT_ENCODER
    for encoder in ("base", "sentence"):
        assert [d.adapter for d in fresh.route(held_out("upper"), encoder=encoder)] == ["upper"] * 4


def test_generate_auto_equals_generate_with_the_routed_names(zoo):
    prompts = [held_out("reverse", 1)[0], held_out("upper", 1)[0], held_out("digits-sort", 1)[0]]
    auto = zoo.generate(prompts, adapters="auto", max_new_tokens=4)
    named = zoo.generate(prompts, adapters=list(TASKS), max_new_tokens=4)
    assert auto == named
    assert auto != zoo.generate(prompts, max_new_tokens=4)  # the adapters change the answers


def test_auto_rows_mix_with_named_and_base_rows_in_one_batch(zoo):
    prompts = [held_out("upper", 1)[0], held_out("reverse", 1)[0], "Why is the sky blue?"]
    mixed = zoo.generate(prompts, adapters=["auto", "reverse", None], max_new_tokens=4)
    assert mixed == zoo.generate(prompts, adapters=["upper", "reverse", None], max_new_tokens=4)


@pytest.mark.parametrize("encoder", ["sentence", "base"])
def test_a_general_prompt_falls_back_to_the_bare_base(zoo, encoder):
    prompt = routing.BACKGROUND_PROMPTS[0]
    assert zoo.route([prompt], encoder=encoder)[0].adapter is None
    assert zoo.generate([prompt], adapters="auto", max_new_tokens=4) == zoo.generate([prompt], max_new_tokens=4)


def test_routing_chooses_only_among_the_adapters_a_caller_may_use(zoo):
    prompts = held_out("reverse") + held_out("upper")
    for decision in zoo.route(prompts, among=["digits-sort"]):
        assert decision.adapter in ("digits-sort", None)
    assert [d.adapter for d in zoo.route(prompts, among=[])] == [None] * len(prompts)


def test_an_adapter_without_routing_examples_is_never_chosen():
    zoo = specialists_zoo()
    zoo.add_adapter("plain", "lora", r=4, seed=9, trainable=False)
    assert "plain" not in routing.routable(zoo)
    assert all(d.adapter != "plain" for d in zoo.route(held_out("reverse")))


def test_routing_prototypes_travel_with_the_saved_adapter(zoo, tmp_path):
    for task in TASKS:
        zoo.save_adapter(task, tmp_path / task)
    fresh = tiny_zoo("llama")
    for task in TASKS:
        fresh.load_adapter(task, tmp_path / task)
    prompts = held_out("reverse") + held_out("digits-sort")
    for encoder in ("sentence", "base"):
        assert [d.adapter for d in fresh.route(prompts, encoder=encoder)] == [
            d.adapter for d in zoo.route(prompts, encoder=encoder)
        ]


@pytest.mark.parametrize(
    "damage",
    [{"layer": 2}, {"features": "not base64!"}, {"kind": "another/v9"}, {"shape": [1, 3]}, {"base": "another-base"}],
)
def test_stale_or_damaged_prototypes_are_recomputed_from_their_stored_prompts(zoo, tmp_path, damage):
    zoo.save_adapter("upper", tmp_path / "upper")
    fresh = tiny_zoo("llama")
    fresh.load_adapter("upper", tmp_path / "upper")
    fresh.find_adapter("upper").metadata["routing"].update(damage)
    for encoder in ("sentence", "base"):
        assert [d.adapter for d in fresh.route(held_out("upper"), encoder=encoder)] == ["upper"] * 4


def test_routing_runs_only_the_first_layers_of_the_base(zoo):
    layers = routing.decoder_layers(zoo.model)
    calls = [0] * len(layers)
    handles = [
        layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(layers)
    ]
    try:
        feats = routing.prompt_features(zoo, held_out("upper", 2), layer=1)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1, 0]
    assert feats.shape == (2, 64) and torch.isfinite(feats).all()  # embeddings and hidden states


def test_routing_leaves_the_next_forward_untouched(zoo):
    prompts = held_out("reverse", 2)
    before = zoo.generate(prompts, adapters=["reverse", None], max_new_tokens=4)
    zoo.route(prompts)
    assert zoo.generate(prompts, adapters=["reverse", None], max_new_tokens=4) == before


def test_bad_routing_requests_are_named_errors(zoo):
    with pytest.raises(BatchError, match="unknown routing method"):
        zoo.route(["x ->"], method="magic")
    with pytest.raises(BatchError, match="one name"):
        zoo.generate(["x ->"], adapters="reverse")
    with pytest.raises(BatchError, match="routing layer"):
        routing.prompt_features(zoo, ["x ->"], layer=9)
    with pytest.raises(BatchError, match="routing layer"):
        routing.prompt_features(zoo, ["x ->"], layer=-1)
    with pytest.raises(BatchError, match="non-empty prompt"):
        zoo.add_routing_examples("reverse", ["", "   "])


def test_auto_with_no_routable_adapter_runs_the_bare_base():
    zoo = tiny_zoo("llama")
    assert zoo.generate(["a b c ->"], adapters="auto", max_new_tokens=3) == zoo.generate(["a b c ->"], max_new_tokens=3)


# ----------------------------------------------------------------------------- Arrow


def site_inputs(zoo, prompt: str) -> dict[str, torch.Tensor]:
    """The mean input each LoRA target site sees for `prompt` (on the bare base)."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(zoo.model.named_modules())
    sites = list(zoo.find_adapter("a").tensors)
    handles = [
        modules[s].register_forward_hook(lambda m, args, out, s=s: seen.__setitem__(s, args[0][0].mean(0)))
        for s in sites
    ]
    ids = torch.tensor([zoo.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    try:
        with torch.no_grad():
            zoo(ids, adapters=[None])
    finally:
        for h in handles:
            h.remove()
    return seen


def test_arrow_routes_each_prompt_to_the_lora_whose_delta_its_tokens_excite():
    """Adapter "a"'s ΔW reads (rank 1) along the inputs prompt A produces at each site, "b"'s
    along prompt B's: Arrow's top singular vectors must send A to "a" and B to "b"."""
    zoo = tiny_zoo("llama")
    prompts = {"a": "aaaa aaaa aaaa", "b": "9999 9999 9999"}
    for name in prompts:
        zoo.add_adapter(name, "lora", r=4, trainable=False)
    for name, prompt in prompts.items():
        inputs = site_inputs(zoo, prompt)
        with torch.no_grad():
            for site, tensors in zoo.find_adapter(name).tensors.items():
                tensors["A"].zero_()
                tensors["A"][:, 0] = inputs[site] / inputs[site].norm()
                tensors["B"].zero_()
                tensors["B"][0, 0] = 1.0
        routing.forget(zoo)
    decisions = zoo.route(list(prompts.values()), method="arrow")
    assert [d.adapter for d in decisions] == ["a", "b"], decisions
    assert all(d.method == "arrow" for d in decisions)
    assert [d.adapter for d in zoo.route(list(prompts.values()), method="arrow", among=["b"])] == ["b", "b"]


def test_arrow_needs_no_routing_examples_but_only_routes_loras(zoo):
    z = tiny_zoo("llama")
    z.add_adapter("bias", "bitfit", trainable=False)
    assert routing.routable(z, "arrow") == []
    assert z.route(["a b ->"], method="arrow")[0].adapter is None
    assert set(routing.routable(zoo, "arrow")) == set(TASKS)


def test_layer_zero_routes_on_the_embeddings_alone_and_runs_no_layer(zoo):
    layers = routing.decoder_layers(zoo.model)
    calls = []
    handles = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in layers]
    try:
        decisions = zoo.route(held_out("reverse") + held_out("digits-sort"), layer=0)
    finally:
        for h in handles:
            h.remove()
    assert calls == []
    assert [d.adapter for d in decisions] == ["reverse"] * 4 + ["digits-sort"] * 4


@pytest.mark.parametrize("examples", ["Reverse the word", [1, 2, None], [], ["x" * 10**5] * 50, {"a": 1}])
def test_a_hostile_routing_record_on_disk_is_ignored_or_capped_never_slow_or_fatal(zoo, tmp_path, examples):
    import json
    import time

    from adapterzoo.formats.native import CONFIG_FILE

    zoo.save_adapter("upper", tmp_path / "upper")
    config = tmp_path / "upper" / CONFIG_FILE
    record = json.loads(config.read_text())
    record["metadata"]["routing"] = {"examples": examples, "features": "junk", "kind": "x"}
    config.write_text(json.dumps(record))
    loaded = routing.read_routing_record(tmp_path / "upper")
    records = {"reverse": zoo.find_adapter("reverse").metadata["routing"]}
    if loaded is not None:
        records["upper"] = loaded
    start = time.perf_counter()
    decisions = zoo.route(held_out("reverse", 2), records=records)
    assert time.perf_counter() - start < 30
    assert [d.adapter for d in decisions] == ["reverse", "reverse"]


# ----------------------------------------------------------------------------- attacks, round 3


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_a_record_with_nan_or_infinite_features_cannot_win_every_prompt(zoo, poison):
    # NaN compared as the best score: an adapter whose stored features were NaN took every
    # prompt, general chat included (a public one: every tenant's model="auto" traffic)
    honest = zoo.find_adapter("digits-sort").metadata["routing"]
    rows, cols = honest["shape"]
    forged = {**honest, "features": routing._pack(torch.full((rows, cols), poison))}
    records = {"reverse": zoo.find_adapter("reverse").metadata["routing"], f"forged-{poison}": forged}
    decisions = zoo.route([*held_out("reverse", 2), "Why is the sky blue?"], records=records)
    assert [d.adapter for d in decisions] == ["reverse", "reverse", None]


def test_the_sentence_encoder_tokenizes_only_the_start_of_a_huge_prompt(zoo):
    # it reads SENTENCE_TOKENS tokens, but tokenized all of a prompt first: 262,144 CJK
    # characters (the server's cap for SmolLM2) took 1.1 s of CPU per model="auto" request
    encoder = routing._cache(zoo).sentence or routing.SentenceEncoder()
    seen = []
    pieces = encoder.pieces

    class Spy:
        def encode(self, text):
            seen.append(len(text))
            return pieces.encode(text)

    encoder.pieces = Spy()
    try:
        huge = held_out("reverse", 1)[0] + " " + "漢" * 262_144
        whole, start = encoder([huge]), encoder([huge[: routing.SENTENCE_CHARS]])
    finally:
        encoder.pieces = pieces
    assert max(seen) <= routing.SENTENCE_CHARS
    assert torch.allclose(whole, start)  # the tokens it reads are the same


def test_on_an_exact_tie_the_adapter_listed_first_wins(zoo):
    # a server lists a tenant's own adapters first: a public adapter that copies their examples
    # must not take their traffic by sorting earlier
    original = zoo.find_adapter("reverse").metadata["routing"]
    copy = dict(original)
    for order in (["reverse", "a-copy"], ["a-copy", "reverse"]):
        records = {name: original if name == "reverse" else copy for name in order}
        assert {d.adapter for d in zoo.route(held_out("reverse"), records=records)} == {order[0]}


def test_a_routing_example_that_is_not_valid_unicode_is_dropped_not_fatal(zoo):
    # "\ud800" is valid JSON: one such example in a public adapter's config made the tokenizer
    # raise, and model="auto" answered 500 to every tenant who could see that adapter
    garbled = {"examples": ["Sort the digits \ud800 now", *held_out("digits-sort")], "kind": "x"}
    records = {"reverse": zoo.find_adapter("reverse").metadata["routing"], "garbled": garbled}
    assert [d.adapter for d in zoo.route(held_out("reverse", 2), records=records)] == ["reverse", "reverse"]


def test_a_record_with_a_million_examples_costs_no_more_than_one_with_max_examples(zoo):
    # every model="auto" request read the whole list before keeping MAX_EXAMPLES of it: one public
    # adapter with 10^6 examples added 0.2 s to every routed request of every tenant who saw it
    class Unreadable(str):
        def strip(self, *args):
            raise AssertionError("an entry past MAX_EXAMPLES was read")

    examples = [*held_out("digits-sort", routing.MAX_EXAMPLES), *[Unreadable("x")] * 10**6]
    records = {"reverse": zoo.find_adapter("reverse").metadata["routing"], "long": {"examples": examples}}
    assert [d.adapter for d in zoo.route(held_out("reverse", 2), records=records)] == ["reverse", "reverse"]
