"""Soft prompts <-> PEFT's PROMPT_TUNING layout (PEFT 0.21).

PEFT saves one tensor, `prompt_embeddings` (P, token_dim), the virtual token embeddings put
before the input embeddings; ours is `embeds` (P, hidden) at the input embedding module. How
PEFT initialised them (`prompt_tuning_init`: RANDOM, SAMPLE_VOCAB, TEXT) does not matter once
they are trained and saved. P-tuning (P_TUNING) runs an encoder over the prompt at every
forward and is not this type.
"""

from __future__ import annotations

from typing import Any

import torch

from adapterzoo.errors import UnsupportedFormatError
from adapterzoo.formats.peft import prompt_embeddings
from adapterzoo.sites import hidden_size

PEFT_TYPES = ("PROMPT_TUNING",)
KNOWN = {
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "prompt_tuning_init",
    "prompt_tuning_init_text",
    "tokenizer_name_or_path",
    "tokenizer_kwargs",
}


def from_peft(atype, model, peft_config: dict[str, Any], state: dict[str, torch.Tensor]):
    what = "PEFT prompt-tuning adapter"
    emb, p = prompt_embeddings(peft_config, state, what, KNOWN)
    d = hidden_size(model)
    if peft_config.get("token_dim") not in (None, d) or tuple(emb.shape) != (p, d):
        raise UnsupportedFormatError(
            f"{what}: prompt_embeddings has shape {tuple(emb.shape)} (token_dim={peft_config.get('token_dim')}), but "
            f"this base embeds tokens in {d} dimensions: expected ({p}, {d}); the adapter was made for another base"
        )
    config = {"num_virtual_tokens": p}
    (site,) = atype.sites(model, atype.Config.from_dict(config))
    return config, {f"{site}.embeds": emb}


def to_peft(atype, model, config, state: dict[str, torch.Tensor]):
    (site,) = atype.sites(model, config)
    mc = model.config
    peft_config = {
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": hidden_size(model),
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(mc, "num_attention_heads", None) or getattr(mc, "n_head", None),
        "num_layers": getattr(mc, "num_hidden_layers", None) or getattr(mc, "n_layer", None),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "modules_to_save": None,
    }
    return peft_config, {"prompt_embeddings": state[f"{site}.embeds"]}
