"""Fused decode-step deltas (adapterzoo/kernels): each type's kernel gives what its eager `delta`
gives, row by row, and without a compiler every delta runs eagerly, as before."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import DynamicCache

from adapterzoo import kernels, runtime
from adapterzoo.testing.models import output, perturb, tiny_zoo
from adapterzoo_houlsby.houlsby import Houlsby

KERNELS = {"lora": "lora_call", "houlsby": "bottleneck_call", "adapterbias": "adapterbias_call", "bitfit": "bias_call"}
CONFIGS = {
    "lora": {"r": 4, "init_lora_weights": False},
    "houlsby": {"bottleneck": 8},
    "adapterbias": {},
    "bitfit": {},
}


@pytest.fixture
def built():
    if kernels.library() is None:
        pytest.skip("no C++ compiler here: the kernels cannot be built (the eager path is tested everywhere)")


def _zoo(type_name: str, **config):
    zoo = tiny_zoo("llama", slots=4)
    for i in range(2):
        zoo.add_adapter(f"{type_name}-{i}", type_name, seed=i, trainable=False, **{**CONFIGS[type_name], **config})
        perturb(zoo, f"{type_name}-{i}", seed=i)  # every tensor non-zero: a kernel that skipped one would differ
    return zoo


def _decode(zoo, names: list, steps: int = 3) -> torch.Tensor:
    """Logits of `steps` decode steps of one kept plan (as the engine runs them)."""
    prompt = torch.randint(4, 100, (len(names), 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plan = zoo.plan(names, training=False)
        out = zoo.forward(prompt, None, names, cache=DynamicCache(config=zoo.model.config))
        cache, mask, logits = out.cache, out.attention_mask, []
        for step in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = zoo.forward(torch.full((len(names), 1), 5 + step), mask, plan=plan, cache=cache)
            cache = out.cache
            logits.append(output(out)[:, -1])
    return torch.stack(logits)


def _counted(monkeypatch, name: str) -> list:
    calls = []
    kernel = getattr(kernels, name)

    def counting(*args, **kwargs):
        out = kernel(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(kernels, name, counting)
    return calls


@pytest.mark.parametrize(
    "type_name, config",
    [("lora", {}), ("adapterbias", {}), ("bitfit", {})]
    + [("houlsby", {"activation": a}) for a in ("swish", "gelu", "relu", "tanh")],
)
def test_each_types_kernel_gives_its_eager_delta_row_by_row(built, monkeypatch, type_name, config):
    zoo = _zoo(type_name, **config)
    names = [f"{type_name}-0", None, f"{type_name}-1", f"{type_name}-0", None]  # two slots, rows without one
    calls = _counted(monkeypatch, KERNELS[type_name])
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "0")
    eager = _decode(zoo, names)
    assert calls == []
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "1")
    fused = _decode(zoo, names)
    assert calls and all(calls), "the kernel did not run"
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    assert not torch.equal(eager[:, 0], eager[:, 1]), "the adapter changes nothing: the test would prove nothing"


def test_an_extended_lora_runs_its_eager_delta(built, monkeypatch):
    zoo = _zoo("lora", bias="all", lora_bias=True)
    names = ["lora-0", None, "lora-1"]
    calls = _counted(monkeypatch, "lora")
    fused = _decode(zoo, names)
    assert calls == []  # its pools are extended: no kernel runs
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "0")
    torch.testing.assert_close(fused, _decode(zoo, names), atol=0, rtol=0)


def _reference(kind: str, y, x, tables, slot, dtype=torch.float64):
    """One row's delta from the definitions (the types' docstrings), in float64; in bfloat16 each op
    rounds its output as the types' eager deltas do (and the bfloat16 kernels, see fused.cpp's rnd)."""
    y, x = y.to(dtype), x.to(dtype)
    t = {k: v[slot].to(dtype) for k, v in tables.items()}
    if kind == "adapterbias":
        return (t["L"] @ y + t["b"]) * t["v"]
    if kind == "bias":
        return t["bias"]
    if kind == "lora":
        return t["scale"] * ((x @ t["A"]) @ t["B"])
    return torch.nn.functional.silu(y @ t["down"] + t["down_bias"]) @ t["up"] + t["up_bias"]


def _call(kind: str, x, y, tables, rows, slots):
    if kind == "adapterbias":
        return kernels.adapterbias(y, tables["v"], tables["L"], tables["b"], rows, slots)
    if kind == "bias":
        return kernels.bias(y, tables["bias"], rows, slots)
    if kind == "lora":
        return kernels.lora(x, y, tables["A"], tables["B"], tables["scale"], rows, slots)
    t = tables
    return kernels.bottleneck(y, t["down"], t["down_bias"], t["up"], t["up_bias"], "swish", rows, slots)


@pytest.mark.parametrize("kind", ["adapterbias", "lora", "bottleneck", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d, din, m", [(24, 20, 6), (72, 33, 16)])  # each loop's general and blocked forms
def test_kernels_match_their_definition_for_listed_rows_only(built, kind, dtype, d, din, m):
    g = torch.Generator().manual_seed(1)
    S = 4

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    shapes = {
        "adapterbias": {"v": (S, d), "L": (S, d), "b": (S, 1)},
        "bias": {"bias": (S, d)},
        "lora": {"A": (S, din, m), "B": (S, m, d), "scale": (S,)},
        "bottleneck": {"down": (S, d, m), "down_bias": (S, m), "up": (S, m, d), "up_bias": (S, d)},
    }[kind]
    tables = {k: rand(*s) for k, s in shapes.items()}
    for t in tables.values():
        t[0] = 0  # slot 0 holds zeros, as in a pool
    x, y = rand(6, 1, din), rand(6, 1, d)
    rows, slots = torch.tensor([0, 2, 3, 5]), torch.tensor([1, 3, 0, 1])
    for r, s in [(rows, slots), (None, torch.tensor([2, 1, 3, 0, 1, 2])), (rows, 2), (None, 3)]:
        out = _call(kind, x, y, tables, r, s)
        listed = dict(zip(range(6) if r is None else r.tolist(), [s] * 6 if isinstance(s, int) else s.tolist()))
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: rounded as the eager delta rounds
        for row in range(6):
            slot = listed.get(row, 0)
            if slot == 0:  # not listed, or slot 0: exactly as it was
                assert torch.equal(out[row], y[row]), f"row {row}"
                continue
            if dtype == torch.float32:
                want = y[row, 0].double() + _reference(kind, y[row, 0], x[row, 0], tables, slot)
            else:
                want = y[row, 0] + _reference(kind, y[row, 0], x[row, 0], tables, slot, dtype)
            torch.testing.assert_close(out[row, 0].double(), want.to(dtype).double(), atol=tol, rtol=tol)


def test_a_slot_outside_the_pool_raises_rather_than_reading_past_it(built):
    y, v = torch.zeros(2, 1, 8), torch.zeros(3, 8)
    with pytest.raises(IndexError, match="outside its pool"):
        kernels.adapterbias(y, v, v, torch.zeros(3, 1), None, torch.tensor([1, 3]))


def test_without_a_compiler_deltas_run_eagerly_with_one_warning(monkeypatch, caplog):
    zoo = _zoo("lora")
    names = ["lora-0", None, "lora-1"]
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "0")
    eager = _decode(zoo, names)
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "1")

    def no_compiler():
        raise RuntimeError("no C++ compiler found (tried $CXX, c++, g++)")

    monkeypatch.setattr(kernels, "_compiler", no_compiler)
    kernels.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="adapterzoo.kernels"):
            fallback = _decode(zoo, names)
        assert kernels.library() is None
        warnings = [r for r in caplog.records if "kernels unavailable" in r.getMessage()]
        assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
        torch.testing.assert_close(fallback, eager, atol=0, rtol=0)
    finally:
        kernels.reset()  # the next user loads the cached build again


def test_a_subclass_that_overrides_delta_keeps_its_own_math():
    class Shifted(Houlsby):  # as DoRA subclasses LoRA: its own delta, Houlsby's kernel would be wrong for it
        name = "houlsby_shifted"

        def delta(self, x, y, w, training):
            return super().delta(x, y, w, training) + 1

    assert runtime._fuses(Houlsby())
    assert not runtime._fuses(Shifted())


def test_what_the_kernels_cannot_take_goes_back_to_the_eager_delta(built):
    """None (the eager `delta` runs) rather than a read past a table: the C side trusts shapes."""
    y, x = torch.zeros(2, 1, 8), torch.zeros(2, 1, 6)
    A, B, scale = torch.zeros(3, 6, 4), torch.zeros(3, 4, 8), torch.zeros(3)
    slots = torch.tensor([1, 2])
    assert kernels.lora(x, y, A, B, scale, None, slots) is not None
    assert kernels.lora(x, y, A, torch.zeros(3, 4, 9), scale, None, slots) is None  # B's width is not y's
    assert kernels.lora(torch.zeros(2, 1, 7), y, A, B, scale, None, slots) is None  # x's width is not A's
    assert kernels.lora(x, y, A, B, scale, None, slots.int()) is None  # int32 slots
    assert kernels.lora(x, y, A, B, scale, None, torch.tensor([1, 2, 1])) is None  # a slot too many
    assert kernels.lora(x, y.double(), A, B, scale, None, slots) is None  # dtypes differ
    assert (
        kernels.bottleneck(
            y, torch.zeros(3, 8, 4), torch.zeros(3, 4), torch.zeros(3, 4, 8), torch.zeros(3, 8), "softsign", None, slots
        )
        is None
    )  # an activation the kernel lacks


@pytest.mark.parametrize("kind", ["adapterbias", "lora", "bottleneck", "bias"])
@pytest.mark.parametrize("row", [2, 1000, -1])
def test_a_row_outside_the_batch_is_refused_before_the_c_side_writes_it(built, kind, row):
    # the eager path's index_select raises for such a row (a stale plan's); the kernel wrote past `out`
    S, d, din, m = 3, 8, 6, 4
    tables = {
        "adapterbias": {"v": torch.ones(S, d), "L": torch.ones(S, d), "b": torch.ones(S, 1)},
        "bias": {"bias": torch.ones(S, d)},
        "lora": {"A": torch.ones(S, din, m), "B": torch.ones(S, m, d), "scale": torch.ones(S)},
        "bottleneck": {"down": torch.ones(S, d, m), "down_bias": torch.ones(S, m), "up": torch.ones(S, m, d),
                       "up_bias": torch.ones(S, d)},
    }[kind]  # fmt: skip
    x, y = torch.ones(2, 1, din), torch.ones(2, 1, d)
    with pytest.raises(IndexError, match="outside the batch"):
        _call(kind, x, y, tables, torch.tensor([0, row]), torch.tensor([1, 2]))


def test_a_kernel_given_more_than_one_token_a_row_leaves_it_to_the_eager_delta(built):
    # the C side reads one token a row: (B, T > 1, d) gave rows of uninitialized memory
    y, v = torch.randn(2, 3, 8), torch.ones(3, 8)
    assert kernels.adapterbias(y, v, v, torch.ones(3, 1), None, torch.tensor([1, 2])) is None
    A, B = torch.ones(3, 6, 4), torch.ones(3, 4, 8)
    assert kernels.lora(torch.ones(2, 1, 6), y, A, B, torch.ones(3), None, torch.tensor([1, 2])) is None


def test_the_build_goes_under_torch_extensions_dir_when_it_is_set(built, monkeypatch, tmp_path):
    # a read-only or shared home sets TORCH_EXTENSIONS_DIR, as torch's own extension builds honour it
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    kernels.reset()
    try:
        assert kernels.library() is not None
        assert list((tmp_path / "adapterzoo_kernels").glob("fused_*"))
    finally:
        kernels.reset()


def test_a_kernel_called_before_the_library_is_loaded_loads_it(built):
    kernels.reset()
    y, v = torch.ones(2, 1, 8), torch.ones(3, 8)
    out = kernels.adapterbias(y, v, v, torch.ones(3, 1), None, torch.tensor([1, 2]))
    assert out is not None and torch.equal(out, torch.full_like(y, 10.0))


@pytest.mark.parametrize("value", ["0", "false", "False", "off", "no", " 0 "])
def test_every_usual_spelling_of_off_turns_the_kernels_off(monkeypatch, value):
    monkeypatch.setenv("ADAPTERZOO_KERNELS", value)
    assert not kernels.enabled()


@pytest.mark.parametrize("value", ["1", "true", "on"])
def test_the_kernels_stay_on_unless_switched_off(monkeypatch, value):
    monkeypatch.setenv("ADAPTERZOO_KERNELS", value)
    assert kernels.enabled()


def test_a_sites_pools_run_as_one_kernel_run_with_their_calls_checked_once_per_plan(built, monkeypatch):
    # a kept decode plan binds each site's kernel calls at its first step and reuses them; every row
    # equals the eager run, and a row at no adapter is left as the base gives it
    zoo = tiny_zoo("llama", slots=4)
    for t in ("lora", "bitfit", "houlsby", "adapterbias"):
        for i in range(2):
            zoo.add_adapter(f"{t}-{i}", t, seed=i, trainable=False, **CONFIGS[t])
            perturb(zoo, f"{t}-{i}", seed=i)
    names = ["lora-0", "bitfit-1", None, "houlsby-0", "adapterbias-1", "lora-1", "bitfit-0", "houlsby-1"]
    bound = _counted(monkeypatch, "bias_call")
    runs = _counted(monkeypatch, "run")
    fused = _decode(zoo, names, steps=3)
    sites = len(zoo.find_adapter("bitfit-0").tensors)
    assert bound == [True] * sites  # bound at the first decode step only, then kept with the plan
    assert len(runs) == 3 * sites  # one run a site and step: the site's pools together
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "0")
    torch.testing.assert_close(fused, _decode(zoo, names, steps=3), atol=1e-5, rtol=1e-5)


def test_a_bound_call_refuses_a_y_it_was_not_checked_for(built):
    # a kept call must never run on another shape or dtype (the C side trusts the shapes it was given)
    b, slots = torch.ones(3, 8), torch.tensor([1, 2])
    call = kernels.bias_call(torch.zeros(2, 1, 8), b, None, slots)
    assert kernels.run((call,), torch.zeros(2, 1, 8), torch.zeros(2, 1, 8)) is not None
    assert kernels.run((call,), torch.zeros(3, 1, 8), torch.zeros(3, 1, 8)) is None  # another batch
    assert kernels.run((call,), torch.zeros(2, 1, 8), torch.zeros(2, 1, 8, dtype=torch.bfloat16)) is None
    assert kernels.run((call,), torch.zeros(2, 1, 8), torch.zeros(2, 1, 16)[..., ::2]) is None  # strided


def test_a_modules_fresh_output_takes_the_deltas_in_place_and_equals_the_eager_path(built, monkeypatch):
    zoo = _zoo("bitfit")
    names = ["bitfit-0", None, "bitfit-1"]
    runs = []
    run = kernels.run

    def recording(calls, x, y, **kw):
        out = run(calls, x, y, **kw)
        runs.append(out is y)
        return out

    monkeypatch.setattr(kernels, "run", recording)
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "0")
    eager = _decode(zoo, names)
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "1")
    fused = _decode(zoo, names)
    assert runs and all(runs)  # every site's output here is a linear's or a norm's own
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["a tensor it keeps", "a view of a tensor it keeps", "its input"])
def test_an_output_that_something_else_holds_is_never_written_by_the_kernels(built, monkeypatch, kind):
    # a module that hands back a tensor it keeps, or its input (as an identity does): adding the rows'
    # deltas into it would change what the module or its caller holds
    zoo = _zoo("bitfit")
    path = "model.layers.0.self_attn.o_proj"  # (hidden -> hidden: an identity fits here)
    module = zoo.model.get_submodule(path)
    held = []

    def forward(x):
        y = x if kind == "its input" else torch.nn.functional.linear(x, module.weight)
        kept = y.reshape(-1, y.shape[-1]) if kind == "a view of a tensor it keeps" else y
        held.append((kept, kept.clone()))  # the tensor, and what it held when handed back
        return kept.view(y.shape)

    runtime.set_instance_forward(module, forward)
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "0")
    eager = _decode(zoo, ["bitfit-0", "bitfit-1"])
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "1")
    held.clear()
    fused = _decode(zoo, ["bitfit-0", "bitfit-1"])
    for tensor, handed_back in held:
        assert torch.equal(tensor, handed_back)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)
