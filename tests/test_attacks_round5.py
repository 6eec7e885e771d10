"""Attacks, round 5: on routing's stored-features check (`model="auto"`, adapterzoo/routing.py) and
on the decode fast path (a plan kept across steps, adapterzoo/plan.py). A test that passes is a
defence that holds; an xfail(strict=True) is a hole found, described in its reason."""

from __future__ import annotations

import json
import os

import pytest
import torch

from adapterzoo import routing
from adapterzoo.formats.native import CONFIG_FILE
from adapterzoo.tasks import instructed_examples
from adapterzoo.testing.models import ONE_OF_EACH, perturb, tiny_zoo
from tests import routing_fixtures
from tests.test_decode_plan_reuse import _decode

# the shared fixtures (tests/routing_fixtures.py)
encoder, zoo, victims_prompts = routing_fixtures.encoder, routing_fixtures.zoo, routing_fixtures.victims_prompts
record_with = routing_fixtures.record_with

# ----------------------------------------------------------------------------- routing


def nudged(feats: torch.Tensor, towards: torch.Tensor, distance: float) -> torch.Tensor:
    """Each (unit) row moved `distance` (L2) towards `towards`, still unit length."""
    step = towards - feats
    moved = feats + distance * step / step.norm(dim=-1, keepdim=True)
    return moved / moved.norm(dim=-1, keepdim=True)


def counting_encodes(monkeypatch) -> list[bool]:
    """Patches routing.features to record, per call, whether it ran the exact (float32) encoder."""
    calls: list[bool] = []
    real = routing.features

    def counted(zoo, prompts, space, exact=True):
        calls.append(exact)
        return real(zoo, prompts, space, exact=exact)

    monkeypatch.setattr(routing, "features", counted)
    return calls


def test_a_copy_of_a_tenants_examples_with_features_nudged_within_tolerance_cannot_take_its_prompts(zoo, encoder):
    honest = routing.routing_records(zoo)
    examples = honest["reverse"]["examples"]
    aim = encoder(victims_prompts()).mean(0, keepdim=True)
    aim = aim / aim.norm()
    forged = record_with(examples, nudged(encoder(examples), aim, 0.0085))
    # the tenant's own adapters are listed first, as the server lists them
    decisions = zoo.route(victims_prompts(), records={**honest, "copycat": forged})
    assert [d.adapter for d in decisions] == ["reverse"] * 4


def test_a_copy_of_a_tenants_examples_and_features_loses_the_exact_tie_to_the_tenants_own(zoo):
    honest = routing.routing_records(zoo)
    decisions = zoo.route(victims_prompts(), records={**honest, "copycat": dict(honest["reverse"])})
    assert [d.adapter for d in decisions] == ["reverse"] * 4


def test_a_record_that_ties_with_another_adapter_cannot_make_every_routed_request_encode_twice(zoo, monkeypatch):
    """Harmless examples with a copy of another adapter's stored features: a tie it loses (listed
    later), so it is never chosen; had only chosen records been checked, every prompt routed to
    that adapter would have been a close call, encoded again in float32, forever."""
    honest = routing.routing_records(zoo)
    stolen = honest["reverse"]
    banana = [f"A recipe for banana bread, number {i}" for i in range(len(stolen["examples"]))]
    forged = {**stolen, "examples": banana}  # the same features string, other examples
    records = {**honest, "zz-shadow": forged}
    prompts = victims_prompts()
    zoo.route(prompts, records=honest)  # warm: background and prototypes built
    calls = counting_encodes(monkeypatch)
    alone = [zoo.route([p], records=honest)[0].adapter for p in prompts]
    exact_alone = calls.count(True)
    zoo.route(prompts[:1], records=records)  # the first request may check the shadow (once)
    calls.clear()
    shadowed = [zoo.route([p], records=records)[0].adapter for p in prompts]
    assert shadowed == alone == ["reverse"] * 4
    assert calls.count(True) <= exact_alone, (calls, exact_alone)


def test_a_forged_record_checked_while_another_request_builds_its_prototypes_cannot_win_afterwards(
    zoo, encoder, monkeypatch
):
    """Two requests routed at once (the server routes on worker threads), interleaved
    deterministically: the second runs whole while the first is between building its prototypes
    and caching them."""
    honest = routing.routing_records(zoo)
    aimed = encoder([p for p in victims_prompts() for _ in range(routing.NEIGHBOURS)])
    forged = record_with([f"A recipe for banana bread, number {i}" for i in range(len(aimed))], aimed)
    records = {**honest, "forged": forged}
    real_build = routing._build_prototypes
    interleaved = []

    def build_then_let_another_request_run(*args, **kwargs):
        built = real_build(*args, **kwargs)
        if not interleaved:
            interleaved.append(None)
            interleaved[0] = zoo.route(victims_prompts(), records=records)  # the other request
        return built

    monkeypatch.setattr(routing, "_build_prototypes", build_then_let_another_request_run)
    first = zoo.route(victims_prompts(), records=records)
    later = zoo.route(victims_prompts(), records=records)
    assert [d.adapter for d in interleaved[0]] == ["reverse"] * 4  # the other request: checked, replaced
    assert [d.adapter for d in first] == ["reverse"] * 4
    assert [d.adapter for d in later] == ["reverse"] * 4


@pytest.mark.parametrize(
    "damage",
    ["nan", "inf", "huge", "zeros", "wrong_rows", "wrong_cols", "not_base64", "float32_bytes", "list_of_floats"],
)
def test_damaged_stored_features_neither_crash_routing_nor_take_another_tenants_prompts(zoo, encoder, damage):
    honest = routing.routing_records(zoo)
    aimed = encoder([p for p in victims_prompts() for _ in range(routing.NEIGHBOURS)])
    banana = [f"A recipe for banana bread, number {i}" for i in range(len(aimed))]
    record = record_with(banana, aimed)
    if damage == "nan":
        record["features"] = routing._pack(aimed.masked_fill(torch.rand_like(aimed) < 0.1, float("nan")))
    elif damage == "inf":
        record["features"] = routing._pack(aimed * 1e6)  # float16 overflows to inf
    elif damage == "huge":
        record["features"] = routing._pack(aimed * 6e4)  # finite in float16
    elif damage == "zeros":
        record["features"] = routing._pack(torch.zeros_like(aimed))
    elif damage == "wrong_rows":
        record["shape"] = [len(aimed) - 1, aimed.shape[1]]
        record["features"] = routing._pack(aimed[:-1])
    elif damage == "wrong_cols":
        record["shape"] = [len(aimed), aimed.shape[1] // 2]
        record["features"] = routing._pack(aimed[:, : aimed.shape[1] // 2])
    elif damage == "not_base64":
        record["features"] = "!!!" + record["features"]
    elif damage == "float32_bytes":
        import base64

        record["features"] = base64.b64encode(aimed.numpy().tobytes()).decode()
    elif damage == "list_of_floats":
        record["features"] = aimed.tolist()
    decisions = zoo.route(victims_prompts(), records={**honest, "forged": record})
    assert [d.adapter for d in decisions] == ["reverse"] * 4


def test_a_record_that_changes_between_requests_is_routed_by_what_it_says_now(zoo, encoder):
    """The same dict edited in place between requests: prototypes are keyed by content, so a forged
    content once replaced stays replaced when it comes back, and honest content routes at once."""
    honest = routing.routing_records(zoo)
    aimed = encoder([p for p in victims_prompts() for _ in range(routing.NEIGHBOURS)])
    forged = record_with([f"A recipe for banana bread, number {i}" for i in range(len(aimed))], aimed)
    records = {"shifty": dict(forged)}
    assert {d.adapter for d in zoo.route(victims_prompts(), records=records)} == {None}
    records["shifty"].clear()
    records["shifty"].update(honest["reverse"])
    assert {d.adapter for d in zoo.route(victims_prompts(), records=records)} == {"shifty"}
    records["shifty"].clear()
    records["shifty"].update(forged)
    assert {d.adapter for d in zoo.route(victims_prompts(), records=records)} == {None}


def test_a_record_that_changes_on_every_request_does_not_grow_the_routers_memory_without_bound(
    zoo, encoder, monkeypatch
):
    monkeypatch.setattr(routing, "FEATURE_RECORDS", routing.PROTOTYPE_SETS + 2)
    honest = routing.routing_records(zoo)
    feats = routing._unpack(honest["upper"])
    noise = torch.Generator().manual_seed(0)
    for _ in range(3 * routing.PROTOTYPE_SETS):
        jitter = feats + 1e-3 * torch.randn(feats.shape, generator=noise)  # honest, within tolerance
        changed = record_with(honest["upper"]["examples"], jitter / jitter.norm(dim=-1, keepdim=True))
        zoo.route([victims_prompts()[0]], records={"reverse": honest["reverse"], "upper": changed})
    kept = len(routing._cache(zoo).features)
    # what the cached prototype sets can use: one record of each, plus the two honest ones
    assert kept <= routing.PROTOTYPE_SETS + 2, kept


def test_an_adapter_folder_replaced_with_the_same_mtime_is_routed_by_its_new_record(zoo, tmp_path):
    zoo.save_adapter("upper", tmp_path / "a")
    config = tmp_path / "a" / CONFIG_FILE
    before = routing.read_routing_record(tmp_path / "a")
    stamp = config.stat()
    data = json.loads(config.read_text())
    data["metadata"]["routing"] = routing.routing_records(zoo)["reverse"]
    config.write_text(json.dumps(data))
    os.utime(config, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    after = routing.read_routing_record(tmp_path / "a")
    assert before["examples"] != after["examples"]
    assert after["examples"] == routing.routing_records(zoo)["reverse"]["examples"]


# ----------------------------------------------------------------------------- model="auto" over HTTP

ACME_TASKS = ("reverse", "upper")


def task_prompt(task: str, i: int = 0) -> str:
    return instructed_examples(task, i + 1, "test", seed=3)[i].prompt


@pytest.fixture
def auto_server(encoder, tmp_path):
    """An in-process server: acme owns "reverse" and "upper", beta owns "beta-*" (none exist),
    "lonely" owns nothing, "ops" is the admin. Yields (url, the server's zoo, the adapters folder)."""
    from adapterzoo import Zoo
    from adapterzoo.serve.http import build_server
    from adapterzoo.serve.tenants import Tenants
    from tests.serve.conftest import running_app, save_base

    base = save_base(tmp_path / "base")
    maker = Zoo.from_pretrained(base, device="cpu")
    routing._cache(maker).sentence = encoder
    for i, task in enumerate((*ACME_TASKS, "digits-sort")):
        name = task if task in ACME_TASKS else "reverse-v2"  # reverse-v2: a new version, routing like digits-sort
        maker.add_adapter(name, "lora", r=4, seed=i, trainable=False)
        maker.add_routing_examples(name, [ex.prompt for ex in instructed_examples(task, 12, "train")])
        maker.save_adapter(name, tmp_path / "adapters" / name)
    keys = {
        "tenants": {
            "acme": {"keys": ["k-acme"], "adapters": list(ACME_TASKS)},
            "beta": {"keys": ["k-beta"], "adapters": ["beta-*"]},
            "lonely": {"keys": ["k-lonely"]},
            "ops": {"keys": ["k-ops"], "admin": True},
        }
    }
    zoo = Zoo.from_pretrained(base, device="cpu")
    routing._cache(zoo).sentence = encoder
    server = build_server(zoo, base_name="tiny", adapters_dir=tmp_path / "adapters", tenants=Tenants.from_dict(keys))
    with running_app(server) as url:
        yield url, zoo, tmp_path / "adapters"


def auto(url: str, key: str, prompt: str):
    import httpx

    return httpx.post(
        f"{url}/v1/completions",
        json={"model": "auto", "prompt": prompt, "max_tokens": 2, "temperature": 0},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_auto_for_a_tenant_who_may_see_no_adapter_answers_with_the_base_and_names_nothing_else(auto_server):
    url, _, _ = auto_server
    for key in ("k-lonely", "k-beta"):
        for task in ACME_TASKS:
            r = auto(url, key, task_prompt(task))
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "tiny" and r.headers["x-adapterzoo-adapter"] == "tiny"
            assert not any(t in r.text or t in str(r.headers) for t in ACME_TASKS)


def test_a_deleted_adapter_is_never_routed_to_and_its_reload_routes_by_the_new_record(auto_server):
    import httpx

    url, _, _ = auto_server
    admin = {"Authorization": "Bearer k-ops"}
    assert auto(url, "k-acme", task_prompt("reverse")).json()["model"] == "reverse"  # prototypes cached
    assert httpx.delete(f"{url}/admin/adapters/reverse", headers=admin, timeout=60).status_code in (200, 202)
    for i in range(3):
        r = auto(url, "k-acme", task_prompt("reverse", i))
        assert r.status_code == 200 and r.json()["model"] != "reverse", r.text
    # the name again, from another folder whose record is digits-sort's: the old prototypes are gone
    r = httpx.post(f"{url}/admin/adapters", json={"name": "reverse", "source": "reverse-v2"}, headers=admin, timeout=60)
    assert r.status_code in (200, 201, 202), r.text
    assert auto(url, "k-acme", task_prompt("digits-sort")).json()["model"] == "reverse"
    assert auto(url, "k-acme", task_prompt("reverse")).json()["model"] != "reverse"


# ----------------------------------------------------------------------------- the decode fast path


def decode_zoo(slots: int = 4, copies: int = 1, family: str = "llama"):
    """Every built-in type, `copies` adapters of each (name, name-2, ...), perturbed off identity."""
    zoo = tiny_zoo(family, slots=slots)
    for c in range(copies):
        for i, (name, (type_name, config)) in enumerate(ONE_OF_EACH.items()):
            full = name if c == 0 else f"{name}-{c + 1}"
            zoo.add_adapter(full, type_name, seed=10 * c + i, trainable=False, **config)
            perturb(zoo, full, scale=0.5, seed=10 * c + i)
    return zoo


decode = _decode  # tests/test_decode_plan_reuse.py: prefill, then decode steps with fixed tokens


def assert_rows_equal(mixed: list, reference: list, rows: list[int], ref_rows: list[int] | None = None) -> None:
    for step, (m, r) in enumerate(zip(mixed, reference)):
        for i, j in zip(rows, ref_rows or rows):
            torch.testing.assert_close(m[i], r[j], atol=1e-4, rtol=1e-4, msg=f"row {i} step {step}")


def prompt_rows(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (rows, 6), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_another_plan_evicting_a_kept_plans_slots_between_steps_leaves_every_row_its_solo_result(family):
    """One slot per pool: between decode steps another forward (a joiner's prefill) plans the
    second adapter of every type, evicting the kept plan's. The kept plan must see it and every
    row still equal its solo run."""
    zoo = decode_zoo(slots=1, copies=2, family=family)
    names = [*ONE_OF_EACH, None]
    prompt = prompt_rows(len(names))
    others = [f"{name}-2" for name in ONE_OF_EACH]

    def evict(step):
        zoo.forward(prompt_rows(len(others), seed=step + 1), None, others if step % 2 else others[::-1])

    with torch.inference_mode():
        plan = zoo.plan(names, training=False)
        mixed = decode(zoo, names, prompt, 4, plan=plan, between=evict)
        for i, name in enumerate(names):
            assert_rows_equal(mixed, decode(zoo, [name], prompt[i : i + 1], 4), [i], [0])


def test_an_adapter_reloaded_into_the_same_slot_mid_decode_leaves_the_other_rows_their_solo_result():
    """An operator unloads "houlsby" and loads new weights under the same name while a kept plan
    decodes it beside other rows: the new adapter takes the freed slot. The other rows must equal
    their solo runs, and from then on the reloaded row reads the new weights."""
    zoo = decode_zoo(slots=4)
    names = ["houlsby", "lora", None, "houlsby", "bitfit"]
    prompt = prompt_rows(len(names))

    def reload(step):
        if step == 2:
            zoo.remove_adapter("houlsby")
            zoo.add_adapter("houlsby", "houlsby", seed=99, trainable=False, bottleneck=8)
            perturb(zoo, "houlsby", scale=0.5, seed=99)
            zoo.plan(["houlsby"], training=False)  # into the slot the old one had

    with torch.inference_mode():
        plan = zoo.plan(names, training=False)
        slot = zoo.pools[zoo.get_adapter("houlsby").pool_key].slot_of("houlsby")
        mixed = decode(zoo, names, prompt, 4, plan=plan, between=reload)
        assert zoo.pools[zoo.get_adapter("houlsby").pool_key].slot_of("houlsby") == slot
        for i in (1, 2, 4):
            assert_rows_equal(mixed, decode(zoo, [names[i]], prompt[i : i + 1], 4), [i], [0])
        # the reloaded rows: the same steps with a fresh plan at every step read the new weights
        zoo.remove_adapter("houlsby")
        zoo.add_adapter("houlsby", "houlsby", seed=1, trainable=False, bottleneck=8)
        perturb(zoo, "houlsby", scale=0.5, seed=1)  # the first version again (as decode_zoo made it)
        fresh = decode(zoo, names, prompt, 4, between=reload)
        assert_rows_equal(mixed, fresh, [0, 3])


def test_an_adapter_edited_in_place_mid_decode_reads_the_same_weights_with_a_kept_plan_as_without():
    """A trainer (or an operator's `copy_`) edits an adapter's tensors in place between two decode
    steps. Without a kept plan the next step re-places it (its version changed); a kept plan must
    not keep decoding with the weights its pool slot held before."""
    names = ["lora", None, "adapterbias"]
    prompt = prompt_rows(len(names))

    def edit(step, zoo):
        if step == 1:
            perturb(zoo, "lora", scale=0.5, seed=123)

    results = []
    for keep in (True, False):
        z = decode_zoo(slots=4)
        with torch.inference_mode():
            plan = z.plan(names, training=False) if keep else None
            results.append(decode(z, names, prompt, 3, plan=plan, between=lambda s, z=z: edit(s, z)))
    assert_rows_equal(results[0], results[1], [0, 1, 2])


def test_an_engine_with_one_slot_per_pool_gives_every_row_its_solo_text_and_logprobs():
    """Two adapters of every type but one slot per pool, four rows: joiners of a type whose slot is
    held wait, rows join and leave at many steps, and every later batch evicts the previous one's
    adapters. Each request's greedy tokens and logprobs (to 1e-4) equal the engine's own run of it
    alone, and its text starts with what zoo.generate gives alone (which stops at end-of-text)."""
    from adapterzoo.serve import Engine, SamplingParams

    zoo = decode_zoo(slots=1, copies=2)
    names = [*ONE_OF_EACH, *(f"{n}-2" for n in ONE_OF_EACH), None]
    prompts = ["abc ->", "hello", "x", "the quick brown", "1 2 3"]
    jobs = [(prompts[i % len(prompts)], names[(5 * i) % len(names)], 2 + (i * 3) % 7) for i in range(len(names))]

    def params(n):
        return SamplingParams(max_tokens=n, ignore_eos=True, logprobs=2)

    with Engine(zoo, max_batch=4) as engine:
        handles = [engine.submit(p, a, params(n)) for p, a, n in jobs]
        mixed = [h.result(120) for h in handles]
        alone = [engine.submit(p, a, params(n)).result(120) for p, a, n in jobs]
    for (prompt, adapter, n), m, a in zip(jobs, mixed, alone):
        assert m.error is None and a.error is None, (m.error, a.error)
        assert m.token_ids == a.token_ids and m.text == a.text, (prompt, adapter)
        # zoo.generate stops at the end-of-text token, which these requests ignore
        assert m.text.startswith(zoo.generate([prompt], [adapter], max_new_tokens=n)[0]), (prompt, adapter)
        got = torch.tensor([t.logprob for t in m.logprobs])
        want = torch.tensor([t.logprob for t in a.logprobs])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"{adapter}: {prompt!r}")


def test_loras_of_several_ranks_in_one_kept_plan_each_equal_their_solo_run_at_every_step():
    """Ranks 2, 4 and 8 land in three pools of one type; in a decode step each pool's delta runs
    over every row, the other pools' rows at slot 0 with an empty bag. Rows of one rank in runs
    and apart, with the bare base between them."""
    zoo = tiny_zoo("llama", slots=2)
    for i, r in enumerate((2, 4, 8, 8)):
        name = f"lora-r{r}" + ("-b" if i == 3 else "")
        zoo.add_adapter(name, "lora", r=r, seed=i, trainable=False, init_lora_weights=False)
        perturb(zoo, name, scale=0.5, seed=i)
    names = ["lora-r8", "lora-r8-b", None, "lora-r2", "lora-r4", "lora-r8", None, "lora-r2"]
    prompt = prompt_rows(len(names), seed=5)
    with torch.inference_mode():
        plan = zoo.plan(names, training=False)
        mixed = decode(zoo, names, prompt, 3, plan=plan)
        for i, name in enumerate(names):
            assert_rows_equal(mixed, decode(zoo, [name], prompt[i : i + 1], 3), [i], [0])
