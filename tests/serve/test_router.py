"""Tiers (device -> host -> disk -> registry), eviction, faults; the catalog, and tenants."""

from __future__ import annotations

import json

import pytest

from adapterzoo import AdapterFileError, InvalidConfigError, UnknownAdapterError, Zoo
from adapterzoo.formats.native import WEIGHTS_FILE
from adapterzoo.serve import AdapterLoadError, Engine, SamplingParams
from adapterzoo.serve.catalog import Catalog, Entry
from adapterzoo.serve.metrics import ServeMetrics
from adapterzoo.serve.tenants import RateLimiter, Tenant, Tenants
from adapterzoo.serve.tiers import Tiers

from .conftest import make_adapters

NAMES = [f"a{i}" for i in range(8)]


@pytest.fixture
def served(tiny_base, tmp_path):
    """A zoo with eight saved adapters on disk (none in memory), and their solo outputs."""
    reference = Zoo.from_pretrained(tiny_base, device="cpu")
    make_adapters(reference, tmp_path / "adapters", NAMES)
    expected = {n: reference.generate(["hello"], [n], max_new_tokens=5)[0] for n in NAMES}
    zoo = Zoo.from_pretrained(tiny_base, device="cpu", slots=2)
    return zoo, tmp_path / "adapters", expected


def _value(metrics, name, labels):
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_tiers_and_lru_eviction(served):
    zoo, folder, expected = served
    metrics = ServeMetrics()
    tiers = Tiers(zoo, adapters_dir=folder, max_host=3, metrics=metrics)
    assert sorted(tiers.catalog) == NAMES and not zoo.adapters
    with Engine(zoo, resolver=tiers, metrics=metrics) as engine:
        assert engine.generate("hello", "a0", max_tokens=5) == expected["a0"]  # disk -> host -> device
        assert tiers.tier("a0") == "device"
        assert engine.generate("hello", "a0", max_tokens=5) == expected["a0"]  # device hit
        for name in NAMES:  # more adapters than host and device hold
            assert engine.generate("hello", name, max_tokens=5) == expected[name]
            assert len(zoo.adapters) <= 3
        assert tiers.tier("a0") == "disk"  # moved down: device -> host -> disk
        assert engine.generate("hello", "a0", max_tokens=5) == expected["a0"]  # and back up
    tiers.close()
    assert _value(metrics, "adapterzoo_adapter_hits_total", {"adapter": "a0"}) == 2  # 2nd and 3rd request
    assert _value(metrics, "adapterzoo_adapter_misses_total", {"adapter": "a0", "tier": "disk"}) == 2
    assert _value(metrics, "adapterzoo_adapter_swap_seconds_count", {"tier": "disk"}) >= len(NAMES) + 1
    assert _value(metrics, "adapterzoo_adapter_evictions_total", {}) >= len(NAMES) - 3
    assert sum(len(p.lru) for p in zoo.pools.values()) <= 2 * len(zoo.pools)


def test_in_memory_adapter_spills_to_disk_and_comes_back(tiny_base, tmp_path):
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    make_adapters(zoo, None, ["m0", "m1", "m2"])
    expected = {n: zoo.generate(["abc"], [n], max_new_tokens=4)[0] for n in ["m0", "m1", "m2"]}
    tiers = Tiers(zoo, spill_dir=tmp_path / "spill", max_host=1)
    with Engine(zoo, resolver=tiers) as engine:
        for n in ["m0", "m1", "m2", "m0"]:
            assert engine.generate("abc", n, max_tokens=4) == expected[n]
    tiers.close()
    assert (tmp_path / "spill" / "m1").is_dir() and len(zoo.adapters) == 1


def test_a_corrupt_adapter_fails_only_its_request(served):
    zoo, folder, expected = served
    (folder / "a1" / WEIGHTS_FILE).write_bytes(b"garbage")
    tiers = Tiers(zoo, adapters_dir=folder)
    with Engine(zoo, resolver=tiers) as engine:
        bad = engine.submit("hello", "a1", SamplingParams(max_tokens=5))
        good = engine.submit("hello", "a2", SamplingParams(max_tokens=5))
        done = bad.result(30)
        assert done.finish_reason == "error" and isinstance(done.error, AdapterLoadError)
        assert "a1" in str(done.error) and "corrupt" in str(done.error)
        assert good.result(30).text == expected["a2"]
        with pytest.raises(UnknownAdapterError):
            engine.submit("hello", "nope", SamplingParams(max_tokens=5))
    tiers.close()


def test_admin_add_unload_delete(served, tmp_path):
    zoo, folder, expected = served
    tiers = Tiers(zoo)  # no adapters folder: adapters come only through the admin calls
    assert not tiers.catalog
    with Engine(zoo, resolver=tiers) as engine:
        tiers.add("x", folder / "a3", owner="acme")
        assert tiers.tier("x") == "host" and tiers.describe("x")["owner"] == "acme"
        assert engine.generate("hello", "x", max_tokens=5) == expected["a3"]
        assert tiers.unload("x") and tiers.tier("x") == "disk"
        assert engine.generate("hello", "x", max_tokens=5) == expected["a3"]
        handle = engine.submit("hello", "x", SamplingParams(max_tokens=50, stop=("\x00",)))
        assert tiers.delete("x") is False  # in use: gone when its last request ends
        handle.result(30)
        import time

        deadline = time.monotonic() + 10
        while "x" in tiers.catalog and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "x" not in tiers.catalog and "x" not in zoo.adapters
        with pytest.raises(AdapterFileError):
            tiers.add("y", tmp_path)  # not an adapter folder
        assert "y" not in tiers.catalog
    tiers.close()


def test_registry_tier(tiny_base, tmp_path):
    """A miss everywhere else pulls `namespace/name` from a registry (our Hub-compatible server)."""
    from tests.registry.conftest import ALICE_TOKEN, TOKENS, start_registry

    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    registry = start_registry(tmp_path / "root", tmp_path / "registry.log", tokens_file=tokens)
    try:
        source = Zoo.from_pretrained(tiny_base, device="cpu")
        make_adapters(source, None, ["r0", "r1"])
        for n in ["r0", "r1"]:
            source.push_to_hub(n, f"alice/{n}", endpoint=registry.url, token=ALICE_TOKEN)
        expected = {n: source.generate(["hello"], [n], max_new_tokens=5)[0] for n in ["r0", "r1"]}
        zoo = Zoo.from_pretrained(tiny_base, device="cpu")
        metrics = ServeMetrics()
        tiers = Tiers(
            zoo,
            adapters_dir=tmp_path / "adapters",
            registry_endpoint=registry.url,
            registry_token=ALICE_TOKEN,
            registry_namespace="alice",
            max_host=1,
            metrics=metrics,
        )
        with Engine(zoo, resolver=tiers) as engine:
            assert engine.generate("hello", "r0", max_tokens=5) == expected["r0"]
            assert engine.generate("hello", "r1", max_tokens=5) == expected["r1"]
            assert (tmp_path / "adapters" / "r0").is_dir()  # pulled to disk: evictions are free
            assert tiers.tier("r0") == "disk"
            assert engine.generate("hello", "r0", max_tokens=5) == expected["r0"]
            done = engine.submit("hello", "missing", SamplingParams(max_tokens=5)).result(30)
            assert isinstance(done.error, UnknownAdapterError)
        tiers.close()
        assert _value(metrics, "adapterzoo_adapter_misses_total", {"adapter": "r0", "tier": "registry"}) == 1
        assert _value(metrics, "adapterzoo_adapter_misses_total", {"adapter": "r0", "tier": "disk"}) == 1
    finally:
        registry.kill()


def test_tenants_file(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(
        "tenants:\n"
        "  acme: {keys: [k-acme], adapters: ['acme-*'], max_resident: 2, rps: 5}\n"
        "  beta: {keys: [k-beta], adapters: [beta-one]}\n"
        "  ops: {keys: [k-ops], admin: true}\n"
        "public: ['shared-*']\n"
        "keys: {k-acme-2: acme}\n"
    )
    t = Tenants.load(path)
    acme, beta, ops = (t.authenticate(k) for k in ("k-acme", "k-beta", "k-ops"))
    assert t.authenticate("k-acme-2") is acme and t.authenticate("nope") is None and t.authenticate(None) is None
    assert t.can_use(acme, "acme-sql") and not t.can_use(beta, "acme-sql") and t.can_use(ops, "acme-sql")
    assert t.can_use(beta, "shared-x") and t.can_use(beta, "beta-one") and not t.can_use(acme, "beta-one")
    assert t.resident_limit("acme") == 2 and t.resident_limit("beta") is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tenants": {"x": {"keys": ["k"], "rsp": 3}}}))
    with pytest.raises(InvalidConfigError, match="rsp"):
        Tenants.load(bad)


def test_rate_limiter_token_bucket():
    limiter, tenant = RateLimiter(), Tenant("t", rps=2, burst=3)
    assert [limiter.allow(tenant, now=0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow(tenant, now=0.5) and not limiter.allow(tenant, now=0.5)
    assert limiter.allow(Tenant("free"), now=0.0)


def test_a_spill_save_does_not_hold_the_tiers_lock(tiny_base, tmp_path, monkeypatch):
    """Unloading (or evicting) an adapter that was only in memory saves it first. The engine
    thread takes the lock of `Tiers` whenever a request ends (`release`): a save held under that
    lock would stall decoding for the whole batch."""
    import threading

    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    make_adapters(zoo, None, ["m0", "m1"])
    tiers = Tiers(zoo, spill_dir=tmp_path / "spill")
    save = zoo.save_adapter
    saving, finish, saves = threading.Event(), threading.Event(), []

    def slow_save(name, path, **kw):
        saves.append(name)
        saving.set()
        assert finish.wait(30)
        return save(name, path, **kw)

    monkeypatch.setattr(zoo, "save_adapter", slow_save)
    unloaded = []
    unloader = threading.Thread(target=lambda: unloaded.append(tiers.unload("m0")))
    unloader.start()
    assert saving.wait(10)
    # meanwhile: a request for m1 ends (the engine thread) and a new one takes m0
    ender = threading.Thread(target=lambda: (tiers.acquire("m1"), tiers.release("m1"), tiers.acquire("m0")))
    ender.start()
    ender.join(5)
    try:
        assert not ender.is_alive(), "release() waited for a file save"
    finally:
        finish.set()
        unloader.join(30)
        ender.join(30)
    # saved, but kept in memory: a request took it while it was being saved
    assert unloaded == [True] and "m0" in zoo.adapters and tiers.catalog["m0"].path == tmp_path / "spill" / "m0"
    tiers.release("m0")
    assert tiers.unload("m0") and "m0" not in zoo.adapters and tiers.tier("m0") == "disk"
    assert saves == ["m0"]  # the second unload found it on disk already
    tiers.close()


def test_owner_tier_and_shared_helpers(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": {"acme": {"keys": ["k"], "adapters": ["acme-*"]}}}))
    tenants = Tenants.from_keys_file(keys)
    assert not tenants.open_access and tenants.owner_of("acme-x") == "acme"
    assert Tenants.from_keys_file(None).open_access
    catalog = Catalog(tenants=tenants)  # what the Ray ingress holds: no zoo, no tiers
    catalog["acme-x"] = Entry("acme-x", path=tmp_path)
    catalog["given"] = Entry("given", repo="ns/given", owner="beta")
    catalog["acme-given"] = Entry("acme-given", repo="ns/acme-given", owner="beta")
    assert [catalog.owner(n) for n in ("acme-x", "given", "acme-given", "nobody")] == ["acme", "beta", "beta", None]
    assert catalog["acme-x"].tier == "disk" and catalog["given"].tier == "registry"
    assert catalog.residency() == {} and catalog.visible("acme-x", "acme") and not catalog.visible("nope", "acme")
    unknown = UnknownAdapterError("no such adapter")
    assert AdapterLoadError.wrap("a", unknown) is unknown
    wrapped = AdapterLoadError.wrap("a", OSError("disk on fire"))
    assert isinstance(wrapped, AdapterLoadError) and str(wrapped) == "adapter 'a' could not be loaded: disk on fire"


def test_server_from_options(tiny_base, tmp_path):
    """The single-process server and every Ray replica build their server from the same options."""
    from adapterzoo.serve.command import server_from_options

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": {"acme": {"keys": ["k"], "adapters": ["acme-*"]}}}))
    server = server_from_options(
        dict(
            base=str(tiny_base),
            base_name="tiny",
            slots=2,
            max_batch=3,
            max_queue=5,
            device="cpu",
            keys_file=keys,
            max_host=4,
            default_max_tokens=7,
            drain_timeout=9.0,
        )
    )
    assert (server.engine.max_batch, server.engine.max_queue, server.adapters.max_host) == (3, 5, 4)
    assert (server.base_name, server.default_max_tokens, server.drain_timeout) == ("tiny", 7, 9.0)
    assert server.tenants is server.adapters.tenants and server.tenants.owner_of("acme-1") == "acme"
    assert server.engine.zoo.slots == 2 and not server.engine.running
    server.adapters.close()


def test_a_removed_folder_is_no_longer_served_unless_its_adapter_is_held(tiny_base, tmp_path):
    """Tiers forget an entry whose folder vanished only when the adapter is not in memory, in use
    or loading; a catalog alone (the Ray ingress) knows of no memory and forgets none."""
    import shutil

    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    make_adapters(Zoo.from_pretrained(tiny_base, device="cpu"), tmp_path / "adapters", ["gone", "held"])
    tiers = Tiers(zoo, adapters_dir=tmp_path / "adapters")
    catalog = Catalog(adapters_dir=tmp_path / "adapters")
    tiers.load("held")
    for name in ("gone", "held"):
        shutil.rmtree(tmp_path / "adapters" / name)
    assert not tiers.visible("gone", None) and "gone" not in tiers.catalog
    assert tiers.visible("held", None) and tiers.tier("held") in ("host", "device")
    assert catalog.visible("gone", None) and "gone" in catalog
    tiers.close()


def test_tiers_ask_the_zoo_only_through_its_public_residency_api():
    """No module under serve/ reads another's underscored state (the zoo's adapters, its pools
    and their LRU, its lock): a change inside the zoo cannot silently break serving."""
    import re
    from pathlib import Path

    import adapterzoo.serve

    folder = Path(adapterzoo.serve.__file__).parent
    reach = re.compile(r"zoo\._\w|\._adapters\b|\.pools\b|\.lru\b|zoo\._lock")
    found = [
        f"{p.name}:{i}"
        for p in sorted(folder.glob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if reach.search(line)
    ]
    assert found == []
