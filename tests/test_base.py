"""Loading bases: embedded defaults (SmolLM2 GGUF, all-MiniLM-L6-v2), folders; fingerprints."""

from __future__ import annotations

import pytest
import torch

from adapterzoo import Zoo
from adapterzoo.base import Fingerprint, base_state_checksum, cache_dir, fingerprint, resolve_source
from adapterzoo.testing.models import output, perturb, tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return Zoo.from_pretrained("smollm2", device="cpu")


@pytest.fixture(scope="module")
def minilm():
    return Zoo.from_pretrained("minilm", device="cpu")


def test_smollm2_from_the_embedded_gguf(smollm2):
    assert smollm2.model.config.model_type == "llama" and smollm2.model.config.num_hidden_layers == 30
    assert smollm2.is_causal_lm and smollm2.tokenizer is not None
    cached = list((cache_dir() / "bases").glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))
    assert cached, "the dequantized GGUF is cached as safetensors"
    again = Zoo.from_pretrained(resolve_source("smollm2"), device="cpu")  # the .gguf path itself
    assert again.fingerprint == smollm2.fingerprint


def test_minilm_is_a_bert_encoder(minilm):
    assert minilm.model.config.model_type == "bert" and not minilm.is_causal_lm
    enc = minilm.tokenizer(["a sentence", "another one here"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = minilm(enc["input_ids"], enc["attention_mask"], [None, None])
    assert out.last_hidden_state.shape[-1] == 384


ALL_TYPES = [
    ("lora", {"init_lora_weights": False}),
    ("houlsby", {}),
    ("bitfit", {}),
    ("adapterbias", {}),
    ("prefix", {"num_virtual_tokens": 4}),
    ("soft_prompt", {"num_virtual_tokens": 4}),
]


@pytest.mark.parametrize("which", ["smollm2", "minilm"])
def test_every_type_mixed_on_a_real_base(which, request):
    zoo = request.getfixturevalue(which)
    before = base_state_checksum(zoo.model)
    names = []
    for i, (type_name, config) in enumerate(ALL_TYPES):
        name = f"{which}-{type_name}"
        if name not in zoo.adapters:
            zoo.add_adapter(name, type_name, seed=i, trainable=False, **config)
            perturb(zoo, name, scale=0.05, seed=i)
        names.append(name)
    names.append(None)
    texts = [
        "The capital of France is",
        "def f(x):",
        "Water boils at 100",
        "Hi",
        "one two three four",
        "The opposite of hot",
        "A",
    ]
    zoo.tokenizer.padding_side = "left"
    enc = zoo.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        mixed = output(zoo(enc["input_ids"], enc["attention_mask"], names))
        for i, name in enumerate(names):
            real = enc["attention_mask"][i].bool()
            solo = output(zoo(enc["input_ids"][i : i + 1, real], None, [name]))[0]
            # SmolLM2's logits reach ~30 in magnitude: 1e-4 relative to that scale is float32 summation noise
            # through 30 layers (tiny models in tests/test_mixed_batch.py agree to 1e-4 absolute)
            scale = max(1.0, float(solo.abs().max()))
            torch.testing.assert_close(
                mixed[i, real], solo, atol=1e-4 * scale, rtol=1e-4, msg=f"{which} row {i} {name}"
            )
    assert base_state_checksum(zoo.model) == before


def test_fingerprint_tells_bases_apart_and_survives_dtype():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    fa, fb = fingerprint(a), fingerprint(b)
    assert fa.architecture == fb.architecture and fa.shapes == fb.shapes
    assert fa.mismatch(fb) == "weights differ"
    assert fa.mismatch(fingerprint(tiny_model("llama", seed=0).to(torch.bfloat16))) is None
    assert fa.mismatch(fingerprint(tiny_model("gpt2"))).startswith("architecture")
    assert Fingerprint.from_dict(fa.to_dict()) == fa
