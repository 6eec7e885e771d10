"""Attacks, round 3: on `model="auto"` (routing records anyone may write, in an adapter's config)
and on what the serve refactor (module-level handlers, `ServeConfig`) accepts. Each hole found is
written here as the attack first (it failed before its fix), against an in-process server on
127.0.0.1 driven with the official `openai` client."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import openai
import pytest
import torch

from adapterzoo import Zoo
from adapterzoo.errors import InvalidConfigError
from adapterzoo.formats.native import CONFIG_FILE
from adapterzoo.routing import _pack
from adapterzoo.serve.config import ServeConfig
from adapterzoo.serve.http import build_server
from adapterzoo.serve.tenants import Tenants
from adapterzoo.tasks import instructed_examples

from .conftest import openai_client, running_app

KEYS = {
    "tenants": {
        "acme": {"keys": ["k-acme"], "adapters": ["acme-*"]},
        "zeta": {"keys": ["k-zeta"], "adapters": ["zeta-*"]},
        "ops": {"keys": ["k-ops"], "admin": True},
        "slow": {"keys": ["k-slow"], "adapters": ["slow-*"], "rps": 0.01, "burst": 1},
        "lister": {"keys": ["k-lister"], "rps": 0.01, "burst": 2},
    },
    "public": ["shared-*"],
}
#: adapter -> the task whose training prompts are its routing examples
EXAMPLES = {
    "acme-upper": "upper",
    "zeta-reverse": "reverse",
    "shared-copy": "reverse",  # another author's public adapter: zeta-reverse's examples, copied
    "shared-nan": "digits-sort",  # its stored features rewritten to NaN below
}


def prompt(task: str, i: int = 0) -> str:
    return instructed_examples(task, i + 1, "test", seed=3)[i].prompt


@pytest.fixture(scope="module")
def served(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks3")
    authoring = Zoo.from_pretrained(tiny_base, device="cpu")
    for i, (name, task) in enumerate(EXAMPLES.items()):
        authoring.add_adapter(name, "lora", r=4, seed=i, trainable=False)
        authoring.add_routing_examples(name, [ex.prompt for ex in instructed_examples(task, 12, "train")])
        authoring.save_adapter(name, root / "adapters" / name)
    config = root / "adapters" / "shared-nan" / CONFIG_FILE
    saved = json.loads(config.read_text())
    record = saved["metadata"]["routing"]
    record["features"] = _pack(torch.full(record["shape"], float("nan")))
    config.write_text(json.dumps(saved))
    server = build_server(
        Zoo.from_pretrained(tiny_base, device="cpu"),
        base_name="tiny",
        adapters_dir=root / "adapters",
        tenants=Tenants.from_dict(KEYS),
    )
    with running_app(server) as url:
        yield SimpleNamespace(url=url, adapters_dir=root / "adapters")


def routed(url: str, key: str, text: str) -> tuple[str, str]:
    raw = openai_client(url, key).completions.with_raw_response.create(model="auto", prompt=text, max_tokens=1)
    return raw.parse().model, raw.headers["x-adapterzoo-adapter"]


def test_a_public_adapter_with_nan_routing_features_does_not_take_every_tenants_auto_traffic(served):
    # NaN scored above every adapter and the base: shared-nan answered every model="auto" prompt
    assert routed(served.url, "k-acme", "Why is the sky blue?") == ("tiny", "tiny")
    assert routed(served.url, "k-acme", prompt("upper")) == ("acme-upper", "acme-upper")


def test_a_public_adapter_copying_a_tenants_routing_examples_does_not_take_its_auto_traffic(served):
    # the copy ties with zeta's own adapter, and "shared-copy" sorts before "zeta-reverse": the
    # first listed won, so another author's weights answered zeta's prompts
    for i in range(3):
        assert routed(served.url, "k-zeta", prompt("reverse", i)) == ("zeta-reverse", "zeta-reverse")
    # a tenant without an adapter of its own for the task still gets the public one
    assert routed(served.url, "k-acme", prompt("reverse"))[0] == "shared-copy"


def test_a_public_adapter_with_a_routing_example_that_is_not_unicode_breaks_no_tenants_auto(served):
    # "\ud800" is valid JSON but no tokenizer takes it: MiniLM raised, and every model="auto"
    # request of every tenant who could see the adapter was a 500
    folder = served.adapters_dir / "shared-garbled"
    shutil.copytree(served.adapters_dir / "shared-copy", folder)
    try:
        saved = json.loads((folder / CONFIG_FILE).read_text())
        saved["metadata"]["routing"].update(examples=["Reverse \ud800 it", "Sort \udfff"], features="")
        (folder / CONFIG_FILE).write_text(json.dumps(saved))
        assert routed(served.url, "k-acme", prompt("upper")) == ("acme-upper", "acme-upper")
        assert routed(served.url, "k-zeta", prompt("reverse")) == ("zeta-reverse", "zeta-reverse")
    finally:
        shutil.rmtree(folder)


def test_a_tenant_over_its_rate_limit_gets_its_429_before_the_router_runs(served, monkeypatch):
    # model="auto" was routed (a rescan of the adapters folder, every visible adapter's routing
    # record, a MiniLM forward) before the rate limit: a throttled tenant still spent the
    # server's CPU, and the thread pool every tenant's tokenizing uses, on each refused request
    from adapterzoo import routing

    calls = []
    route = routing.route
    monkeypatch.setattr(routing, "route", lambda *a, **k: calls.append(1) or route(*a, **k))
    client = openai_client(served.url, "k-slow")
    client.completions.create(model="auto", prompt=prompt("reverse"), max_tokens=1)  # its burst of 1
    for _ in range(5):
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="auto", prompt=prompt("reverse"), max_tokens=1)
    assert len(calls) == 1


def test_listing_models_counts_against_the_rate_limit(served):
    # each /v1/models rescans the adapters folder in the thread pool every tenant's tokenizing
    # uses (64 ms with 2,000 adapters), and a throttled tenant could call it without end
    client = openai_client(served.url, "k-lister")
    for _ in range(2):  # its burst
        assert "tiny" in [m.id for m in client.models.list()]
    with pytest.raises(openai.RateLimitError):
        client.models.list()


@pytest.mark.parametrize(
    "base_name, header",
    [
        ("模型", "%E6%A8%A1%E5%9E%8B"),
        ("tiny\r\nSet-Cookie: k=v", "tiny%0D%0ASet-Cookie: k=v"),
        ("org/base", "org/base"),
    ],
)
def test_a_base_named_outside_ascii_still_answers_model_auto(tiny_base, base_name, header):
    # the base's name goes into the X-Adapterzoo-Adapter header when the router picks the base,
    # and it defaults to BASE's folder name: a folder named 模型 made every such request a plain
    # text 500 (headers are Latin-1), and a CR LF in --name dropped the connection unanswered
    server = build_server(Zoo.from_pretrained(tiny_base, device="cpu"), base_name=base_name)
    with running_app(server) as url:
        raw = openai_client(url).completions.with_raw_response.create(model="auto", prompt="Hi", max_tokens=1)
    assert raw.parse().model == base_name
    assert raw.headers["x-adapterzoo-adapter"] == header  # percent-encoded outside printable ASCII


@pytest.mark.parametrize("field", ["body_timeout", "stuck_after", "drain_timeout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_timeouts_that_are_not_finite_numbers_are_refused_with_the_flag_named(field, value):
    # --body-timeout nan made every request a 408 at once, inf undid the byte-by-byte defence;
    # --stuck-after nan silenced the watchdog; --drain-timeout inf waited for ever on shutdown
    with pytest.raises(InvalidConfigError, match="--" + field.replace("_", "-")):
        ServeConfig(base="tiny", **{field: value})
