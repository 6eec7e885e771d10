"""Attack review of the fused-kernel change: kept plans whose slots or adapters change, mixed
pools at one site, bfloat16; each compared with the eager path (ADAPTERZOO_KERNELS=0)."""

from __future__ import annotations

import pytest
import torch

from adapterzoo import kernels
from adapterzoo.testing.models import output, perturb, tiny_zoo

CONFIGS = {
    "lora": ("lora", {"r": 4, "init_lora_weights": False}),
    "lora8": ("lora", {"r": 8, "init_lora_weights": False}),
    "houlsby": ("houlsby", {"bottleneck": 8}),
    "gelu": ("houlsby", {"bottleneck": 8, "activation": "gelu"}),
    "adapterbias": ("adapterbias", {}),
    "bitfit": ("bitfit", {}),
    "lorabias": ("lora", {"r": 4, "init_lora_weights": False, "bias": "all"}),
}


@pytest.fixture
def built():
    if kernels.library() is None:
        pytest.skip("no C++ compiler")


def _zoo(kinds, copies=3, slots=4, **kw):
    zoo = tiny_zoo("llama", slots=slots, **kw)
    for k in kinds:
        type_name, config = CONFIGS[k]
        for i in range(copies):
            zoo.add_adapter(f"{k}-{i}", type_name, seed=i, trainable=False, **config)
            perturb(zoo, f"{k}-{i}", seed=10 * i + len(k))
    return zoo


def _run(zoo, names, steps=4, between=None, plan_rows=None, mode=torch.inference_mode):
    prompt = torch.randint(4, 100, (len(names), 5), generator=torch.Generator().manual_seed(0))
    with mode():
        out = zoo.forward(prompt, None, names, cache=zoo.new_cache())
        plan = zoo.plan(names, training=False)
        cache, mask, logits = out.cache, out.attention_mask, []
        for step in range(steps):
            if between is not None:
                between(zoo, step)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = zoo.forward(torch.full((len(names), 1), 5 + step), mask, plan=plan, cache=cache)
            cache = out.cache
            logits.append(output(out)[:, -1].float())
    return torch.stack(logits)


def _both(monkeypatch, make, names, **kw):
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "0")
    eager = _run(make(), names, **kw)
    monkeypatch.setenv("ADAPTERZOO_KERNELS", "1")
    fused = _run(make(), names, **kw)
    return eager, fused


MIXED = ["lora", "houlsby", "bitfit", "adapterbias"]


def test_mid_decode_eviction_of_every_type(built, monkeypatch):
    names = ["lora-0", "houlsby-0", None, "bitfit-0", "adapterbias-0", "lora-1"]

    def evict(zoo, step):
        if step == 1:
            zoo.plan(["lora-2", "houlsby-1", "houlsby-2", "bitfit-1", "bitfit-2", "adapterbias-1", "adapterbias-2"])

    make = lambda: _zoo(MIXED, slots=2)  # noqa: E731
    eager, fused = _both(monkeypatch, make, names, between=evict)
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)
    ref = _run(make(), names)
    torch.testing.assert_close(fused, ref, atol=1e-4, rtol=1e-4)


def test_mid_decode_in_place_edit(built, monkeypatch):
    names = ["lora-0", "houlsby-0", None, "bitfit-0", "adapterbias-0", "lora-1"]

    def edit(zoo, step):
        if step == 2:
            for n in ("lora-0", "houlsby-0", "bitfit-0", "adapterbias-0"):
                with torch.no_grad():
                    for t in zoo.get_adapter(n).parameters():
                        t.copy_(t * 1.5 + 0.01)

    make = lambda: _zoo(MIXED)  # noqa: E731
    eager, fused = _both(monkeypatch, make, names, between=edit)
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(eager[3], _run(make(), names)[3], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_types_and_buckets_and_extended(built, monkeypatch, dtype):
    kinds = ["lora", "lora8", "houlsby", "gelu", "adapterbias", "bitfit", "lorabias"]
    names = [
        None,
        "lora-0",
        "lora8-1",
        "houlsby-0",
        "gelu-1",
        "adapterbias-2",
        "bitfit-0",
        "lorabias-0",
        "lora-1",
        "lora8-0",
    ]
    make = lambda: _zoo(kinds, copies=3, dtype=dtype)  # noqa: E731
    eager, fused = _both(monkeypatch, make, names)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(fused, eager, atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", ["lora", "lora8", "houlsby", "gelu", "adapterbias", "bitfit"])
def test_pairs_of_pools_without_dora(built, monkeypatch, kind):
    names = [f"{kind}-0", None, "lora-1", "bitfit-2", f"{kind}-1"]
    make = lambda: _zoo(sorted({kind, "lora", "bitfit"}))  # noqa: E731
    eager, fused = _both(monkeypatch, make, names)
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)


def test_engine_with_more_adapters_than_slots_and_joins(built):
    from adapterzoo.serve import Engine
    from tests.serve.conftest import TYPE_NAMES, make_adapters, submit_in_two_waves

    zoo = tiny_zoo("llama", slots=2)
    names = [f"{t}{k}" for k in range(3) for t in TYPE_NAMES]
    make_adapters(zoo, None, names)
    prompts = ["abc ->", "hello", "x", "the quick brown", "1 2 3", "zz top", "q"]
    jobs = [(prompts[i % len(prompts)], [*names, None][(i * 7) % (len(names) + 1)], 2 + (i * 5) % 7) for i in range(30)]
    with Engine(zoo, max_batch=5) as engine:
        results = submit_in_two_waves(engine, jobs, 4)
    for (p, a, n), done in zip(jobs, results):
        assert done.error is None, done.error
        assert done.text == zoo.generate([p], [a], max_new_tokens=n)[0], (p, a)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_one_token_rows_of_other_families(built, monkeypatch, family):
    def make():
        zoo = tiny_zoo(family, slots=4)
        for k in MIXED + ["gelu"]:
            type_name, config = CONFIGS[k]
            for i in range(2):
                zoo.add_adapter(f"{k}-{i}", type_name, seed=i, trainable=False, **config)
                perturb(zoo, f"{k}-{i}", seed=10 * i + len(k))
        return zoo

    names = ["lora-0", None, "houlsby-1", "bitfit-0", "adapterbias-1", "gelu-0", "lora-1", "bitfit-1"]
    ids = torch.randint(4, 100, (len(names), 1), generator=torch.Generator().manual_seed(1))
    got = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("ADAPTERZOO_KERNELS", flag)
        zoo = make()
        with torch.inference_mode():
            plan = zoo.plan(names, training=False)
            got[flag] = [output(zoo.forward(ids, None, plan=plan)) for _ in range(2)]
    for e, f in zip(got["0"], got["1"]):
        torch.testing.assert_close(f, e, atol=1e-4, rtol=1e-4)


def test_a_pool_growing_new_sites_and_keys_under_a_kept_plan(built, monkeypatch):
    """While a plan is kept, other adapters of the same pools take free slots and bring sites (and
    BitFit/LoRA tables) the plan's adapters lack: the plan stays current, and its rows must not change."""

    def make():
        zoo = tiny_zoo("llama", slots=4)
        zoo.add_adapter("q", "lora", seed=0, trainable=False, r=4, init_lora_weights=False, target_modules=["q_proj"])
        zoo.add_adapter(
            "wide",
            "lora",
            seed=1,
            trainable=False,
            r=4,
            init_lora_weights=False,
            target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        )
        zoo.add_adapter("bf", "bitfit", seed=2, trainable=False, include_norms=False, target_modules=["q_proj"])
        zoo.add_adapter("bf-wide", "bitfit", seed=3, trainable=False)
        for i, n in enumerate(["q", "wide", "bf", "bf-wide"]):
            perturb(zoo, n, seed=i)
        return zoo

    names = ["q", None, "bf", "q"]

    def grow(zoo, step):
        if step == 1:
            zoo.plan(["wide", "bf-wide"], training=False)

    eager, fused = _both(monkeypatch, make, names, between=grow)
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused, _run(make(), names), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_a_chain_of_calls_reading_y_gives_each_rows_own_delta(built, dtype, seed):
    """run(): the first call reads y, the later ones read and write the same out; a y-reading kernel
    (bottleneck, adapterbias) later in the chain must see its own rows' y, untouched."""
    g = torch.Generator().manual_seed(seed)
    B, d, m, S = 9, 40 + 8 * seed, 8 + seed, 3
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype)  # noqa: E731
    y = r(B, 1, d)
    perm = torch.randperm(B, generator=g)
    rows = [perm[0:3].contiguous(), perm[3:5].contiguous(), perm[5:8].contiguous()]  # perm[8]: no adapter
    slots = [torch.randint(0, S, (len(x),), generator=g) for x in rows]
    down, db, up, ub = r(S, d, m), r(S, m), r(S, m, d), r(S, d)
    v, L, b = r(S, d), r(S, d), r(S, 1)
    bias = r(S, d)
    for t in (down, db, up, ub, v, L, b, bias):
        t[0] = 0
    calls = [
        kernels.bottleneck_call(y, down, db, up, ub, "gelu", rows[0], slots[0]),
        kernels.adapterbias_call(y, v, L, b, rows[1], slots[1]),
        kernels.bias_call(y, bias, rows[2], slots[2]),
    ]
    assert all(c is not None for c in calls)
    got = kernels.run(calls, y, y).float()
    yf = y.float()[:, 0]
    want = yf.clone()
    for i, s in zip(rows[0].tolist(), slots[0].tolist()):
        z = torch.nn.functional.gelu(yf[i] @ down[s].float() + db[s].float())
        want[i] = yf[i] + z @ up[s].float() + ub[s].float()
    for i, s in zip(rows[1].tolist(), slots[1].tolist()):
        want[i] = yf[i] + (L[s].float() @ yf[i] + b[s].float()) * v[s].float()
    for i, s in zip(rows[2].tolist(), slots[2].tolist()):
        want[i] = yf[i] + bias[s].float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got[:, 0], want, atol=tol, rtol=tol)
    assert torch.equal(got[perm[8], 0], y[perm[8], 0].float())


@torch.inference_mode()
def test_a_bfloat16_joiner_prefilled_through_the_kernels_gets_its_solo_prefills_logits(built):
    """The engine prefills a joiner's prompt inside a decode step as one-token rows, through the fused
    kernels, while its solo run prefills it eagerly (T > 1). In bfloat16 the kernels rounded once
    (float throughout) where the eager deltas round after every op: joiner "houlsby1" got another first
    token than its solo run (max |logit difference| 2e-3, argmax flipped; eager join steps: exactly 0)."""
    from adapterzoo.serve.ragged import JoinStep
    from tests.serve.conftest import TYPE_NAMES, make_adapters
    from tests.serve.test_engine_ragged import _prefill

    zoo = tiny_zoo("llama", slots=4, dtype=torch.bfloat16)
    make_adapters(zoo, None, [f"{t}{k}" for k in range(2) for t in TYPE_NAMES])
    joiners = ["houlsby1", "lora0", "adapterbias1", "bitfit0"]
    prompts = ["the quick brown", "hello", "abc ->", "zz top"]
    solo = torch.stack(
        [
            zoo.forward(*_prefill(zoo, [p], [a]), [a], cache=zoo.new_cache()).logits[0, -1]
            for p, a in zip(prompts, joiners)
        ]
    )
    x, mask = _prefill(zoo, ["x"], [None])
    out = zoo.forward(x, mask, [None], cache=zoo.new_cache())
    step_mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
    jx, jmask = _prefill(zoo, prompts, joiners)
    lengths = jmask.sum(1).tolist()
    step = JoinStep(out.cache, step_mask, zoo.new_cache(), jmask, lengths)
    plan = zoo.plan([None] + [a for a, n in zip(joiners, lengths) for _ in range(n)], training=False)
    tokens = torch.cat([out.logits[:, -1].argmax(-1), jx.flatten()[step.padded_at]])
    got = zoo.forward_tokens(tokens, step.positions(), plan, step, step, step.last_tokens()).logits[1:]
    assert got.argmax(-1).tolist() == solo.argmax(-1).tolist()
    torch.testing.assert_close(got.float(), solo.float(), atol=1e-3, rtol=0)


def _hold_through(kind: str, module, held: list):
    """A forward whose fresh-looking output shares memory with something the module keeps, in a way
    that no second tensor on its storage and no Python reference to it shows."""
    import numpy as np

    def forward(x):
        y = torch.nn.functional.linear(x, module.weight)
        dtype = y.dtype  # (the readers below must not hold y itself)
        if kind == "a numpy array it keeps":  # e.g. a layer run by another library into its own buffer
            kept = np.array(y.numpy())
            out = torch.from_numpy(kept)
            held.append((lambda: torch.from_numpy(kept), out.clone()))
        elif kind == "a bytearray it keeps":
            kept = bytearray(y.numpy().tobytes())
            out = torch.frombuffer(kept, dtype=y.dtype).view(y.shape)
            held.append((lambda: torch.frombuffer(kept, dtype=dtype), out.clone()))
        elif kind == "a tensor it keeps, through dlpack":
            kept = y.clone()
            out = torch.from_dlpack(kept.__dlpack__())
            held.append((lambda: kept, out.clone()))
        else:  # "its storage, which it keeps"
            out, storage = y, y.untyped_storage()
            held.append((lambda: torch.empty(0, dtype=dtype).set_(storage), out.clone()))
        return out

    return forward


@pytest.mark.parametrize(
    "kind",
    [
        "a numpy array it keeps",
        "a bytearray it keeps",
        "a tensor it keeps, through dlpack",
        "its storage, which it keeps",
    ],
)
def test_an_output_on_memory_the_module_keeps_by_other_means_is_never_written_by_the_kernels(built, monkeypatch, kind):
    """runtime._owned counted Python references and tensors on the storage only: an output made with
    from_numpy / frombuffer / from_dlpack (its storage borrows memory someone else owns), or whose
    storage object the module keeps, looked like the module's own, and the kernels added the rows'
    deltas into the module's kept memory."""
    from adapterzoo import runtime

    zoo = _zoo(["bitfit"], copies=2)
    module = zoo.model.get_submodule("model.layers.0.self_attn.o_proj")
    held = []
    runtime.set_instance_forward(module, _hold_through(kind, module, held))
    names = ["bitfit-0", "bitfit-1"]
    eager, fused = _both(monkeypatch, lambda: zoo, names, steps=2)
    assert held
    for read, handed_back in held:
        assert torch.equal(read().reshape(handed_back.shape), handed_back)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("always_call", [False, True])
@pytest.mark.parametrize("grad_mode", ["inference_mode", "no_grad"])
def test_a_site_nested_in_another_keeps_what_a_hook_on_the_inner_one_was_handed(
    built, monkeypatch, always_call, grad_mode
):
    """o_proj's forward returns q_proj's (a site inside a site): the inner site's output, once its deltas
    are in, is the outer module's output. A forward hook on q_proj keeps what it was handed; the outer
    site's deltas must not be added into it, and every logit equals the eager path's."""
    from adapterzoo import runtime

    zoo = _zoo(["bitfit", "lora"], copies=2)
    layer = zoo.model.get_submodule("model.layers.0.self_attn")
    if layer.q_proj.out_features != layer.o_proj.out_features:
        pytest.skip("q_proj and o_proj differ in width here")
    runtime.set_instance_forward(layer.o_proj, lambda x: layer.q_proj(x))
    held = []
    layer.q_proj.register_forward_hook(lambda m, a, o: held.append((o, o.clone())), always_call=always_call)
    names = ["bitfit-0", "lora-1", None, "lora-0"]
    eager, fused = _both(monkeypatch, lambda: zoo, names, steps=2, mode=getattr(torch, grad_mode))
    assert held
    for tensor, handed in held:
        assert torch.equal(tensor, handed)
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chain_of_calls_added_into_y_itself_gives_what_it_gives_into_a_new_tensor(built, dtype):
    """run(into_y=True): every call reads and writes y itself, from the first on; a y-reading kernel
    (bottleneck, adapterbias) must still read its own rows before any call wrote them, and the rows of
    no call stay as they were."""
    g = torch.Generator().manual_seed(7)
    B, d, m, S = 9, 48, 8, 3
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype)  # noqa: E731
    x, y = r(B, 1, d), r(B, 1, d)
    perm = torch.randperm(B, generator=g)
    rows = [perm[0:2].contiguous(), perm[2:4].contiguous(), perm[4:6].contiguous(), perm[6:8].contiguous()]
    slots = [torch.tensor([1, 2]) for _ in rows]
    down, db, up, ub, v, L, b, bias = r(S, d, m), r(S, m), r(S, m, d), r(S, d), r(S, d), r(S, d), r(S, 1), r(S, d)
    A, Bt, scale = r(S, d, 4), r(S, 4, d), r(S)
    calls = [
        kernels.bottleneck_call(y, down, db, up, ub, "swish", rows[0], slots[0]),
        kernels.adapterbias_call(y, v, L, b, rows[1], slots[1]),
        kernels.lora_call(x, y, A, Bt, scale, rows[2], slots[2]),
        kernels.bias_call(y, bias, rows[3], slots[3]),
    ]
    assert all(c is not None for c in calls)
    want = kernels.run(calls, x, y)
    into = y.clone()
    assert kernels.run(calls, x, into, into_y=True) is into
    assert torch.equal(into, want)
    assert torch.equal(into[perm[8]], y[perm[8]])
