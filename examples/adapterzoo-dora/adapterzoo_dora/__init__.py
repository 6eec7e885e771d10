"""DoRA for adapterzoo: Liu et al. (2024), "DoRA: Weight-Decomposed Low-Rank Adaptation".

Eq. (5): W' = m * (W + s B A) / ||W + s B A||_c, a learned magnitude m (one per output column)
times the direction of the LoRA-updated weight. PEFT's form of the output, which this type
reproduces exactly (peft/tuners/lora/dora.py, PEFT 0.21), with g = m / ||W + s B A||_c:

    y' = y + (g - 1) * (y - b) + g * s * (x A) B          (b: the base layer's bias)

It uses two hooks of the plugin contract that plain LoRA does not need:

- `derive`: g depends only on the adapter and the base weight, so it is computed once, when the
  adapter is placed in a slot (the norm reads the base's weight from the site's `module`), and a
  decode step costs what LoRA's does plus one multiply. While training, g is derived again at
  every step; the norm is detached from the gradient, as the paper (section 4.3) and PEFT do.
- base-aware `delta`: `w.module` gives the base layer's bias (and, with dropout while training,
  its weight: PEFT then recomputes the base output on the dropped-out input).

Everything else (sites, A and B, ranks and patterns, init, PEFT's key names) is LoRA's: the type
subclasses the built-in `lora` type. It reads PEFT LORA folders with `use_dora=True`, a claim
declared by `peft_when` (adapterzoo.types.PeftMapping); the built-in LoRA reader refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterzoo import hookimpl, require
from adapterzoo.errors import UnsupportedFormatError
from adapterzoo.sites import linear_weight
from adapterzoo_lora import peft as lora_peft
from adapterzoo_lora.lora import Lora, LoraConfig

MAGNITUDE = "lora_magnitude_vector"  # PEFT's key for m, after the module path


@dataclass
class DoraConfig(LoraConfig):
    def validate(self) -> None:
        super().validate()
        require(
            self.bias == "none" and not self.lora_bias,
            f"DoRA adapters train no biases (bias={self.bias!r}, lora_bias={self.lora_bias!r}); "
            "use bias='none' and lora_bias=False, or the lora type for bias training",
        )
        # LoRA's extras that replace parts of the base: every DoRA site is a plain A, B and magnitude
        for name in ("modules_to_save", "trainable_token_indices"):
            require(
                not getattr(self, name, None),
                f"DoRA adapters do not support {name}={getattr(self, name)!r}; leave it empty, or use the lora type",
            )


def column_norms(module, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """||W + s (A B)||_c per output column, (out,), in float32: W in the x @ W layout (in, out)."""
    weight = linear_weight(module).detach().float()
    return torch.linalg.norm(weight + scale * (A.float() @ B.float()), dim=0)


class Dora(Lora):
    name = "dora"
    Config = DoraConfig
    default_lr = 2e-3

    # PEFT: a LORA folder whose config says use_dora=True is ours (the lora type refuses it)
    peft_types = ("LORA",)
    peft_when = {"use_dora": True}

    @classmethod
    def conformance_configs(cls):
        return [{}, {"r": 3, "lora_alpha": 6, "use_rslora": True, "target_modules": "all-linear"}]

    def tensors(self, model, site, module, config):
        shapes = super().tensors(model, site, module, config)
        if "B" in shapes:
            shapes["magnitude"] = (shapes["B"][1],)  # m: one per output column
        return shapes

    def init(self, name, tensor, config, generator, module):
        if name == "magnitude":
            tensor.fill_(1.0)  # set from the base in init_from_base, once A and B are drawn
        else:
            super().init(name, tensor, config, generator, module)

    def init_from_base(self, model, config, tensors, generator):
        """m starts at ||W + s B A||_c, so a new adapter's W' is W + s B A (W itself when B = 0), as in PEFT."""
        super().init_from_base(model, config, tensors, generator)
        modules = dict(model.named_modules())
        for site, ts in tensors.items():
            if "magnitude" in ts:
                ts["magnitude"].copy_(column_norms(modules[site], ts["A"], ts["B"], config.scale))

    def derive(self, site, module, tensors, config):
        """Per output column, once per slot placement: g - 1, g * s, and -(g - 1) * b, so that a
        forward is two fused multiply-adds on top of LoRA's two matmuls (see `delta`)."""
        norms = column_norms(module, tensors["A"], tensors["B"], config.scale).detach()
        gain = tensors["magnitude"] / norms  # g = m / ||W + s B A||_c, (out,)
        bias = getattr(module, "bias", None)
        shift = -(gain - 1) * bias.detach().float() if bias is not None else torch.zeros_like(gain)
        return {"gain_minus_one": gain - 1, "gain_scaled": gain * config.scale, "shift": shift}

    def delta(self, x, y, w, training):
        lora_in = x
        dropout = training and bool((w["dropout"] > 0).any())
        if dropout:
            keep = 1 - w["dropout"][:, None, None]
            lora_in = x * (torch.rand_like(x) < keep) / keep
        lora = w.matmul(w.matmul(lora_in, "A"), "B")  # (n, T, out): (x A[slot]) B[slot] per row
        g1, gs = w["gain_minus_one"][:, None, :], w["gain_scaled"][:, None, :]  # (n or 1, 1, out)
        if dropout:  # PEFT: the dropped-out input goes through the base weight again, without the bias
            base = lora_in @ linear_weight(w.module).to(x.dtype)
            return torch.addcmul(g1 * base, gs, lora)
        # (g - 1) (y - b) + g s lora, with -(g - 1) b derived: two fused multiply-adds
        return torch.addcmul(torch.addcmul(w["shift"][:, None, :], g1, y), gs, lora)

    def from_peft(self, model, peft_config, state):
        if peft_config.get("use_dora") is not True:
            raise UnsupportedFormatError("PEFT LoRA adapter without use_dora=True: load it as a lora adapter")
        magnitudes = {k: v for k, v in state.items() if k.endswith("." + MAGNITUDE)}
        rest = {k: v for k, v in state.items() if k not in magnitudes}
        lacking = sorted(
            {k.rsplit(".lora_A", 1)[0] for k in rest if ".lora_A" in k} - {k[: -len(MAGNITUDE) - 1] for k in magnitudes}
        )
        if lacking:
            raise UnsupportedFormatError(
                f"PEFT LoRA adapter with use_dora=True but no {MAGNITUDE} at {len(lacking)} module(s) (e.g. "
                f"{lacking[0]}): a DoRA adapter without its magnitudes is not supported; save it again with PEFT, "
                "or set use_dora to false if it is a plain LoRA adapter"
            )
        config, flat = lora_peft.from_peft(model, {k: v for k, v in peft_config.items() if k != "use_dora"}, rest)
        for key, value in magnitudes.items():
            flat[key[: -len(MAGNITUDE)] + "magnitude"] = value
        return config, flat

    def to_peft(self, model, config, state):
        magnitudes = {k: v for k, v in state.items() if k.endswith(".magnitude")}
        rest = {k: v for k, v in state.items() if k not in magnitudes}
        peft_config, out = lora_peft.to_peft(model, config, rest)
        peft_config["use_dora"] = True
        for key, value in magnitudes.items():
            out[key[: -len("magnitude")] + MAGNITUDE] = value
        return peft_config, out

    def merge(self, module, tensors, config, sign=1.0):
        """W' = g * (W + s A B) per column (then the base's bias as it was); not undoable by sign=-1."""
        if sign != 1.0:
            raise NotImplementedError("a merged DoRA adapter cannot be unmerged; merge into a copy of the base")
        gain = tensors["magnitude"] / column_norms(module, tensors["A"], tensors["B"], config.scale)
        with torch.no_grad():
            weight = linear_weight(module)  # a view: writing it writes the module's weight
            merged = (weight.float() + config.scale * tensors["A"] @ tensors["B"]) * gain
            weight.copy_(merged.to(weight.dtype))


@hookimpl
def register_adapter_types(register):
    register(Dora)
