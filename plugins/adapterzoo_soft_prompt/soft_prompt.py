"""Soft prompts: Lester et al. (2021), "The Power of Scale for Parameter-Efficient Prompt Tuning".

Section 2: P trainable embeddings P_e are put before the embedded input X_e, [P_e; X_e], and
only P_e is trained. Following Section 3.2, they start as copies of randomly chosen vocabulary
embeddings, which trains better than random noise. The core removes the virtual positions from
the outputs, so logits stay aligned with the caller's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterzoo import AdapterConfig, AdapterType, require
from adapterzoo.sites import hidden_size

from . import peft as _peft


@dataclass
class SoftPromptConfig(AdapterConfig):
    num_virtual_tokens: int = 20
    init: str = "vocab"  # "vocab": copies of random token embeddings; "random": N(0, 0.02)

    def validate(self) -> None:
        require(
            isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens >= 1,
            f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}",
        )
        require(self.init in ("vocab", "random"), f"init must be 'vocab' or 'random', got {self.init!r}")


class SoftPrompt(AdapterType):
    name = "soft_prompt"
    Config = SoftPromptConfig
    kind = "prompt"
    default_lr = 1e-1  # zoo.train's default (measured on SmolLM2, see README "Specialists")

    def sites(self, model, config):
        embeddings = model.get_input_embeddings()
        return [next(p for p, m in model.named_modules() if m is embeddings)]

    def tensors(self, model, site, module, config):
        return {"embeds": ("num_virtual_tokens", hidden_size(model))}

    def sizes(self, config):
        return {"num_virtual_tokens": config.num_virtual_tokens}

    def length(self, config):
        return config.num_virtual_tokens

    def init(self, name, tensor, config, generator, module):
        if config.init == "vocab":
            rows = torch.randint(0, module.weight.shape[0], (tensor.shape[0],), generator=generator)
            tensor.copy_(module.weight.detach()[rows].float().cpu())
        else:
            tensor.normal_(0, 0.02, generator=generator)

    # PEFT's file format (adapterzoo.formats); the key and config mapping is in peft.py beside this file
    peft_types = _peft.PEFT_TYPES

    def from_peft(self, model, peft_config, state):
        return _peft.from_peft(self, model, peft_config, state)

    def to_peft(self, model, config, state):
        return _peft.to_peft(self, model, config, state)

    def virtual_tokens(self, w):
        return w["embeds"]  # (n, P, d)
