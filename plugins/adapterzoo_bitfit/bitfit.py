"""BitFit: Ben Zaken et al. (2022), "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models".

Only the bias terms are tuned: every linear layer and every norm gets y = W x + b + delta[s]
(Section 3.1). A bias-free base (Llama) gets zero biases added, which is the same thing. delta
starts at zero, so a new adapter is the identity. The output head is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapterzoo import AdapterConfig, AdapterType, kernels, require
from adapterzoo.sites import find_linear, find_norms, is_linear, linear_dims


@dataclass
class BitFitConfig(AdapterConfig):
    include_norms: bool = True
    target_modules: list[str] | str = "all-linear"  # which linear layers (PEFT semantics)

    def validate(self) -> None:
        require(
            isinstance(self.include_norms, bool), f"include_norms must be true or false, got {self.include_norms!r}"
        )
        require(
            isinstance(self.target_modules, (str, list, tuple)),
            f"target_modules must be 'all-linear', a regex or a list of names, got {self.target_modules!r}",
        )


class BitFit(AdapterType):
    name = "bitfit"
    Config = BitFitConfig
    kind = "delta"
    # slot 0's bias is zero: the core may run this delta over a whole batch, slot 0 for other pools'
    # rows (runtime.apply_delta)
    zero_slot_is_identity = True
    default_lr = 1e-2  # zoo.train's default (measured on SmolLM2, see README "Specialists")

    def sites(self, model, config):
        found = set(find_linear(model, config.target_modules))
        if config.include_norms:
            found |= set(find_norms(model))
        return [p for p, _ in model.named_modules() if p in found]

    def tensors(self, model, site, module, config):
        width = linear_dims(module)[1] if is_linear(module) else module.weight.shape[0]
        return {"bias": (width,)}

    def delta(self, x, y, w, training):
        return w["bias"][:, None, :]  # (n, 1, out): the same shift for every token of a row

    def fused_call(self, x, y, w, rows):
        # a decode step's y + delta in one kernel (runtime, adapterzoo/kernels), reading each row's bias
        # from its slot: the eager delta gathers every row's bias first, which cost a fresh plan ~25 us
        # at each of 271 sites
        return kernels.bias_call(y, w.stored("bias"), rows, w.slots)

    def merge(self, module, tensors, config, sign=1.0):
        with torch.no_grad():
            if getattr(module, "bias", None) is None:
                if not is_linear(module):
                    raise NotImplementedError(
                        f"{type(module).__name__} has no bias to fold a BitFit delta into; merge an adapter made with "
                        "include_norms=False, or serve this one from the zoo"
                    )
                module.bias = nn.Parameter(
                    torch.zeros(tensors["bias"].shape, dtype=module.weight.dtype, device=module.weight.device),
                    requires_grad=False,
                )
            module.bias += sign * tensors["bias"].to(module.bias)
