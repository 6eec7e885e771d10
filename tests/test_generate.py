"""zoo.generate: a mixed batch with a KV cache gives each row what it gets alone."""

from __future__ import annotations

import functools

import pytest
import torch

from adapterzoo import BatchError
from adapterzoo.testing.models import ONE_OF_EACH as TYPES
from adapterzoo.testing.models import perturb, tiny_zoo

PROMPTS = ["abc ->", "hello", "x", "the quick brown", "1 2 3", "zz top", "q"]


@functools.cache
def zoo_for(family):
    zoo = tiny_zoo(family)
    for i, (name, (type_name, config)) in enumerate(TYPES.items()):
        zoo.add_adapter(name, type_name, seed=i, trainable=False, **config)
        perturb(zoo, name, scale=1.0, seed=i)
    return zoo


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mixed_generate_equals_each_row_alone(family):
    zoo = zoo_for(family)
    names = [*TYPES, None]
    mixed = zoo.generate(PROMPTS, names, max_new_tokens=8)
    assert len(set(mixed)) > 3  # the adapters really steer the rows apart
    for prompt, name, text in zip(PROMPTS, names, mixed):
        assert zoo.generate([prompt], [name], max_new_tokens=8) == [text], name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_cache_matches_a_full_forward_each_step(family):
    """Greedy decoding with the cache = argmax of a fresh full forward over prompt + output."""
    zoo = zoo_for(family)
    tok = zoo.tokenizer
    for name in [*TYPES, None]:
        text = zoo.generate(["abc ->"], [name], max_new_tokens=6, skip_special_tokens=False)[0]
        ids = tok("abc ->", add_special_tokens=False)["input_ids"]
        expected = []
        with torch.inference_mode():
            for _ in range(6):
                logits = zoo(torch.tensor([ids + expected]), None, [name]).logits
                nxt = int(logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                expected.append(nxt)
        assert text == tok.decode(expected), name


def test_sampling_is_seeded():
    zoo = zoo_for("llama")
    names = ["lora", "prefix", None]
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    a = zoo.generate(PROMPTS[:3], names, seed=1, **kwargs)
    assert a == zoo.generate(PROMPTS[:3], names, seed=1, **kwargs)
    assert a != zoo.generate(PROMPTS[:3], names, seed=2, **kwargs)


def test_stop_sequences_and_max_new_tokens():
    zoo = zoo_for("llama")
    full = zoo.generate(["hello"], ["lora"], max_new_tokens=10)[0]
    assert len(zoo.tokenizer(full, add_special_tokens=False)["input_ids"]) <= 10
    assert zoo.generate(["hello"], ["lora"], max_new_tokens=0) == [""]
    if len(full) > 3:
        stop = full[2:4]
        cut = zoo.generate(["hello"], ["lora"], max_new_tokens=10, stop=[stop])[0]
        assert cut == full[: full.find(stop)]


def test_bad_generate_input():
    zoo = zoo_for("llama")
    with pytest.raises(BatchError, match="one adapter"):
        zoo.generate(["a", "b"], ["lora"])
    with pytest.raises(BatchError, match="empty prompt"):
        zoo.generate([""], [None])
    with pytest.raises(BatchError, match="causal language model"):
        tiny_zoo("bert").generate(["a"], [None])
