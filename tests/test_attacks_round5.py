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
from adapterzoo.tasks import instructed_examples, routing_examples
from adapterzoo.testing.models import tiny_zoo

# ----------------------------------------------------------------------------- routing


@pytest.fixture(scope="module")
def encoder():
    return routing.SentenceEncoder()


@pytest.fixture
def zoo(encoder):
    """A tenant's two adapters, "reverse" and "upper", with honest routing records."""
    zoo = tiny_zoo("llama")
    routing._cache(zoo).sentence = encoder
    for task in ("reverse", "upper"):
        zoo.add_adapter(task, "lora", r=4, trainable=False)
        zoo.add_routing_examples(task, routing_examples(task, 12))
    return zoo


def victims_prompts() -> list[str]:
    return [ex.prompt for ex in instructed_examples("reverse", 4, "test", seed=3, held_out=True)]


def record_with(examples: list[str], feats: torch.Tensor) -> dict:
    return {
        "examples": examples,
        "encoder": "sentence",
        "layer": None,
        "kind": routing.FEATURES["sentence"],
        "shape": list(feats.shape),
        "features": routing._pack(feats),
    }


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


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="STORED_FEATURES_TOLERANCE is a free edge for the forger: a public adapter that copies a "
    "tenant's routing examples and moves each stored feature 0.0085 (L2) towards the tenant's prompts "
    "passes the check and beats the tenant's own adapter, which the exact-tie rule was meant to keep",
)
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


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="only a chosen adapter's stored features are checked: a record with harmless examples whose "
    "features copy another adapter's stored ones ties with it, loses the tie (listed later), is never "
    "chosen so never checked, and makes every prompt routed to that adapter a 'close call' that "
    "re-encodes in float32 (a second MiniLM forward per request, forever)",
)
def test_a_record_that_ties_with_another_adapter_cannot_make_every_routed_request_encode_twice(zoo, monkeypatch):
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
    calls.clear()
    shadowed = [zoo.route([p], records=records)[0].adapter for p in prompts]
    assert shadowed == alone == ["reverse"] * 4
    assert calls.count(True) <= exact_alone, (calls, exact_alone)


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


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="read_routing_record caches a folder's record by its config's mtime alone: an adapter folder "
    "replaced by a new version with the same mtime (rsync -t, cp -p, tar or a reproducible build's fixed "
    "timestamps) keeps routing with the old version's examples and features until the server restarts",
)
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
