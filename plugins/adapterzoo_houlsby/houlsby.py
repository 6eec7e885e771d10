"""Bottleneck adapters: Houlsby et al. (2019), "Parameter-Efficient Transfer Learning for NLP".

Section 2.1: after the attention output projection and after the feed-forward output, before
the residual add, h <- h + U f(D h + b_d) + b_u, with D (m x d) projecting down to a bottleneck
of m and U (d x m) back up. U and b_u start at zero, so a new adapter is the identity (the paper
initialises near identity). Pfeiffer's variant is `locations=["ffn"]`. D and U are stored in
the `x @ W` layout the batched kernels want: `down` (d, m) = D^T and `up` (m, d) = U^T.

The bottleneck is zero-padded to the pool's bucket: padded columns of `down` and entries of b_d
give f(0) = 0 for every activation offered here, and padded rows of `up` are zero, so padding is
exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from adapterzoo import AdapterConfig, AdapterType, kernels, require
from adapterzoo.sites import find_role, linear_dims

from . import adapterhub as _adapterhub

ACTIVATIONS = {
    "relu": nn.functional.relu,
    "gelu": nn.functional.gelu,
    "swish": nn.functional.silu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
}
ROLES = {"attention": "attention_output", "ffn": "ffn_output"}


@dataclass
class HoulsbyConfig(AdapterConfig):
    bottleneck: int = 32  # about hidden/16 for a 576-wide base (AdapterHub's default reduction factor)
    activation: str = "swish"
    locations: list[str] = field(default_factory=lambda: ["attention", "ffn"])
    init_std: float = 1e-2

    def validate(self) -> None:
        require(
            isinstance(self.bottleneck, int) and self.bottleneck >= 1,
            f"bottleneck must be a positive integer, got {self.bottleneck!r}",
        )
        require(
            self.activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
        )
        require(
            isinstance(self.locations, (list, tuple)) and self.locations and set(self.locations) <= set(ROLES),
            f"locations must be a non-empty subset of {sorted(ROLES)}, got {self.locations!r}",
        )
        self.locations = list(self.locations)
        require(self.init_std >= 0, f"init_std must be >= 0, got {self.init_std!r}")


class Houlsby(AdapterType):
    name = "houlsby"
    Config = HoulsbyConfig
    kind = "delta"
    # slot 0 adds exactly nothing (f(0 @ D + 0) @ 0 + 0, every activation has f(0) = 0): the core may
    # run this delta over a whole batch, slot 0 for other pools' rows (runtime.apply_delta)
    zero_slot_is_identity = True
    default_lr = 2e-3  # zoo.train's default (measured on SmolLM2, see README "Specialists")

    def sites(self, model, config):
        found = []
        for location in config.locations:
            found += find_role(model, ROLES[location])
        order = {p: i for i, (p, _) in enumerate(model.named_modules())}
        return sorted(found, key=order.__getitem__)

    def tensors(self, model, site, module, config):
        d = linear_dims(module)[1]
        return {"down": (d, "bottleneck"), "down_bias": ("bottleneck",), "up": ("bottleneck", d), "up_bias": (d,)}

    def sizes(self, config):
        return {"bottleneck": config.bottleneck}

    def variant(self, config):
        return config.activation

    def init(self, name, tensor, config, generator, module):
        if name == "down":
            tensor.normal_(0, config.init_std, generator=generator)
        else:
            tensor.zero_()

    # AdapterHub's file format (adapterzoo.formats); the key and config mapping is in adapterhub.py beside this file
    adapterhub_architectures = _adapterhub.ARCHITECTURES

    def from_adapterhub(self, model, config, state):
        return _adapterhub.from_adapterhub(self, model, config, state)

    def to_adapterhub(self, model, config, state, name):
        return _adapterhub.to_adapterhub(self, model, config, state, name)

    def delta(self, x, y, w, training):
        z = w.matmul(y, "down") + w["down_bias"][:, None, :]  # (n, T, m): D h + b_d, per row's slot
        z = ACTIVATIONS[w["variant"]](z)
        return w.matmul(z, "up") + w["up_bias"][:, None, :]  # (n, T, d): U f(.) + b_u

    def fused_call(self, x, y, w, rows):
        # a decode step's y + delta in one kernel (runtime, adapterzoo/kernels)
        down, up = w.stored("down"), w.stored("up")
        return kernels.bottleneck_call(
            y, down, w.stored("down_bias"), up, w.stored("up_bias"), w.variant, rows, w.slots
        )
