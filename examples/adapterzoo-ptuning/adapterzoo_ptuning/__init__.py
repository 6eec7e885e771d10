"""P-tuning for adapterzoo: Liu et al. (2021), "GPT Understands, Too", as PEFT's PromptEncoder
(peft/tuners/p_tuning, PEFT 0.21): P trainable embeddings go through an encoder, and its output
is put before the input embeddings as P virtual tokens.

- MLP: Linear(d, H), ReLU, Linear(H, H), ReLU, Linear(H, d).
- LSTM: a bidirectional LSTM (d -> H per direction, `encoder_num_layers` layers), then
  Linear(2H, 2H), ReLU, Linear(2H, d).
- `inference_mode=True`: no encoder; the embeddings are the virtual tokens. This is what PEFT
  saves (`prompt_embeddings`, the encoder's output), so a PEFT P_TUNING folder loads as this.

The encoder's output depends only on the adapter, so it is the plugin contract's `derive`: run
once when the adapter is placed in a slot, never per forward (every step while training, with
gradients reaching the encoder). Pools pad P to a bucket; the LSTM reads the prompt backwards,
where padding would change every output, so `derive` runs the encoder on the adapter's true P
(from its config) and pads only the result. H defaults to the base's width: `sizes(config, model)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adapterzoo import AdapterConfig, AdapterType, hookimpl, require
from adapterzoo.errors import UnsupportedFormatError
from adapterzoo.formats.peft import prompt_embeddings
from adapterzoo.sites import hidden_size

ENCODERS = ("MLP", "LSTM")
PEFT_KNOWN = {
    "num_virtual_tokens",
    "token_dim",
    "num_transformer_submodules",
    "num_attention_heads",
    "num_layers",
    "encoder_reparameterization_type",
    "encoder_hidden_size",
    "encoder_num_layers",
    "encoder_dropout",
}


@dataclass
class PTuningConfig(AdapterConfig):
    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"  # "MLP" or "LSTM", as PEFT
    encoder_hidden_size: int | None = None  # None: the base's hidden size (PEFT's default is token_dim too)
    encoder_num_layers: int = 2  # LSTM layers (PEFT ignores it for the MLP, which has 3 layers)
    encoder_dropout: float = 0.0  # between LSTM layers, while training
    inference_mode: bool = False  # True: no encoder, the embeddings are the virtual tokens (PEFT's saved form)

    def validate(self) -> None:
        require(
            isinstance(self.num_virtual_tokens, int)
            and not isinstance(self.num_virtual_tokens, bool)
            and self.num_virtual_tokens >= 1,
            f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}",
        )
        if isinstance(self.encoder_reparameterization_type, str):
            self.encoder_reparameterization_type = self.encoder_reparameterization_type.upper()
        require(
            self.encoder_reparameterization_type in ENCODERS,
            f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {self.encoder_reparameterization_type!r}",
        )
        h = self.encoder_hidden_size
        require(
            h is None or (isinstance(h, int) and not isinstance(h, bool) and h >= 1),
            f"encoder_hidden_size must be a positive integer (or null: the base's width), got {h!r}",
        )
        n = self.encoder_num_layers
        require(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"encoder_num_layers must be >= 1, got {n!r}"
        )
        require(
            isinstance(self.encoder_dropout, (int, float)) and 0 <= self.encoder_dropout < 1,
            f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}",
        )
        require(
            isinstance(self.inference_mode, bool), f"inference_mode must be true or false, got {self.inference_mode!r}"
        )


def _mlp_shapes(d: int, h: int, prefix: str = "mlp_head") -> dict[str, tuple]:
    return {
        f"{prefix}_0_weight": (h, d),
        f"{prefix}_0_bias": (h,),
        f"{prefix}_2_weight": (h, h),
        f"{prefix}_2_bias": (h,),
        f"{prefix}_4_weight": (d, h),
        f"{prefix}_4_bias": (d,),
    }


def _lstm_shapes(d: int, h: int, layers: int) -> dict[str, tuple]:
    shapes = {}
    for k in range(layers):
        fan_in = d if k == 0 else 2 * h
        for suffix in ("", "_reverse"):
            shapes[f"lstm_head_weight_ih_l{k}{suffix}"] = (4 * h, fan_in)
            shapes[f"lstm_head_weight_hh_l{k}{suffix}"] = (4 * h, h)
            shapes[f"lstm_head_bias_ih_l{k}{suffix}"] = (4 * h,)
            shapes[f"lstm_head_bias_hh_l{k}{suffix}"] = (4 * h,)
    shapes.update(
        {
            "mlp_head_0_weight": (2 * h, 2 * h),
            "mlp_head_0_bias": (2 * h,),
            "mlp_head_2_weight": (d, 2 * h),
            "mlp_head_2_bias": (d,),
        }
    )
    return shapes


class PTuning(AdapterType):
    name = "p_tuning"
    Config = PTuningConfig
    kind = "prompt"
    default_lr = 1e-2

    @classmethod
    def conformance_configs(cls):
        return [
            {"num_virtual_tokens": 4},
            {"num_virtual_tokens": 3, "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8},
            {"num_virtual_tokens": 2, "inference_mode": True},
        ]

    def sites(self, model, config):
        embeddings = model.get_input_embeddings()
        return [next(p for p, m in model.named_modules() if m is embeddings)]

    def sizes(self, config, model):
        return {"P": config.num_virtual_tokens}

    def length(self, config):
        return config.num_virtual_tokens

    def variant(self, config):
        return "none" if config.inference_mode else config.encoder_reparameterization_type

    def tensors(self, model, site, module, config):
        # the encoder's widths are literal dimensions (never padded: that would change an LSTM's
        # gates); adapters of other widths get other pools, as the pool key covers every dimension
        d = hidden_size(model)
        h = config.encoder_hidden_size or d
        shapes = {"embedding": ("P", d)}
        if config.inference_mode:
            return shapes
        if config.encoder_reparameterization_type == "MLP":
            return {**shapes, **_mlp_shapes(d, h)}
        return {**shapes, **_lstm_shapes(d, h, config.encoder_num_layers)}

    def init(self, name, tensor, config, generator, module):
        """PyTorch's defaults, as PEFT gets them: nn.Embedding N(0, 1); nn.Linear and nn.LSTM
        U(-1/sqrt(k), 1/sqrt(k)) with k the layer's fan-in (the LSTM's hidden size)."""
        if name == "embedding":
            tensor.normal_(0, 1, generator=generator)
            return
        if name.startswith("lstm_head"):
            fan_in = config.encoder_hidden_size or module.weight.shape[1]
        elif name.endswith("_weight"):
            fan_in = tensor.shape[1]
        else:  # a Linear's bias: the fan-in of its weight, i.e. the previous layer's width
            fan_in = self._bias_fan_in(name, config, module.weight.shape[1])
        bound = 1 / math.sqrt(fan_in)
        tensor.uniform_(-bound, bound, generator=generator)

    @staticmethod
    def _bias_fan_in(name: str, config: PTuningConfig, d: int) -> int:
        h = config.encoder_hidden_size or d
        if config.encoder_reparameterization_type == "LSTM":
            return 2 * h
        return d if name == "mlp_head_0_bias" else h

    def derive(self, site, module, tensors, config):
        """The virtual tokens: the encoder over the first P (true) embeddings, zero-padded to the pool's P."""
        p = config.num_virtual_tokens
        embeds = tensors["embedding"]
        if config.inference_mode:
            return {"prompt": embeds}
        out = encode(tensors, embeds[:p], config, training=torch.is_grad_enabled())
        return {"prompt": torch.nn.functional.pad(out, (0, 0, 0, embeds.shape[0] - p))}

    def virtual_tokens(self, w):
        return w["prompt"]  # (n, P, d)

    # PEFT's P_TUNING folders hold only the encoder's output (`prompt_embeddings`): inference_mode here
    peft_types = ("P_TUNING",)

    def from_peft(self, model, peft_config, state):
        what = "PEFT P-tuning adapter"
        emb, p = prompt_embeddings(peft_config, state, what, PEFT_KNOWN)
        d = hidden_size(model)
        if tuple(emb.shape) != (p, d):
            raise UnsupportedFormatError(
                f"{what}: prompt_embeddings has shape {tuple(emb.shape)}, but this base embeds "
                f"tokens in {d} dimensions: expected ({p}, {d}); it was made for another base"
            )
        config = {
            "num_virtual_tokens": p,
            "inference_mode": True,
            "encoder_reparameterization_type": str(peft_config.get("encoder_reparameterization_type") or "MLP"),
        }
        (site,) = self.sites(model, None)
        return config, {f"{site}.embedding": emb}

    def to_peft(self, model, config, state):
        """PEFT saves the encoder's output, not the encoder: so do we (PEFT loads it for inference)."""
        (site,) = self.sites(model, config)
        tensors = {k.rpartition(".")[2]: v for k, v in state.items()}
        with torch.no_grad():
            prompt = self.derive(site, None, {**tensors, "embedding": tensors["embedding"]}, config)["prompt"]
        mc = model.config
        peft_config = {
            "peft_type": "P_TUNING",
            "num_virtual_tokens": config.num_virtual_tokens,
            "token_dim": hidden_size(model),
            "num_transformer_submodules": 1,
            "num_attention_heads": getattr(mc, "num_attention_heads", None) or getattr(mc, "n_head", None),
            "num_layers": getattr(mc, "num_hidden_layers", None) or getattr(mc, "n_layer", None),
            "encoder_reparameterization_type": config.encoder_reparameterization_type,
            "encoder_hidden_size": config.encoder_hidden_size or hidden_size(model),
            "encoder_num_layers": config.encoder_num_layers,
            "encoder_dropout": config.encoder_dropout,
            "modules_to_save": None,
        }
        return peft_config, {"prompt_embeddings": prompt[: config.num_virtual_tokens].contiguous()}


def encode(
    tensors: dict[str, torch.Tensor], embeds: torch.Tensor, config: PTuningConfig, training: bool
) -> torch.Tensor:
    """PEFT's PromptEncoder.forward on (P, d) embeddings with these weights: (P, d)."""
    F = torch.nn.functional
    x = embeds[None]  # (1, P, d): PEFT runs one prompt (batch_first)
    if config.encoder_reparameterization_type == "LSTM":
        d, h = embeds.shape[1], tensors["lstm_head_weight_hh_l0"].shape[1]
        lstm = nn.LSTM(
            d,
            h,
            num_layers=config.encoder_num_layers,
            dropout=config.encoder_dropout,
            bidirectional=True,
            batch_first=True,
            device="meta",
        )
        lstm.train(training)
        params = {k[len("lstm_head_") :]: v for k, v in tensors.items() if k.startswith("lstm_head_")}
        x = torch.func.functional_call(lstm, params, (x,))[0]
        x = F.relu(F.linear(x, tensors["mlp_head_0_weight"], tensors["mlp_head_0_bias"]))
        return F.linear(x, tensors["mlp_head_2_weight"], tensors["mlp_head_2_bias"])[0]
    for i in (0, 2):
        x = F.relu(F.linear(x, tensors[f"mlp_head_{i}_weight"], tensors[f"mlp_head_{i}_bias"]))
    return F.linear(x, tensors["mlp_head_4_weight"], tensors["mlp_head_4_bias"])[0]


def state_from_peft_encoder(prompt_encoder_state: dict[str, torch.Tensor], site: str) -> dict[str, torch.Tensor]:
    """A PEFT `PromptEncoder`'s `state_dict()` (embedding, mlp_head, lstm_head: what a PEFT training
    checkpoint of the whole model holds, unlike its saved adapter) as this type's flat state, for
    `adapter_from_state` or copying into a zoo adapter's tensors."""
    out = {}
    for key, tensor in prompt_encoder_state.items():
        name = "embedding" if key == "embedding.weight" else key.replace(".", "_")
        out[f"{site}.{name}"] = tensor
    return out


@hookimpl
def register_adapter_types(register):
    register(PTuning)
