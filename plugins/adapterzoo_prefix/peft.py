"""Prefix tuning <-> PEFT's PREFIX_TUNING layout (PEFT 0.21).

PEFT saves one tensor, `prompt_embeddings` (P, num_layers * 2 * token_dim), and reads it as

    (P, num_layers * 2, kv_heads, head_dim) -> layer i: keys = [:, 2 i], values = [:, 2 i + 1]

where `token_dim = kv_heads * head_dim` and `num_attention_heads = kv_heads` (for grouped-query
attention PEFT uses `num_key_value_heads` and `head_dim` of the base config). Ours keeps, per
attention module, `keys` and `values` of shape (P, kv_heads, head_dim): the same numbers.

With `prefix_projection=True` PEFT trains an MLP but saves its output (the projected prefix), and a
`PeftModel.from_pretrained` in inference mode uses that saved prefix as is; so both load the same
way here. Written files always say `prefix_projection: false`, which is what they hold.
"""

from __future__ import annotations

from typing import Any

import torch

from adapterzoo.errors import UnsupportedFormatError
from adapterzoo.formats.peft import prompt_embeddings
from adapterzoo.sites import attention_dims

PEFT_TYPES = ("PREFIX_TUNING",)
KNOWN = {
    "num_virtual_tokens",
    "num_layers",
    "token_dim",
    "num_attention_heads",
    "num_transformer_submodules",
    "prefix_projection",
    "encoder_hidden_size",
    "init_weights",
}


def _layout(model, config_sites) -> tuple[list[str], int, int]:
    modules = dict(model.named_modules())
    dims = {attention_dims(model, modules[s]) for s in config_sites}
    if len(dims) != 1:
        raise UnsupportedFormatError(
            "attention layers of this base differ in heads or head size; PEFT's prefix layout cannot express that"
        )
    kv_heads, head_dim = dims.pop()
    return list(config_sites), kv_heads, head_dim


def from_peft(atype, model, peft_config: dict[str, Any], state: dict[str, torch.Tensor]):
    what = "PEFT prefix-tuning adapter"
    emb, p = prompt_embeddings(peft_config, state, what, KNOWN)
    config = {"num_virtual_tokens": p}
    sites, kv_heads, head_dim = _layout(model, atype.sites(model, atype.Config.from_dict(config)))
    layers = len(sites)
    expected = {"num_layers": layers, "token_dim": kv_heads * head_dim, "num_attention_heads": kv_heads}
    for key, value in expected.items():
        if peft_config.get(key) not in (None, value):
            raise UnsupportedFormatError(
                f"{what}: {key}={peft_config[key]} but this base has {value} (its attention has {layers} layers, "
                f"{kv_heads} key/value heads of size {head_dim}); the adapter was made for another base"
            )
    if tuple(emb.shape) != (p, layers * 2 * kv_heads * head_dim):
        raise UnsupportedFormatError(
            f"{what}: prompt_embeddings has shape {tuple(emb.shape)}, expected {(p, layers * 2 * kv_heads * head_dim)} "
            f"(num_virtual_tokens, num_layers * 2 * kv_heads * head_dim) for this base"
        )
    kv = emb.reshape(p, layers, 2, kv_heads, head_dim)
    flat = {}
    for i, site in enumerate(sites):
        flat[f"{site}.keys"] = kv[:, i, 0]
        flat[f"{site}.values"] = kv[:, i, 1]
    return config, flat


def to_peft(atype, model, config, state: dict[str, torch.Tensor]):
    sites, kv_heads, head_dim = _layout(model, atype.sites(model, config))
    p = config.num_virtual_tokens
    kv = torch.stack(
        [torch.stack([state[f"{s}.keys"], state[f"{s}.values"]], 1) for s in sites], 1
    )  # (P, L, 2, kv, hd)
    peft_config = {
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": p,
        "num_layers": len(sites),
        "token_dim": kv_heads * head_dim,
        "num_attention_heads": kv_heads,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": kv_heads * head_dim,
        "prefix_projection": False,
        "modules_to_save": None,
    }
    return peft_config, {"prompt_embeddings": kv.reshape(p, -1).contiguous()}
