"""AdapterBias: Fu et al. (2022), "AdapterBias: Parameter-efficient Token-dependent
Representation Shift for Adapters in NLP Tasks".

Eq. (1)-(2): after the feed-forward output, each token is shifted along one learned vector v by
a token-dependent amount alpha = L h + b (a linear map to one number):
h <- h + (L . h + b) v. v starts at zero (the identity) and L small and random, so that v's
gradient, alpha, is not zero from the first step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterzoo import AdapterConfig, AdapterType, kernels, require
from adapterzoo.sites import find_role, linear_dims


@dataclass
class AdapterBiasConfig(AdapterConfig):
    init_std: float = 1e-2

    def validate(self) -> None:
        require(self.init_std >= 0, f"init_std must be >= 0, got {self.init_std!r}")


class AdapterBias(AdapterType):
    name = "adapterbias"
    Config = AdapterBiasConfig
    kind = "delta"
    # slot 0 (v = 0) adds exactly nothing: the core may run this delta over a whole batch, slot 0 for
    # other pools' rows (runtime.apply_delta)
    zero_slot_is_identity = True
    default_lr = 1e-2  # zoo.train's default (measured on SmolLM2, see README "Specialists")

    def sites(self, model, config):
        return find_role(model, "ffn_output")

    def tensors(self, model, site, module, config):
        d = linear_dims(module)[1]
        return {"v": (d,), "L": (d,), "b": (1,)}

    def init(self, name, tensor, config, generator, module):
        if name == "L":
            tensor.normal_(0, config.init_std, generator=generator)
        else:
            tensor.zero_()

    def delta(self, x, y, w, training):
        v, L, b = w["v"], w["L"], w["b"]  # (n, d), (n, d), (n, 1)
        alpha = torch.matmul(y, L[:, :, None]) + b[:, None, :]  # (n, T, 1)
        return alpha * v[:, None, :]  # (n, T, d)

    def fused_call(self, x, y, w, rows):
        # a decode step's y + delta in one kernel (runtime, adapterzoo/kernels)
        return kernels.adapterbias_call(y, w.stored("v"), w.stored("L"), w.stored("b"), rows, w.slots)
