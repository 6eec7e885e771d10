"""`ServeConfig`: the CLI builds one, checks every flag before the base loads, and the same object
reaches the server and (pickled) every Ray replica."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapterzoo.errors import InvalidConfigError
from adapterzoo.serve.config import ServeConfig
from adapterzoo.serve.server import build_server
from adapterzoo.serve.tenants import Tenants


def test_a_config_survives_pickling_as_ray_sends_it():
    config = ServeConfig(
        base="org/base",
        adapters_dir="adapters",
        keys_file=Path("keys.yaml"),
        max_batch=8,
        registry_endpoint="http://127.0.0.1:9000",
        registry_token="t0ken",
        replicas=2,
    )
    assert pickle.loads(pickle.dumps(config)) == config


def test_a_config_is_frozen():
    config = ServeConfig(base="org/base")
    with pytest.raises(AttributeError):
        config.max_batch = 3  # type: ignore[misc]
    assert config.replace(max_batch=3).max_batch == 3 and config.max_batch == 32


def test_the_registry_token_never_shows_in_the_config_repr():
    assert "t0ken" not in repr(ServeConfig(base="org/base", registry_token="t0ken"))


def test_the_base_name_is_the_base_folders_name_unless_given(tmp_path):
    (tmp_path / "tiny").mkdir()
    assert ServeConfig(base=str(tmp_path / "tiny")).base_name == "tiny"
    assert ServeConfig(base="org/base").base_name == "base" and ServeConfig(base="smollm2").base_name == "smollm2"
    assert ServeConfig(base=str(tmp_path / "tiny"), base_name="mine").base_name == "mine"


def test_paths_given_as_strings_become_paths():
    config = ServeConfig(base="b", adapters_dir="adapters", keys_file="keys.yaml")
    assert config.adapters_dir == Path("adapters") and config.keys_file == Path("keys.yaml")


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("slots", 0, "--slots"),
        ("max_batch", -1, "--max-batch"),
        ("max_queue", "8", "--max-queue"),
        ("port", 70000, "--port"),
        ("default_max_tokens", 0, "--max-tokens"),
        ("replicas", 0, "--replicas"),
        ("body_timeout", 0, "--body-timeout"),
        ("drain_timeout", -1.0, "--drain-timeout"),
        ("dtype", "int8", "--dtype"),
        ("max_body_bytes", True, "--max-body-bytes"),
        ("models_per_replica", 0, "--models-per-replica"),
    ],
)
def test_a_bad_value_is_refused_naming_its_flag(field, value, flag):
    with pytest.raises(InvalidConfigError, match=flag):
        ServeConfig(base="org/base", **{field: value})


def test_an_empty_base_is_refused_with_an_example():
    with pytest.raises(InvalidConfigError, match="BASE is missing.*adapterzoo serve"):
        ServeConfig(base="")


def run_cli(monkeypatch, args: list[str]):
    """`adapterzoo serve ARGS`, stopping at the config `run_serve` would get."""
    from adapterzoo.cli import cli
    from adapterzoo.serve import command

    got: list[ServeConfig] = []
    monkeypatch.setattr(command, "run_serve", got.append)
    return CliRunner().invoke(cli, ["serve", *args]), got


def test_the_cli_builds_one_config_from_its_flags(monkeypatch):
    monkeypatch.delenv("ADAPTERZOO_RAY_MODELS_PER_REPLICA", raising=False)
    result, got = run_cli(
        monkeypatch,
        [
            "org/base",
            "--slots",
            "2",
            "--registry",
            "http://127.0.0.1:9000",
            "--name",
            "b",
            "--max-tokens",
            "7",
            "--adapters",
            "adapters",
        ],
    )
    assert result.exit_code == 0, result.output
    (config,) = got
    assert config == ServeConfig(
        base="org/base",
        base_name="b",
        slots=2,
        registry_endpoint="http://127.0.0.1:9000",
        default_max_tokens=7,
        adapters_dir=Path("adapters"),
    )


def test_the_models_per_replica_come_from_the_flag_or_its_environment_variable(monkeypatch):
    monkeypatch.setenv("ADAPTERZOO_RAY_MODELS_PER_REPLICA", "8")
    assert run_cli(monkeypatch, ["org/base"])[1][0].models_per_replica == 8
    assert run_cli(monkeypatch, ["org/base", "--models-per-replica", "3"])[1][0].models_per_replica == 3


def test_the_cli_refuses_a_bad_flag_before_loading_the_base(monkeypatch):
    result, got = run_cli(monkeypatch, ["org/base", "--slots", "0"])
    assert result.exit_code != 0 and not got
    assert "--slots" in result.output and "Traceback" not in result.output


def test_the_server_and_its_app_share_one_config(tiny_base):
    from adapterzoo import Zoo
    from adapterzoo.serve.http import create_app

    config = ServeConfig(base=str(tiny_base), base_name="tiny", max_batch=3, max_queue=5, default_max_tokens=7)
    server = build_server(Zoo.from_pretrained(tiny_base, device="cpu"), config, tenants=Tenants.open())
    try:
        assert server.config is config and (server.engine.max_batch, server.engine.max_queue) == (3, 5)
        app = create_app(server, admin=False)
        assert app.state.config is config and app.state.engine is server.engine and not app.state.admin_routes
        assert create_app(server).state.admin_routes  # each app has its own state; the server is not changed
    finally:
        server.adapters.close()


def test_build_server_takes_a_config_or_its_fields_not_both():
    with pytest.raises(TypeError, match="not both"):
        build_server(None, ServeConfig(base="b"), max_batch=3)


def test_ray_and_the_command_do_not_import_each_other():
    serve = Path(__file__).resolve().parents[2] / "adapterzoo" / "serve"

    def imported(name: str) -> set[str]:
        tree = ast.parse((serve / f"{name}.py").read_text())
        return {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}

    assert "command" not in imported("ray") and "ray" in imported("command")


def test_a_ray_replica_and_the_ingress_build_from_the_pickled_config(tiny_base):
    """Without Ray: the deployments' classes, given the config as Ray would hand it over."""
    from starlette.testclient import TestClient

    from adapterzoo.serve.ray import Ingress, RemoteEngine, ZooReplica

    config = ServeConfig(base=str(tiny_base), base_name="tiny", slots=2, max_batch=3, max_queue=5, device="cpu")
    sent = pickle.loads(pickle.dumps(config))
    replica = ZooReplica(sent)
    try:
        assert replica.server.config == config and replica.server.engine.running
        assert (replica.server.engine.max_batch, replica.server.engine.max_queue) == (3, 5)
        assert replica.stats()["replica"]
    finally:
        replica.server.engine.stop(drain=False)
        replica.server.adapters.close()
    ingress = Ingress(None, sent)
    assert isinstance(ingress.server.engine, RemoteEngine) and ingress.server.config == config
    client = TestClient(ingress.__serve_build_asgi_app__())
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
    assert client.get("/admin/adapters").status_code == 501  # adapters live in the replicas
