"""LoRA: Hu et al. (2021), "LoRA: Low-Rank Adaptation of Large Language Models".

Eq. (3): h = W0 x + (alpha / r) * B A x, with A (r x in) and B (out x r); B starts at zero, so a
new adapter leaves the base unchanged. rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r).
Stored here in the `x @ W` layout the batched kernels want: A as (in, r), B as (r, out), so the
delta is (x @ A) @ B * scale (PEFT's files hold the transposes; peft.py maps them).

In a mixed batch each row uses its own A and B by slot, and the whole batch is two batched
matmuls per site (Punica's BGMV). Ranks below the pool's bucket are zero-padded: the padded
columns of A and rows of B contribute exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adapterzoo import AdapterConfig, AdapterType, require
from adapterzoo.sites import Conv1D, find_linear, linear_dims

from . import peft as _peft

# The layers PEFT targets by default, per model family.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
}


@dataclass
class LoraConfig(AdapterConfig):
    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None  # names, a regex, "all-linear"; None: per family
    use_rslora: bool = False
    lora_dropout: float = 0.0
    init_lora_weights: bool | str = True  # True: B = 0 (identity); False: random B (tests)

    def validate(self) -> None:
        require(isinstance(self.r, int) and self.r >= 1, f"LoRA r must be a positive integer, got {self.r!r}")
        require(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0,
                f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        require(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        require(self.init_lora_weights in (True, False, "gaussian"),
                f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        t = self.target_modules
        require(t is None or isinstance(t, str) or (isinstance(t, (list, tuple)) and t and all(isinstance(x, str) for x in t)),
                f"target_modules must be a list of module names, a regex string or 'all-linear', got {t!r}")
        if isinstance(t, tuple):
            self.target_modules = list(t)

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def targets(model: nn.Module, config: LoraConfig) -> list[str] | str:
    if config.target_modules is not None:
        return config.target_modules
    family = getattr(model.config, "model_type", "")
    if family not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA target_modules for {family!r}; pass target_modules=[...]")
    return DEFAULT_TARGETS[family]


class Lora(AdapterType):
    name = "lora"
    Config = LoraConfig
    kind = "delta"
    default_lr = 2e-3  # zoo.train's default (measured on SmolLM2, see README "Specialists")

    def sites(self, model, config):
        return find_linear(model, targets(model, config))

    def tensors(self, model, site, module, config):
        fan_in, fan_out = linear_dims(module)
        return {"A": (fan_in, "r"), "B": ("r", fan_out)}

    def sizes(self, config):
        return {"r": config.r}

    def constants(self, config):
        return {"scale": config.scale, "dropout": config.lora_dropout}

    def init(self, name, tensor, config, generator, module):
        if name == "A":
            if config.init_lora_weights == "gaussian":
                tensor.normal_(0, 1 / config.r, generator=generator)
            else:  # PEFT's default: kaiming-uniform A, as nn.Linear initialises weights (fan_in = in)
                bound = 1 / math.sqrt(tensor.shape[0])
                tensor.uniform_(-bound, bound, generator=generator)
        elif config.init_lora_weights is False:  # random B too (tests): nn.Linear's init, fan_in = r
            bound = 1 / math.sqrt(tensor.shape[0])
            tensor.uniform_(-bound, bound, generator=generator)
        else:
            tensor.zero_()

    def delta(self, x, y, w, training):
        scale = w["scale"][:, None, None]  # (n or 1, 1, 1)
        if training:
            keep = 1 - w["dropout"][:, None, None]
            x = x * (torch.rand_like(x) < keep) / keep
        h = w.matmul(x, "A")  # (n, T, r): x @ A[slot] per row
        return w.matmul(h, "B") * scale  # (n, T, out)

    # PEFT's file format (adapterzoo.formats); the key and config mapping is in peft.py beside this file
    peft_types = _peft.PEFT_TYPES

    def from_peft(self, model, peft_config, state):
        return _peft.from_peft(model, peft_config, state)

    def to_peft(self, model, config, state):
        return _peft.to_peft(model, config, state)

    def merge(self, module, tensors, config, sign=1.0):
        delta_w = sign * config.scale * tensors["A"] @ tensors["B"]  # (in, out)
        with torch.no_grad():
            if isinstance(module, Conv1D):  # Conv1D keeps its weight as (in, out)
                module.weight += delta_w.to(module.weight)
            else:
                module.weight += delta_w.T.to(module.weight)
