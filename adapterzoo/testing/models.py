"""Tiny seeded random bases (Llama, GPT-2, BERT) and a character tokenizer, for fast tests.

They have the real module layouts of their families (GPT-2's Conv1D, BERT's encoder, Llama's
grouped-query attention), so a test on them exercises the same sites as on the real models.
"""

from __future__ import annotations

import string

import torch

VOCAB = 100
FAMILIES = ("llama", "gpt2", "bert")
# one small adapter of each built-in type for these tiny bases: key -> (type, config)
ONE_OF_EACH = {
    "lora": ("lora", {"init_lora_weights": False}),
    "houlsby": ("houlsby", {"bottleneck": 8}),
    "bitfit": ("bitfit", {}),
    "adapterbias": ("adapterbias", {}),
    "prefix": ("prefix", {"num_virtual_tokens": 3}),
    "prompt": ("soft_prompt", {"num_virtual_tokens": 4}),
}


def char_tokenizer():
    """One token per printable character; pad=0, bos=1, eos=2, unk=3."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in string.printable[:95] + "\n":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


def tiny_model(family: str, seed: int = 0, layers: int = 2, hidden: int = 32):
    """A small random base of `family` ("llama", "gpt2" or "bert"), the same for the same seed."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    elif family == "bert":
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            pad_token_id=0,
        )
        model = BertModel(config)
    else:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    model.config.architectures = [type(model).__name__]
    return model.eval()


def tiny_zoo(family: str, seed: int = 0, **kwargs):
    from adapterzoo import Zoo

    kwargs.setdefault("device", "cpu")
    return Zoo(tiny_model(family, seed), char_tokenizer(), **kwargs)


def perturb(zoo, name: str, scale: float = 0.2, seed: int = 0) -> None:
    """Add noise to every tensor of an adapter, so it is no longer the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in zoo.get_adapter(name).parameters():
            t.add_(torch.randn(t.shape, generator=g) * scale)


def output(out) -> torch.Tensor:
    """Logits for causal LMs, last hidden states for encoders."""
    return out.logits if out.logits is not None else out.last_hidden_state
