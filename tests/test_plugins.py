"""Adapter types are plugins: built-ins through entry points, a third party's installed for real."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pluggy
import pytest
import torch
from click.testing import CliRunner

from adapterzoo import AdapterConfig, AdapterType, PluginError, hookimpl, hookspecs, plugins
from adapterzoo.cli import cli
from adapterzoo.testing.models import output, tiny_zoo

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = {"lora", "houlsby", "prefix", "bitfit", "adapterbias", "soft_prompt"}


def test_builtin_types_are_registered_through_entry_points():
    found = plugins.adapter_types()
    assert BUILTINS <= set(found)
    for name in BUILTINS:
        assert found[name].plugin == name  # the entry point's name
        assert found[name].distribution == "adapterzoo"
        assert found[name].cls.__module__.startswith(f"adapterzoo_{name}")


def test_plugins_command_lists_types_and_distributions():
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["type"]: r for r in json.loads(result.output)}
    assert BUILTINS <= set(rows) and rows["lora"]["distribution"] == "adapterzoo"


@dataclass
class ScaleConfig(AdapterConfig):
    pass


class Scale(AdapterType):
    """A throwaway type: scales the FFN output of each row by 1 + s."""

    name = "scale_test"
    Config = ScaleConfig

    def sites(self, model, config):
        return [p for p, _ in model.named_modules() if p.endswith("mlp.down_proj")]

    def tensors(self, model, site, module, config):
        return {"s": (1,)}

    def delta(self, x, y, w, training):
        return y * w["s"][:, None, :]


@contextmanager
def registered(name, **hooks):
    """Register a throwaway plugin for the length of a block, the way a plugin's tests would."""
    plugins.pm.register(types.SimpleNamespace(**{k: hookimpl(f) for k, f in hooks.items()}), name=name)
    try:
        yield
    finally:
        plugins.pm.unregister(name=name)


def register_scale(register):
    register(Scale)


def test_inline_plugin_is_usable_then_gone():
    with registered("scale-test", register_adapter_types=register_scale):
        zoo = tiny_zoo("llama")
        zoo.add_adapter("s", "scale_test")
        zoo.add_adapter("l", "lora", init_lora_weights=False)
        with torch.no_grad():
            for t in zoo.get_adapter("s").parameters():
                t.fill_(0.5)
        ids = torch.randint(4, 100, (2, 5))
        with torch.inference_mode():
            mixed = output(zoo(ids, None, ["s", "l"]))
            alone = output(zoo(ids[:1], None, ["s"]))[0]
            torch.testing.assert_close(mixed[0], alone, atol=1e-5, rtol=1e-5)
            assert (alone - output(zoo(ids[:1], None, [None]))[0]).abs().max() > 1e-3
    assert "scale_test" not in plugins.adapter_types()


def test_duplicate_type_names_are_refused():
    clash = type("Clash", (Scale,), {"name": "lora"})
    with registered("clash", register_adapter_types=lambda register: register(clash)):
        with pytest.raises(PluginError, match="registered twice"):
            plugins.adapter_types()


def test_a_non_type_is_refused():
    with registered("bad", register_adapter_types=lambda register: register(dict)):
        with pytest.raises(PluginError, match="not an AdapterType"):
            plugins.adapter_types()


def test_a_misspelt_hook_fails_loudly():
    pm = pluggy.PluginManager("adapterzoo")
    pm.add_hookspecs(hookspecs)
    pm.register(types.SimpleNamespace(register_adapter_typos=hookimpl(lambda register: None)))
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


def test_register_commands_adds_a_cli_command():
    import click

    def register_commands(cli):
        @cli.command(name="hello-test")
        def hello():
            click.echo("hello from a plugin")

    try:
        with registered("cmd", register_commands=register_commands):
            plugins.pm.hook.register_commands(cli=cli)
            result = CliRunner().invoke(cli, ["hello-test"])
            assert result.output.strip() == "hello from a plugin"
    finally:
        cli.commands.pop("hello-test", None)


def test_every_hook_is_documented_and_tested():
    """As datasette does: each hookspec appears, with its signature, in the guide and in tests."""
    guide = (ROOT / "docs" / "plugins.md").read_text()
    tests = "".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if not hasattr(fn, "adapterzoo_spec"):
            continue
        params = ", ".join(inspect.signature(fn).parameters)
        assert f"{name}({params})" in guide, f"docs/plugins.md does not document {name}({params})"
        assert re.search(rf"\b{name}\b", tests.replace(inspect.getsource(test_every_hook_is_documented_and_tested), ""))


def _run(cmd, env, cwd=ROOT, timeout=600):
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def ia3_site(tmp_path_factory):
    """examples/adapterzoo-ia3 installed for real (its own distribution and entry point)."""
    target = tmp_path_factory.mktemp("ia3-site")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "examples" / "adapterzoo-ia3"),
        ],
        dict(os.environ),
    )
    assert (target / "adapterzoo_ia3").is_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    return env


THIRD_PARTY_SCRIPT = """
import torch
from adapterzoo.testing.models import tiny_zoo, perturb, output
zoo = tiny_zoo("llama")
for name, t in [("i", "ia3"), ("l", "lora"), ("p", "prefix"), ("h", "houlsby")]:
    zoo.add_adapter(name, t, trainable=False)
    perturb(zoo, name)
ids = torch.randint(4, 100, (5, 6), generator=torch.Generator().manual_seed(0))
names = ["i", "l", None, "p", "h"]
with torch.inference_mode():
    mixed = output(zoo(ids, None, names))
    base = output(zoo(ids[:1], None, [None]))
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], output(zoo(ids[row:row + 1], None, [name]))[0], atol=1e-4, rtol=1e-4)
    assert (output(zoo(ids[:1], None, ["i"])) - base).abs().max() > 1e-3
print("ia3 mixed ok")
"""


def test_third_party_plugin_in_a_mixed_batch(ia3_site):
    listed = json.loads(_run([sys.executable, "-m", "adapterzoo.cli", "plugins", "--json"], ia3_site))
    ia3 = next(r for r in listed if r["type"] == "ia3")
    assert ia3["distribution"] == "adapterzoo-ia3" and ia3["plugin"] == "ia3"
    assert "ia3 mixed ok" in _run([sys.executable, "-c", THIRD_PARTY_SCRIPT], ia3_site)


def test_third_party_plugin_passes_the_conformance_suite(ia3_site):
    env = dict(ia3_site, ADAPTERZOO_CONFORMANCE_TYPES="ia3")
    out = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", "adapterzoo.testing.conformance"],
        env,
    )
    assert re.search(r"\b16 passed\b", out), out[-500:]  # 5 checks x 3 bases + the decode smoke check


def test_env_vars_choose_which_plugins_load(ia3_site):
    script = "from adapterzoo import plugins; print(sorted(plugins.adapter_types()))"
    only = _run([sys.executable, "-c", script], dict(ia3_site, ADAPTERZOO_LOAD_PLUGINS="lora,ia3"))
    assert only.strip() == "['ia3', 'lora']"
    blocked = _run([sys.executable, "-c", script], dict(ia3_site, ADAPTERZOO_DISABLE_PLUGINS="prefix,ia3"))
    assert "prefix" not in blocked and "ia3" not in blocked and "lora" in blocked


@pytest.fixture
def broken_site(tmp_path):
    """A distribution whose `adapterzoo` entry point names a module that imports a missing package."""
    dist = tmp_path / "adapterzoo_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: adapterzoo-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[adapterzoo]\nbroken = adapterzoo_broken\n")
    (tmp_path / "adapterzoo_broken.py").write_text("import a_package_that_is_not_installed\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))


def test_a_plugin_that_fails_to_import_is_a_named_warning_and_the_cli_still_runs(broken_site):
    helped = subprocess.run(
        [sys.executable, "-m", "adapterzoo.cli", "--help"],
        env=broken_site,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "Usage" in helped.stdout
    assert "'broken'" in helped.stderr and "adapterzoo-broken" in helped.stderr
    assert "ModuleNotFoundError" in helped.stderr and "ADAPTERZOO_DISABLE_PLUGINS=broken" in helped.stderr
    listed = json.loads(_run([sys.executable, "-m", "adapterzoo.cli", "plugins", "--json"], broken_site))
    failed = next(r for r in listed if r["plugin"] == "broken")
    assert failed["type"] is None and "a_package_that_is_not_installed" in failed["error"]
    assert failed["distribution"] == "adapterzoo-broken"
    assert BUILTINS <= {r["type"] for r in listed}  # the other plugins still load
    table = _run([sys.executable, "-m", "adapterzoo.cli", "plugins"], broken_site)
    assert "failed to load" in table and "ADAPTERZOO_DISABLE_PLUGINS=broken" in table


def test_disabling_a_broken_plugin_silences_its_warning(broken_site):
    env = dict(broken_site, ADAPTERZOO_DISABLE_PLUGINS="broken")
    result = subprocess.run(
        [sys.executable, "-m", "adapterzoo.cli", "plugins", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "broken" not in result.stderr and "broken" not in result.stdout


def test_a_plugin_hook_that_raises_is_a_plugin_error_naming_it_and_the_way_out():
    def register_adapter_types(register):
        raise RuntimeError("boom")

    with registered("raising-plugin", register_adapter_types=register_adapter_types):
        with pytest.raises(
            PluginError,
            match=r"plugin 'raising-plugin'.*RuntimeError: boom.*"
            r"ADAPTERZOO_DISABLE_PLUGINS=raising-plugin",
        ):
            plugins.adapter_types()
