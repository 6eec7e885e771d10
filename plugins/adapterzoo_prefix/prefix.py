"""Prefix tuning: Li & Liang (2021), "Prefix-Tuning: Optimizing Continuous Prompts for Generation".

Eq. (3): every attention layer attends to P trainable key/value vectors before the real tokens'
(the activations h_i for i in the prefix are free parameters). The core puts them in front of
each row's keys and values and masks the unused ones, so rows with shorter prefixes, or none,
share the batch. The real tokens' positions start at P, as if the prefix were P real tokens
(what PEFT does, so PEFT prefix adapters give the same outputs here).

The reparametrisation of Section 4.3 (an MLP producing the prefix) is a training aid; what is
saved and served is its output, the prefix itself, as PEFT also saves it.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapterzoo import AdapterConfig, AdapterType, require
from adapterzoo.sites import attention_dims, find_role

from . import peft as _peft


@dataclass
class PrefixConfig(AdapterConfig):
    num_virtual_tokens: int = 20
    init_std: float = 0.5

    def validate(self) -> None:
        require(isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens >= 1,
                f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        require(self.init_std >= 0, f"init_std must be >= 0, got {self.init_std!r}")


class Prefix(AdapterType):
    name = "prefix"
    Config = PrefixConfig
    kind = "prefix"

    def sites(self, model, config):
        return find_role(model, "attention")

    def tensors(self, model, site, module, config):
        kv_heads, head_dim = attention_dims(model, module)
        return {"keys": ("num_virtual_tokens", kv_heads, head_dim), "values": ("num_virtual_tokens", kv_heads, head_dim)}

    def sizes(self, config):
        return {"num_virtual_tokens": config.num_virtual_tokens}

    def length(self, config):
        return config.num_virtual_tokens

    def init(self, name, tensor, config, generator, module):
        tensor.normal_(0, config.init_std, generator=generator)

    # PEFT's file format (adapterzoo.formats); the key and config mapping is in peft.py beside this file
    peft_types = _peft.PEFT_TYPES

    def from_peft(self, model, peft_config, state):
        return _peft.from_peft(self, model, peft_config, state)

    def to_peft(self, model, config, state):
        return _peft.to_peft(self, model, config, state)

    def prefix(self, w):
        # (n, P, kv_heads, head_dim) -> (n, kv_heads, P, head_dim), the layout attention uses
        return w["keys"].transpose(1, 2), w["values"].transpose(1, 2)
