"""What an operator relies on: deletes that stick, exact eviction counts, spilled adapters that
survive a restart, admin sources kept to the adapters folder and the registry, open mode that
warns and refuses to listen beyond loopback, clean answers past the drain timeout, and `--ray`
without Ray naming the extra to install."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
from click.testing import CliRunner

from adapterzoo import Zoo
from adapterzoo.errors import InvalidConfigError
from adapterzoo.serve import Engine, SamplingParams
from adapterzoo.serve.engine import EngineClosedError
from adapterzoo.serve.http import Message, build_server, check_open_mode, render_chat
from adapterzoo.serve.metrics import ServeMetrics
from adapterzoo.serve.tenants import Tenants
from adapterzoo.serve.tiers import Tiers

from .conftest import make_adapters, openai_client, running_app

NAMES = ["a0", "a1", "a2", "a3", "a4", "a5"]


@pytest.fixture
def folder(tiny_base, tmp_path):
    reference = Zoo.from_pretrained(tiny_base, device="cpu")
    make_adapters(reference, tmp_path / "adapters", NAMES)
    return tmp_path / "adapters", reference


def test_an_admin_delete_sticks_across_rescans_and_restarts(tiny_base, folder):
    adapters, reference = folder
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    router = Tiers(zoo, adapters_dir=adapters)
    assert router.delete("a1") and "a1" not in router.catalog
    assert "a1" not in router.rescan() and not router.visible("a1", None)
    assert (adapters / "a1").is_dir()  # its files stay
    router.close()
    again = Tiers(Zoo.from_pretrained(tiny_base, device="cpu"), adapters_dir=adapters)  # a restart
    assert "a1" not in again.catalog and not again.visible("a1", None)
    again.add("a1")  # an explicit add lifts the tombstone
    assert again.visible("a1", None)
    again.close()
    assert "a1" in Tiers(Zoo.from_pretrained(tiny_base, device="cpu"), adapters_dir=adapters).catalog


def test_evictions_are_counted_exactly(tiny_base, folder):
    adapters, _ = folder
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    metrics = ServeMetrics()
    router = Tiers(zoo, adapters_dir=adapters, max_host=2, metrics=metrics)
    with Engine(zoo, resolver=router, metrics=metrics) as engine:
        for _ in range(3):
            for name in NAMES:
                engine.generate("hello", name, max_tokens=2)
        # concurrent eviction passes pick the same victims: each removal counts once
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: router._evict_overflow(room=2), range(4)))
    router.close()
    loads = metrics.registry.get_sample_value("adapterzoo_adapter_swap_seconds_count", {"tier": "disk"})
    evictions = metrics.registry.get_sample_value("adapterzoo_adapter_evictions_total", {})
    assert evictions == loads - len(zoo.adapters)


def test_an_adapter_only_in_the_spill_folder_survives_a_restart(tiny_base, tmp_path):
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    make_adapters(zoo, None, ["m0", "m1"])
    expected = zoo.generate(["abc"], ["m0"], max_new_tokens=4)[0]
    router = Tiers(zoo, adapters_dir=tmp_path / "adapters", max_host=1)  # spills m0 to adapters/.spill
    router.close()
    assert (tmp_path / "adapters" / ".spill" / "m0").is_dir()
    fresh = Zoo.from_pretrained(tiny_base, device="cpu")
    restarted = Tiers(fresh, adapters_dir=tmp_path / "adapters")
    assert "m0" in restarted.catalog
    with Engine(fresh, resolver=restarted) as engine:
        assert engine.generate("abc", "m0", max_tokens=4) == expected
    restarted.close()


def test_admin_sources_are_the_adapters_folder_or_the_registry(tiny_base, folder, tmp_path):
    adapters, _ = folder
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    make_adapters(zoo, tmp_path / "elsewhere", ["outside"])
    keys = {"tenants": {"ops": {"keys": ["k-ops"], "admin": True}, "acme": {"keys": ["k-acme"]}}}
    server = build_server(zoo, base_name="tiny", adapters_dir=adapters, tenants=Tenants.from_dict(keys))
    admin = {"Authorization": "Bearer k-ops"}
    with running_app(server) as url:
        for source in (str(tmp_path / "elsewhere" / "outside"), "../elsewhere/outside", "/etc", "HuggingFaceTB/x"):
            r = httpx.post(f"{url}/admin/adapters", json={"name": "x1", "source": source}, headers=admin)
            assert r.status_code == 400 and r.json()["error"]["code"] == "source_not_allowed", (source, r.text)
        r = httpx.post(f"{url}/admin/adapters", json={"name": "x2", "source": "a3"}, headers=admin)
        assert r.status_code == 201, r.text
        r = httpx.post(f"{url}/admin/adapters", json={"name": "x3", "source": str(adapters / "a4")}, headers=admin)
        assert r.status_code == 201, r.text


def test_open_mode_warns_and_refuses_to_listen_beyond_loopback(tiny_base, tmp_path):
    assert check_open_mode(False, "0.0.0.0", False) is None  # a keys file: nothing to say
    assert "OPEN" in check_open_mode(True, "127.0.0.1", False)
    assert "OPEN" in check_open_mode(True, "0.0.0.0", True)
    for host in ("0.0.0.0", "10.1.2.3", "::", "example.com"):
        with pytest.raises(InvalidConfigError, match="--open"):
            check_open_mode(True, host, False)
    run = subprocess.run(
        [sys.executable, "-m", "adapterzoo.cli", "serve", str(tiny_base), "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "--open" in run.stderr and "Traceback" not in run.stderr


def test_ray_without_ray_names_the_extra_to_install(monkeypatch):
    from adapterzoo.cli import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = CliRunner().invoke(cli, ["serve", "smollm2", "--ray"])
    assert result.exit_code != 0 and "pip install 'adapterzoo[ray]'" in result.output
    assert "Traceback" not in result.output


def test_past_the_drain_timeout_clients_get_503s_and_streams_an_error_event(tiny_base, monkeypatch):
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    server = build_server(zoo, base_name="tiny", tenants=Tenants.open())
    forward = zoo.forward

    def slow(*args, **kw):
        time.sleep(0.02)
        return forward(*args, **kw)

    monkeypatch.setattr(zoo, "forward", slow)
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    with running_app(server) as url:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            plain = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=60)

            def stream() -> list[str]:
                with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                    return [line for line in r.iter_lines() if line]

            streamed = pool.submit(stream)
            while server.engine.stats()["running"] < 2:
                time.sleep(0.01)
            threading.Thread(target=server.engine.stop, args=(True, 0.2)).start()  # what SIGTERM starts
            r = plain.result()
            lines = streamed.result()
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: ") :])
    assert last["error"]["code"] == "shutting_down"


def test_an_engine_stopped_mid_request_fails_it_with_engine_closed(tiny_base):
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    engine = Engine(zoo).start()
    handle = engine.submit("abc", None, SamplingParams(max_tokens=240, ignore_eos=True))
    while engine.stats()["running"] < 1:
        time.sleep(0.005)
    engine.stop(drain=True, timeout=0.0)
    done = handle.result(10)
    assert done.finish_reason == "error" and isinstance(done.error, EngineClosedError)


def test_the_developer_role_is_rendered_as_system(tiny_base):
    zoo = Zoo.from_pretrained(tiny_base, device="cpu")
    assert Message(role="developer", content="be brief").for_template() == {"role": "system", "content": "be brief"}
    with running_app(build_server(zoo, base_name="tiny", tenants=Tenants.open())) as url:
        r = openai_client(url).chat.completions.create(
            model="tiny",
            messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}],
            max_tokens=5,
            temperature=0,
        )
    prompt = render_chat(zoo.tokenizer, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == zoo.generate([prompt], max_new_tokens=5)[0]


def test_sigterm_past_the_drain_timeout_answers_503_and_ends_streams_cleanly(tiny_base, serve_factory):
    """The real signal path: uvicorn's SIGTERM starts the engine's drain at once; with
    --drain-timeout 0 what runs fails with EngineClosedError, answered in time."""
    server = serve_factory(tiny_base, "--drain-timeout", "0")
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 250, "ignore_eos": True, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            plain = pool.submit(httpx.post, f"{server.url}/v1/completions", json=body, timeout=60)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until both requests are in the engine
                health = httpx.get(f"{server.url}/health", timeout=10).json()
                if health["running"] + health["waiting"] >= 2:
                    break
                time.sleep(0.01)
            server.process.send_signal(15)
            rest = [line for line in lines if line]
        answer = plain.result()
    assert rest[-1] == "data: [DONE]"
    last = json.loads(rest[-2][len("data: ") :])
    assert last.get("error", {}).get("code") == "shutting_down" or last["choices"][0]["finish_reason"] == "length"
    assert answer.status_code in (200, 503)
    if answer.status_code == 503:
        assert answer.json()["error"]["code"] == "shutting_down"
    assert server.process.wait(60) == 0
