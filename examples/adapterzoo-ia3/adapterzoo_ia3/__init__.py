"""IA3 for adapterzoo: a third-party plugin in one folder (see docs/plugins.md)."""

from dataclasses import dataclass

from adapterzoo import AdapterConfig, AdapterType, hookimpl, require
from adapterzoo.sites import find_linear, linear_dims


@dataclass
class IA3Config(AdapterConfig):
    target_modules: list[str] | str | None = None  # None: keys, values and the FFN's up projection

    def validate(self) -> None:
        require(
            self.target_modules is None or isinstance(self.target_modules, (str, list)),
            f"target_modules must be a list of names or a regex, got {self.target_modules!r}",
        )


DEFAULT_TARGETS = {
    "llama": ["k_proj", "v_proj", "up_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["key", "value", "intermediate.dense"],
}


class IA3(AdapterType):
    """Liu et al. (2022), "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
    In-Context Learning", eq. in Section 3.3: y = l * (W x), a learned vector l rescaling the
    keys, values and FFN activations. Stored as l - 1 (zero = identity), so the delta is
    y * (l - 1) and the empty slot 0 means "no adapter"."""

    name = "ia3"
    Config = IA3Config
    kind = "delta"

    def sites(self, model, config):
        targets = config.target_modules or DEFAULT_TARGETS[model.config.model_type]
        return find_linear(model, targets)

    def tensors(self, model, site, module, config):
        return {"scale_minus_one": (linear_dims(module)[1],)}

    def delta(self, x, y, w, training):
        return y * w["scale_minus_one"][:, None, :]  # (n, T, out)


@hookimpl
def register_adapter_types(register):
    register(IA3)
