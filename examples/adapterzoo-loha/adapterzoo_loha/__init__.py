"""LoHa for adapterzoo: Hyeon-Woo et al. (2022), "FedPara: Low-Rank Hadamard Product for
Communication-Efficient Federated Learning", as PEFT's LoHa (peft/tuners/loha, PEFT 0.21):

    delta W = ((w1a w1b) * (w2a w2b)) * alpha / r        (out, in); * is the Hadamard product

with w1a, w2a (out, r) and w1b, w2b (r, in), stored under PEFT's names and shapes.

The forward never rebuilds that product: `derive` does, once per slot placement (every step while
training), into the cheaper of two forms, chosen by the pool's shapes alone:

- factored: the Hadamard product of two rank-r matrices is a rank-r^2 matrix, down @ up with
  down[:, (i, j)] = w1b[i] * w2b[j] (in, r^2) and up[(i, j)] = w1a[:, i] * w2a[:, j] * scale
  (r^2, out), so a decode step is LoRA's two matmuls at rank r^2;
- dense: delta W itself, (in, out), when r^2 (in + out) > in * out (small layers, large r).

Zero-padded ranks (a rank-5 adapter in the rank-8 pool) give zero columns and rows: exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterzoo import AdapterConfig, AdapterType, hookimpl, require
from adapterzoo.errors import UnsupportedFormatError
from adapterzoo.formats.peft import check_fields
from adapterzoo.sites import Conv1D, find_linear, linear_dims

# PEFT's LoHa defaults are LoRA's (TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING)
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}
NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")  # PEFT's keys, and ours
PEFT_KNOWN = {"r", "alpha", "target_modules", "init_weights", "rank_dropout", "module_dropout", "use_effective_conv2d"}
PEFT_HINTS = {
    "rank_pattern": "per-module ranks are not supported by the loha type; retrain with one r.",
    "alpha_pattern": "per-module alphas are not supported by the loha type; retrain with one alpha.",
    "layers_to_transform": "give target_modules as a regex naming those layers instead.",
    "layers_pattern": "give target_modules as a regex naming those layers instead.",
    "exclude_modules": "give target_modules as a regex that leaves those modules out instead.",
}


@dataclass
class LoHaConfig(AdapterConfig):
    r: int = 8
    alpha: float = 8
    target_modules: list[str] | str | None = None  # names, a regex, "all-linear"; None: PEFT's per family
    init_weights: bool = True  # True: w2b = 0 (identity); False: all four random (tests)
    rank_dropout: float = 0.0  # training only: drops rows of delta W, as PEFT does
    module_dropout: float = 0.0  # training only: drops the whole adapter for a row

    def validate(self) -> None:
        require(
            isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1,
            f"LoHa r must be a positive integer, got {self.r!r}",
        )
        require(
            isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
            f"LoHa alpha must be a positive number, got {self.alpha!r}",
        )
        require(isinstance(self.init_weights, bool), f"init_weights must be true or false, got {self.init_weights!r}")
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and 0 <= value < 1, f"{name} must be in [0, 1), got {value!r}")
        t = self.target_modules
        if isinstance(t, (tuple, set)):
            self.target_modules = t = sorted(t)
        require(
            t is None or isinstance(t, str) or (isinstance(t, list) and t and all(isinstance(x, str) for x in t)),
            f"target_modules must be a list of module names, a regex or 'all-linear', got {t!r}",
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.r


def _targets(model, config: LoHaConfig):
    if config.target_modules is not None:
        return config.target_modules
    family = getattr(model.config, "model_type", "")
    require(family in DEFAULT_TARGETS, f"no default LoHa target_modules for {family!r}; pass target_modules=[...]")
    return DEFAULT_TARGETS[family]


def _kaiming_uniform(tensor: torch.Tensor, generator: torch.Generator) -> None:
    """nn.init.kaiming_uniform_(t, a=sqrt(5)), PEFT's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(tensor.shape[1])
    tensor.uniform_(-bound, bound, generator=generator)


class LoHa(AdapterType):
    name = "loha"
    Config = LoHaConfig
    kind = "delta"
    default_lr = 2e-3

    @classmethod
    def conformance_configs(cls):
        # r=2 on these small layers takes the factored form, r=8 the dense one
        return [{}, {"r": 2, "alpha": 5, "target_modules": "all-linear"}]

    def sites(self, model, config):
        return find_linear(model, _targets(model, config))

    def tensors(self, model, site, module, config):
        fan_in, fan_out = linear_dims(module)
        return {
            "hada_w1_a": (fan_out, "r"),
            "hada_w1_b": ("r", fan_in),
            "hada_w2_a": (fan_out, "r"),
            "hada_w2_b": ("r", fan_in),
        }

    def sizes(self, config):
        return {"r": config.r}

    def constants(self, config):
        return {"scale": config.scale, "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout}

    def init(self, name, tensor, config, generator, module):
        if name == "hada_w2_b" and config.init_weights:
            tensor.zero_()  # one zero factor: a new adapter is the identity
        else:
            _kaiming_uniform(tensor, generator)

    def derive(self, site, module, tensors, config):
        w1a, w1b, w2a, w2b = (tensors[n] for n in NAMES)
        (fan_out, r), fan_in = w1a.shape, w1b.shape[1]
        if r * r * (fan_in + fan_out) <= fan_in * fan_out:  # factored: rank r^2
            down = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, fan_in).T  # (in, r^2)
            up = (w1a.T[:, None, :] * w2a.T[None, :, :]).reshape(r * r, fan_out) * config.scale  # (r^2, out)
            return {"down": down.contiguous(), "up": up}
        return {"dense": (((w1a @ w1b) * (w2a @ w2b)) * config.scale).T.contiguous()}  # (in, out)

    def delta(self, x, y, w, training):
        if "dense" in w:
            out = w.matmul(x, "dense")  # (n, T, out): x @ delta W[slot]^T per row
        else:
            out = w.matmul(w.matmul(x, "down"), "up")
        if training:
            out = self._dropouts(out, w)
        return out

    @staticmethod
    def _dropouts(out: torch.Tensor, w) -> torch.Tensor:
        """PEFT's training-time dropouts, per row: module_dropout skips the adapter, rank_dropout drops
        output rows of delta W (rescaled by the kept share, as PEFT does)."""
        n, _, fan_out = out.shape
        rank_p = w["rank_dropout"][:, None]  # (n or 1, 1)
        if bool((rank_p > 0).any()):
            keep = (torch.rand(n, fan_out, device=out.device) > rank_p).to(out.dtype)
            keep = keep / keep.mean(dim=1, keepdim=True).clamp_min(1e-12)
            out = out * torch.where(rank_p > 0, keep, torch.ones_like(keep))[:, None, :]
        module_p = w["module_dropout"]
        if bool((module_p > 0).any()):
            on = (torch.rand(n, device=out.device) > module_p) | (module_p <= 0)
            out = out * on.to(out.dtype)[:, None, None]
        return out

    def merge(self, module, tensors, config, sign=1.0):
        delta_w = sign * ((tensors["hada_w1_a"] @ tensors["hada_w1_b"]) * (tensors["hada_w2_a"] @ tensors["hada_w2_b"]))
        delta_w = delta_w * config.scale  # (out, in)
        with torch.no_grad():
            if Conv1D and isinstance(module, Conv1D):
                module.weight += delta_w.T.to(module.weight)
            else:
                module.weight += delta_w.to(module.weight)

    # PEFT's LOHA folders: the same tensor names and shapes, under the module path
    peft_types = ("LOHA",)

    def from_peft(self, model, peft_config, state):
        what = "PEFT LoHa adapter"
        check_fields(peft_config, what, PEFT_KNOWN, PEFT_HINTS)
        flat = {}
        for key, tensor in state.items():
            site, _, name = key.rpartition(".")
            if name not in NAMES:
                raise UnsupportedFormatError(
                    f"{what}: weight {key!r} is not a LoHa factor of a linear layer "
                    "(Conv layers and CP-decomposed t1/t2 are not supported)"
                )
            flat[f"{site}.{name}"] = tensor
        config = {
            k: peft_config[k]
            for k in ("r", "alpha", "target_modules", "init_weights", "rank_dropout", "module_dropout")
            if peft_config.get(k) is not None
        }
        return config, flat

    def to_peft(self, model, config, state):
        modules = dict(model.named_modules())
        conv1d = sorted(
            {k.rpartition(".")[0] for k in state if Conv1D and isinstance(modules[k.rpartition(".")[0]], Conv1D)}
        )
        if conv1d:
            raise UnsupportedFormatError(
                f"PEFT's LoHa does not adapt GPT-2's Conv1D layers (e.g. {conv1d[0]}), so this adapter has no PEFT "
                "form; save it with format='native'"
            )
        target = _targets(model, config)
        peft_config = {
            "peft_type": "LOHA",
            "r": config.r,
            "alpha": config.alpha,
            "target_modules": target if isinstance(target, str) else list(target),
            "init_weights": config.init_weights,
            "rank_dropout": config.rank_dropout,
            "module_dropout": config.module_dropout,
            "use_effective_conv2d": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": None,
        }
        return peft_config, dict(state)


@hookimpl
def register_adapter_types(register):
    register(LoHa)
