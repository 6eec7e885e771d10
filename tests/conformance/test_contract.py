"""The plugin contract, second edition: a type's mistakes are named errors (type and site), the
pool key covers every dimension, and the optional hooks (derive, base-aware deltas, sizes with
the model, true virtual lengths) do what docs/plugins.md says."""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from adapterzoo import AdapterConfig, AdapterType, PluginError, hookimpl, plugins
from adapterzoo.plan import SlotWeights
from adapterzoo.sites import find_linear, linear_dims
from adapterzoo.testing.models import output, perturb, tiny_zoo


@contextmanager
def registered(*classes):
    name = "contract-test-" + "-".join(c.name for c in classes)
    plugin = types.SimpleNamespace(register_adapter_types=hookimpl(lambda register: [register(c) for c in classes]))
    plugins.pm.register(plugin, name=name)
    try:
        yield
    finally:
        plugins.pm.unregister(name=name)


@dataclass
class WidthConfig(AdapterConfig):
    width: int = 4


class Bottleneck(AdapterType):
    """A delta type whose bottleneck width is a literal dimension taken from the config (no named
    size): down (in, width), up (width, out). The pool key must still tell widths apart."""

    name = "width_test"
    Config = WidthConfig

    def sites(self, model, config):
        return find_linear(model, ["down_proj"])

    def tensors(self, model, site, module, config):
        fan_in, fan_out = linear_dims(module)
        return {"down": (fan_in, config.width), "up": (config.width, fan_out)}

    def delta(self, x, y, w, training):
        return w.matmul(w.matmul(x, "down"), "up")


def _subtype(name, **attrs):
    return type(name, (Bottleneck,), {"name": name, **attrs})


def test_a_config_dimension_outside_the_named_sizes_gets_its_own_pool():
    with registered(Bottleneck):
        zoo = tiny_zoo("llama")
        zoo.add_adapter("narrow", "width_test", width=2)
        zoo.add_adapter("wide", "width_test", width=6)
        for name in ("narrow", "wide"):
            perturb(zoo, name)
        assert zoo.get_adapter("narrow").pool_key != zoo.get_adapter("wide").pool_key
        ids = torch.randint(4, 100, (3, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            mixed = output(zoo(ids, None, ["narrow", "wide", None]))
            for row, name in enumerate(["narrow", "wide", None]):
                torch.testing.assert_close(
                    mixed[row], output(zoo(ids[row : row + 1], None, [name]))[0], atol=1e-5, rtol=1e-5
                )


@pytest.mark.parametrize(
    ("attrs", "named"),
    [
        ({"kind": "adapter"}, r"kind='adapter' is not a kind"),
        ({"kind": "prompt"}, r"'prompt' type must define virtual_tokens\(\), length\(\)"),
        ({"Config": dict}, r"Config must be a @dataclass"),
    ],
)
def test_a_broken_type_is_refused_at_registration_by_name(attrs, named):
    broken = _subtype("broken_test", **attrs)
    with registered(broken):
        with pytest.raises(PluginError, match=r"adapter type 'broken_test'.*" + named):
            plugins.adapter_types()


def _add(cls, **config):
    with registered(cls):
        zoo = tiny_zoo("llama")
        zoo.add_adapter("a", cls.name, **config)
        return zoo


def test_a_size_missing_from_sizes_names_the_type_the_site_and_the_size():
    cls = _subtype("missing_size_test", tensors=lambda self, model, site, module, config: {"down": (4, "r")})
    with pytest.raises(
        PluginError, match=r"'missing_size_test' at site 'model\.layers\.0\.mlp\.down_proj'.*'r'.*sizes"
    ):
        _add(cls)


def test_a_site_that_does_not_exist_is_named():
    cls = _subtype("no_site_test", sites=lambda self, model, config: ["model.layers.0.mlp.nope"])
    with pytest.raises(PluginError, match=r"'no_site_test'.*'model\.layers\.0\.mlp\.nope'.*not a module"):
        _add(cls)


def test_a_delta_of_the_wrong_shape_names_the_type_and_the_site():
    cls = _subtype("bad_delta_test", delta=lambda self, x, y, w, training: w.matmul(x, "down"))
    with pytest.raises(
        PluginError,
        match=r"'bad_delta_test' at site 'model\.layers\.0\.mlp\.down_proj': delta\(\) "
        r"returned shape \(1, 2, 4\) for a module output of shape \(1, 2, 32\)",
    ):
        _add(cls)


def test_a_delta_that_raises_names_the_type_and_the_site():
    def delta(self, x, y, w, training):
        return w["no_such_tensor"]

    with pytest.raises(PluginError, match=r"'raising_test' at site .*down_proj': delta\(\) raised KeyError"):
        _add(_subtype("raising_test", delta=delta))


def test_constants_that_are_not_numbers_are_named():
    cls = _subtype("string_constant_test", constants=lambda self, config: {"act": "relu"})
    with pytest.raises(PluginError, match=r"'string_constant_test': constants\(\) must map names to numbers.*variant"):
        _add(cls)


@dataclass
class PromptConfig(AdapterConfig):
    num_virtual_tokens: int = 3
    width: int | None = None  # None: the base's embedding width (sizes reads the model)


class EchoPrompt(AdapterType):
    """A prompt type that records each row's true virtual length as `virtual_tokens` sees it."""

    name = "echo_prompt_test"
    Config = PromptConfig
    kind = "prompt"
    seen: list = []

    def sites(self, model, config):
        return [next(p for p, m in model.named_modules() if m is model.get_input_embeddings())]

    def tensors(self, model, site, module, config):
        return {"embeds": ("P", "d")}

    def sizes(self, config, model):
        return {"P": config.num_virtual_tokens, "d": config.width or model.get_input_embeddings().embedding_dim}

    def length(self, config):
        return config.num_virtual_tokens

    def virtual_tokens(self, w):
        EchoPrompt.seen.append((w.lengths.tolist(), w.site, w.variant))
        return w["embeds"]


def test_prompt_types_are_told_each_rows_true_length_and_sizes_may_read_the_model():
    with registered(EchoPrompt):
        zoo = tiny_zoo("llama")
        zoo.add_adapter("three", "echo_prompt_test", num_virtual_tokens=3)
        zoo.add_adapter("four", "echo_prompt_test", num_virtual_tokens=4)  # same bucket (4), same pool
        assert zoo.get_adapter("four").sizes == {"P": 4, "d": 32}
        EchoPrompt.seen.clear()
        with torch.no_grad():
            zoo(torch.randint(4, 100, (3, 4)), None, ["three", "four", "three"])
        assert EchoPrompt.seen == [([3, 4, 3], "model.embed_tokens", "")]
        with pytest.raises(PluginError, match=r"virtual_tokens\(\) returned shape \(1, 4, 8\).*\(n, P, 32\)"):
            zoo.add_adapter("narrow", "echo_prompt_test", width=8)


class Gated(Bottleneck):
    """Base-aware, with a derived tensor: the delta is (x @ down @ up) * g per output column, where
    g = |W| column sums of the base (read from `w.module`) scaled by `gain`, derived once."""

    name = "gated_test"
    derive_calls = 0

    def tensors(self, model, site, module, config):
        return {**super().tensors(model, site, module, config), "gain": (linear_dims(module)[1],)}

    def derive(self, site, module, tensors, config):
        Gated.derive_calls += 1
        return {"gate": tensors["gain"] * module.weight.float().abs().sum(dim=1)}

    def delta(self, x, y, w, training):
        assert isinstance(w, SlotWeights) and w.module.weight.shape[0] == y.shape[-1] and w.site.endswith("down_proj")
        return super().delta(x, y, w, training) * w["gate"][:, None, :]

    def init(self, name, tensor, config, generator, module):
        tensor.normal_(0, 0.3, generator=generator)


def _gated_reference(zoo, name, ids):
    """The same math by hand, with a plain forward hook on the bare base."""
    adapter = zoo.get_adapter(name)
    hooks = []
    for site, ts in adapter.tensors.items():
        module = dict(zoo.model.named_modules())[site]
        gate = ts["gain"].detach() * module.weight.float().abs().sum(dim=1)
        d = (ts["down"].detach() @ ts["up"].detach()) * gate

        def hook(m, args, out, d=d):
            return out + args[0] @ d

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return zoo.model(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()


def test_derived_weights_are_computed_once_per_slot_placement_and_again_after_an_edit():
    with registered(Gated):
        zoo = tiny_zoo("llama")
        zoo.add_adapter("g", "gated_test", width=3, trainable=False)
        ids = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(1))
        Gated.derive_calls = 0
        with torch.no_grad():
            first = output(zoo(ids, None, ["g", "g"]))
            for _ in range(3):
                zoo(ids, None, ["g", None])
        assert Gated.derive_calls == 2  # once per site (2 layers), at placement only
        torch.testing.assert_close(first, _gated_reference(zoo, "g", ids), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            zoo.get_adapter("g").tensors["model.layers.0.mlp.down_proj"]["gain"].mul_(2)
            edited = output(zoo(ids, None, ["g", "g"]))
        assert Gated.derive_calls == 4
        torch.testing.assert_close(edited, _gated_reference(zoo, "g", ids), atol=1e-5, rtol=1e-5)


def test_derived_weights_are_recomputed_each_training_step_and_carry_the_gradient():
    with registered(Gated):
        zoo = tiny_zoo("llama")
        zoo.add_adapter("g", "gated_test", width=3)
        ids = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(2))
        Gated.derive_calls = 0
        for _ in range(2):
            out = output(zoo(ids, None, ["g", "g"]))
            out.pow(2).mean().backward()
        assert Gated.derive_calls == 4  # 2 sites x 2 steps
        gains = [ts["gain"].grad for ts in zoo.get_adapter("g").tensors.values()]
        assert all(g is not None and g.abs().sum() > 0 for g in gains)


def test_a_narrowed_peft_claim_wins_only_where_its_fields_match():
    """Two types read one peft_type; `peft_when` decides (as DoRA's use_dora=True does for LORA)."""
    from adapterzoo.formats.peft import type_for

    plain = _subtype("plain_claim_test", peft_types=("FAKE_TEST",))
    narrowed = _subtype("narrow_claim_test", peft_types=("FAKE_TEST",), peft_when={"flavour": "b"})
    with registered(plain, narrowed):
        zoo = tiny_zoo("llama")
        assert type_for(zoo, "FAKE_TEST", "x", {"flavour": "b"}).name == "narrow_claim_test"
        assert type_for(zoo, "FAKE_TEST", "x", {"flavour": "a"}).name == "plain_claim_test"
        assert type_for(zoo, "FAKE_TEST", "x", {}).name == "plain_claim_test"


@dataclass
class PrefixConfig(AdapterConfig):
    num_virtual_tokens: int = 2


class WrongPrefix(AdapterType):
    name = "wrong_prefix_test"
    Config = PrefixConfig
    kind = "prefix"

    def sites(self, model, config):
        return [p for p, _ in model.named_modules() if p.endswith("self_attn")]

    def tensors(self, model, site, module, config):
        return {"keys": ("P", 16)}

    def sizes(self, config):
        return {"P": config.num_virtual_tokens}

    def length(self, config):
        return config.num_virtual_tokens

    def prefix(self, w):
        return w["keys"], w["keys"]  # (n, P, 16): no heads dimension


def test_a_prefix_of_the_wrong_shape_names_the_type_and_the_site():
    with pytest.raises(
        PluginError,
        match=r"'wrong_prefix_test' at site 'model\.layers\.0\.self_attn': prefix\(\) "
        r"returned .*expected \(keys, values\), each \(n, 2, P, 8\)",
    ):
        _add(WrongPrefix)
