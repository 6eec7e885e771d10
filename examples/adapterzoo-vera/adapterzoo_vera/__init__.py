"""VeRA for adapterzoo: Kopiczko et al. (2024), "VeRA: Vector-based Random Matrix Adaptation",
as PEFT's VeRA (peft/tuners/vera, PEFT 0.21):

    y' = y + lambda_b * ((lambda_d * (x A^T)) B^T)

A (r, in_max) and B (out_max, r) are random, frozen, and the same for every adapted layer (sliced
to each layer's in and out) and every adapter made with the same `projection_prng_key`: PEFT's
kaiming-uniform draws from one torch generator seeded with that key. Only the vectors lambda_d
(r,) and lambda_b (out,) are per adapter and trained.

This is the plugin contract's type-wide tensors hook (`shared_tensors`, `shared_seed`,
`init_shared`): A and B are made once per (seed, r, shapes) and reach `delta` as `w.shared`, one
pair for the whole batch, so the two projections are plain matmuls over every row at once and
only the per-row vectors are gathered by slot. Zero-padded ranks (lambda_d = 0 beyond r) add
exactly nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterzoo import AdapterConfig, AdapterType, hookimpl, require
from adapterzoo.errors import UnsupportedFormatError
from adapterzoo.formats.peft import check_fields
from adapterzoo.sites import Conv1D, find_linear, linear_dims

DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}
PEFT_KNOWN = {
    "r",
    "target_modules",
    "projection_prng_key",
    "save_projection",
    "vera_dropout",
    "d_initial",
    "init_weights",
    "fan_in_fan_out",
}
PEFT_HINTS = {
    "bias": "VeRA with trained biases (bias='all' or 'vera_only') is not supported; retrain with bias='none'.",
    "layers_to_transform": "give target_modules as a regex naming those layers instead.",
    "layers_pattern": "give target_modules as a regex naming those layers instead.",
}
PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")  # PEFT's keys when save_projection=True


@dataclass
class VeraConfig(AdapterConfig):
    r: int = 256
    target_modules: list[str] | str | None = None  # names, a regex, "all-linear"; None: PEFT's per family
    projection_prng_key: int = 0  # the seed of the shared A and B
    vera_dropout: float = 0.0
    d_initial: float = 0.1  # lambda_d starts here; lambda_b starts at 0 (identity)

    def validate(self) -> None:
        require(
            isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1,
            f"VeRA r must be a positive integer, got {self.r!r}",
        )
        require(
            isinstance(self.projection_prng_key, int) and not isinstance(self.projection_prng_key, bool),
            f"projection_prng_key must be an integer, got {self.projection_prng_key!r}",
        )
        require(
            isinstance(self.vera_dropout, (int, float)) and 0 <= self.vera_dropout < 1,
            f"vera_dropout must be in [0, 1), got {self.vera_dropout!r}",
        )
        require(
            isinstance(self.d_initial, (int, float)) and not isinstance(self.d_initial, bool),
            f"d_initial must be a number, got {self.d_initial!r}",
        )
        t = self.target_modules
        if isinstance(t, (tuple, set)):
            self.target_modules = t = sorted(t)
        require(
            t is None or isinstance(t, str) or (isinstance(t, list) and t and all(isinstance(x, str) for x in t)),
            f"target_modules must be a list of module names, a regex or 'all-linear', got {t!r}",
        )


def _targets(model, config: VeraConfig):
    if config.target_modules is not None:
        return config.target_modules
    family = getattr(model.config, "model_type", "")
    require(family in DEFAULT_TARGETS, f"no default VeRA target_modules for {family!r}; pass target_modules=[...]")
    return DEFAULT_TARGETS[family]


class Vera(AdapterType):
    name = "vera"
    Config = VeraConfig
    kind = "delta"
    default_lr = 1e-2  # only vectors are trained; VeRA's paper uses larger rates than LoRA's

    @classmethod
    def conformance_configs(cls):
        return [{"r": 8}, {"r": 5, "projection_prng_key": 7, "target_modules": "all-linear", "d_initial": 0.5}]

    def sites(self, model, config):
        return find_linear(model, _targets(model, config))

    def tensors(self, model, site, module, config):
        return {"lambda_d": ("r",), "lambda_b": (linear_dims(module)[1],)}

    def sizes(self, config):
        return {"r": config.r}

    def constants(self, config):
        return {"dropout": config.vera_dropout}

    def shared_tensors(self, model, config):
        """PEFT's A (r, in_max) and B (out_max, r): in_max and out_max over the adapted layers."""
        modules = dict(model.named_modules())
        dims = [linear_dims(modules[s]) for s in self.sites(model, config)]
        return {"vera_A": ("r", max(d[0] for d in dims)), "vera_B": (max(d[1] for d in dims), "r")}

    def shared_seed(self, config):
        return config.projection_prng_key

    def init_shared(self, name, tensor, config, generator):
        """PEFT's `_kaiming_init`: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), A first, then B."""
        bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(tensor.shape[1])
        tensor.uniform_(-bound, bound, generator=generator)

    def init(self, name, tensor, config, generator, module):
        if name == "lambda_d":
            tensor.fill_(config.d_initial)
        else:
            tensor.zero_()  # lambda_b = 0: a new adapter is the identity

    def delta(self, x, y, w, training):
        A, B = w.shared["vera_A"], w.shared["vera_B"]  # (r_pool, in_max), (out_max, r_pool): the same for all rows
        if training and bool((w["dropout"] > 0).any()):
            keep = 1 - w["dropout"][:, None, None]
            x = x * (torch.rand_like(x) < keep) / keep
        h = x @ A[:, : x.shape[-1]].T  # (n, T, r): one matmul for the whole batch
        h = (h * w["lambda_d"][:, None, :]) @ B[: y.shape[-1]].T  # (n, T, out)
        return h * w["lambda_b"][:, None, :]

    # PEFT's VERA folders: lambda_d / lambda_b under the module path; A and B from the seed
    peft_types = ("VERA",)

    def from_peft(self, model, peft_config, state):
        what = "PEFT VeRA adapter"
        check_fields(peft_config, what, PEFT_KNOWN, PEFT_HINTS)
        config = {
            k: peft_config[k]
            for k in ("r", "target_modules", "projection_prng_key", "vera_dropout", "d_initial")
            if peft_config.get(k) is not None
        }
        saved = {k: state[k] for k in PROJECTIONS if k in state}
        flat = {}
        for key, tensor in state.items():
            if key in saved:
                continue
            site, _, name = key.rpartition(".vera_")
            if name not in ("lambda_d", "lambda_b"):
                raise UnsupportedFormatError(f"{what}: weight {key!r} is not a VeRA lambda_d or lambda_b")
            flat[f"{site}.{name}"] = tensor
        if saved:  # PEFT saved A and B: they must be what the seed makes here, or the adapter means something else
            from adapterzoo.adapter import shared_tensors

            cfg = VeraConfig.from_dict(config)
            ours, _ = shared_tensors(self, model, cfg, {"r": cfg.r})
            for key, name in zip(PROJECTIONS, ("vera_A", "vera_B")):
                if key in saved and (
                    saved[key].shape != ours[name].shape
                    or not torch.allclose(saved[key].float(), ours[name], atol=1e-6)
                ):
                    raise UnsupportedFormatError(
                        f"{what}: its saved {name} is not the one projection_prng_key="
                        f"{cfg.projection_prng_key} makes for these layers (made with another torch version or "
                        "layer selection?); adapters with other projections are not supported"
                    )
        return config, flat

    def to_peft(self, model, config, state):
        target = _targets(model, config)
        modules = dict(model.named_modules())
        conv1d = any(Conv1D and isinstance(modules[k.rpartition(".")[0]], Conv1D) for k in state)
        peft_config = {
            "peft_type": "VERA",
            "r": config.r,
            "target_modules": target if isinstance(target, str) else list(target),
            "projection_prng_key": config.projection_prng_key,
            "save_projection": False,
            "vera_dropout": config.vera_dropout,
            "d_initial": config.d_initial,
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "modules_to_save": None,
        }
        out = {f"{k.rpartition('.')[0]}.vera_{k.rpartition('.')[2]}": v for k, v in state.items()}
        return peft_config, out


@hookimpl
def register_adapter_types(register):
    register(Vera)
