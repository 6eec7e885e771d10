"""Push and pull against the real registry (a subprocess on 127.0.0.1), with the official
`huggingface_hub` client and adapterzoo's push/pull only: every adapter type round trip, model
cards and tags, revisions and branches, private repos and tenants, tokens, the fingerprint check,
the CLI, and a download cut off halfway."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import HfApi

from adapterzoo.cli import cli
from adapterzoo.errors import AdapterFileError, BaseMismatchError, HubError
from adapterzoo.hub import parse_model_card
from adapterzoo.testing.models import output, perturb, tiny_zoo

from .conftest import ALICE_TOKEN, BOB_TOKEN, READER_TOKEN

TYPES = {
    "lora": {"r": 4, "init_lora_weights": False},
    "houlsby": {"bottleneck": 4},
    "prefix": {"num_virtual_tokens": 3},
    "soft_prompt": {"num_virtual_tokens": 2},
    "bitfit": {},
    "adapterbias": {},
}
IDS = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def _zoo_with(type_name: str, seed: int = 0, base_seed: int = 0):
    zoo = tiny_zoo("llama", seed=base_seed)
    zoo.add_adapter("a", type_name, trainable=False, **TYPES[type_name])
    perturb(zoo, "a", seed=seed)
    return zoo


def _out(zoo, name: str = "a") -> torch.Tensor:
    with torch.no_grad():
        return output(zoo(IDS, adapters=[name, None]))[0]


@pytest.mark.parametrize("type_name", TYPES)
def test_every_type_round_trips_with_a_model_card(registry, alice: HfApi, unique: str, type_name: str) -> None:
    zoo = _zoo_with(type_name)
    repo_id = f"alice/{type_name}-{unique}"
    info = zoo.push_to_hub(
        "a", repo_id, token=ALICE_TOKEN, endpoint=registry.url, metadata={"metrics": {"accuracy": 0.75}}
    )
    assert info.oid and repo_id in info.commit_url

    fresh = tiny_zoo("llama")
    loaded = fresh.load_adapter("mine", repo_id, token=ALICE_TOKEN, endpoint=registry.url)
    assert loaded.type == type_name and loaded.config == zoo.adapters["a"].config
    torch.testing.assert_close(_out(fresh, "mine"), _out(zoo), atol=0, rtol=0)

    model = alice.model_info(repo_id)
    assert {"adapterzoo", f"adapterzoo-type:{type_name}", f"base-fingerprint:{zoo.fingerprint.id}"} <= set(model.tags)
    assert model.library_name == "adapterzoo"
    readme = Path(alice.hf_hub_download(repo_id, "README.md")).read_text()
    card = parse_model_card(readme)
    assert card["type"] == type_name and card["base_fingerprint"] == zoo.fingerprint.id
    assert card["config"] == zoo.adapters["a"].config and card["metrics"] == {"accuracy": 0.75}
    assert "## Metrics" in readme and "| accuracy | 0.75 |" in readme
    found = [
        m.id
        for m in alice.list_models(filter=[f"adapterzoo-type:{type_name}", f"base-fingerprint:{zoo.fingerprint.id}"])
    ]
    assert repo_id in found


def test_peft_format_push_and_format_switch(registry, alice: HfApi, unique: str) -> None:
    zoo = _zoo_with("lora")
    repo_id = f"alice/peft-{unique}"
    zoo.push_to_hub(
        "a", repo_id, token=ALICE_TOKEN, endpoint=registry.url, format="peft", metadata={"metrics": {"f1": 0.5}}
    )
    assert set(alice.list_repo_files(repo_id)) - {".gitattributes"} == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert {"peft", "adapterzoo-type:lora", f"base-fingerprint:{zoo.fingerprint.id}"} <= set(
        alice.model_info(repo_id).tags
    )
    card = parse_model_card(Path(alice.hf_hub_download(repo_id, "README.md")).read_text())
    assert card["format"] == "peft" and card["metrics"] == {"f1": 0.5} and card["config"]["peft_type"] == "LORA"
    fresh = tiny_zoo("llama")
    fresh.load_adapter("p", repo_id, token=ALICE_TOKEN, endpoint=registry.url)
    torch.testing.assert_close(_out(fresh, "p"), _out(zoo), atol=0, rtol=0)

    zoo.push_to_hub("a", repo_id, token=ALICE_TOKEN, endpoint=registry.url)  # native now: PEFT files go
    assert "adapter_model.safetensors" not in alice.list_repo_files(repo_id)
    assert "adapterzoo_model.safetensors" in alice.list_repo_files(repo_id)


def test_revisions_and_branches(registry, unique: str) -> None:
    repo_id = f"alice/revisions-{unique}"
    zoo = _zoo_with("lora", seed=1)
    first = zoo.push_to_hub("a", repo_id, token=ALICE_TOKEN, endpoint=registry.url)
    v1 = _out(zoo)
    perturb(zoo, "a", seed=2)
    second = zoo.push_to_hub("a", repo_id, token=ALICE_TOKEN, endpoint=registry.url, commit_message="v2")
    v2 = _out(zoo)
    perturb(zoo, "a", seed=3)
    zoo.push_to_hub("a", repo_id, token=ALICE_TOKEN, endpoint=registry.url, revision="dev")
    v3 = _out(zoo)
    assert first.oid != second.oid

    fresh = tiny_zoo("llama")
    for name, revision, expected in [
        ("one", first.oid, v1),
        ("two", None, v2),
        ("main", "main", v2),
        ("dev", "dev", v3),
    ]:
        fresh.load_adapter(name, repo_id, revision=revision, token=ALICE_TOKEN, endpoint=registry.url)
        torch.testing.assert_close(_out(fresh, name), expected, atol=0, rtol=0, msg=name)
    with pytest.raises(HubError, match="revision 'nope' does not exist"):
        fresh.load_adapter("x", repo_id, revision="nope", token=ALICE_TOKEN, endpoint=registry.url)


def test_private_adapter_and_a_second_tenant(registry, alice: HfApi, bob: HfApi, unique: str) -> None:
    repo_id = f"alice/private-{unique}"
    zoo = _zoo_with("houlsby")
    zoo.push_to_hub("a", repo_id, private=True, token=ALICE_TOKEN, endpoint=registry.url)
    assert alice.model_info(repo_id).private
    head = alice.model_info(repo_id).sha

    fresh = tiny_zoo("llama")
    for token in (False, BOB_TOKEN):  # anonymous, and another tenant: not even visible
        with pytest.raises(HubError, match="not found.*private"):
            fresh.load_adapter("x", repo_id, token=token, endpoint=registry.url)
    assert repo_id not in [m.id for m in bob.list_models(author="alice")]
    fresh.load_adapter("read", repo_id, token=READER_TOKEN, endpoint=registry.url)  # a token with read on alice
    torch.testing.assert_close(_out(fresh, "read"), _out(zoo), atol=0, rtol=0)
    with pytest.raises(HubError, match="not found"):  # now in this machine's cache: the server's "no" still wins
        fresh.load_adapter("y", repo_id, token=BOB_TOKEN, endpoint=registry.url)

    intruder = _zoo_with("houlsby", seed=9)
    with pytest.raises(HubError, match="403|may not write"):
        intruder.push_to_hub("a", repo_id, token=BOB_TOKEN, endpoint=registry.url)
    with pytest.raises(HubError):
        intruder.push_to_hub("a", repo_id, token=READER_TOKEN, endpoint=registry.url)  # read is not write
    assert alice.model_info(repo_id).sha == head
    assert fresh.adapters.keys() == {"read"}


def test_wrong_or_missing_token(registry, unique: str) -> None:
    repo_id = f"alice/tokens-{unique}"
    zoo = _zoo_with("lora")
    with pytest.raises(HubError, match="401|refused the token"):
        zoo.push_to_hub("a", repo_id, token=False, endpoint=registry.url)
    with pytest.raises(HubError, match="refused the token"):
        zoo.push_to_hub("a", repo_id, token="hf_not_a_real_token", endpoint=registry.url)
    zoo.push_to_hub("a", repo_id, token=ALICE_TOKEN, endpoint=registry.url)
    with pytest.raises(HubError, match="refused the token"):
        tiny_zoo("llama").load_adapter("a", repo_id, token="hf_not_a_real_token", endpoint=registry.url)
    tiny_zoo("llama").load_adapter("a", repo_id, token=False, endpoint=registry.url)  # public: no token needed


def test_adapter_for_another_base_fails_with_the_fingerprint_error(registry, unique: str) -> None:
    repo_id = f"alice/fingerprint-{unique}"
    _zoo_with("lora").push_to_hub("a", repo_id, token=ALICE_TOKEN, endpoint=registry.url)
    other = tiny_zoo("llama", seed=1)
    with pytest.raises(BaseMismatchError, match="another base"):
        other.load_adapter("a", repo_id, endpoint=registry.url)
    assert other.adapters == {}


def test_endpoint_from_hf_endpoint(registry, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", registry.url)
    repo_id = f"alice/env-{unique}"
    zoo = _zoo_with("prefix")
    zoo.push_to_hub("a", repo_id, token=ALICE_TOKEN)
    fresh = tiny_zoo("llama")
    fresh.load_adapter("a", repo_id)
    torch.testing.assert_close(_out(fresh), _out(zoo), atol=0, rtol=0)


def test_cli_push_and_pull(
    registry, alice: HfApi, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zoo = _zoo_with("soft_prompt")
    folder = zoo.save_adapter("a", tmp_path / "saved", metadata={"metrics": {"loss": 0.5}})
    repo_id = f"alice/cli-{unique}"
    runner = CliRunner()
    pushed = runner.invoke(
        cli,
        [
            "push",
            str(folder),
            repo_id,
            "--private",
            "--token",
            ALICE_TOKEN,
            "--endpoint",
            registry.url,
            "--branch",
            "main",
            "-m",
            "first",
        ],
    )
    assert pushed.exit_code == 0, pushed.output
    assert alice.model_info(repo_id).private
    assert [c.title for c in alice.list_repo_commits(repo_id)][0] == "first"

    monkeypatch.setenv("HF_ENDPOINT", registry.url)  # --endpoint falls back to HF_ENDPOINT
    pulled = runner.invoke(cli, ["pull", repo_id, str(tmp_path / "pulled"), "--token", ALICE_TOKEN])
    assert pulled.exit_code == 0, pulled.output
    assert {p.name for p in (tmp_path / "pulled").iterdir()} >= {
        "adapterzoo_config.json",
        "adapterzoo_model.safetensors",
        "README.md",
    }
    fresh = tiny_zoo("llama")
    fresh.load_adapter("a", tmp_path / "pulled")
    torch.testing.assert_close(_out(fresh), _out(zoo), atol=0, rtol=0)
    assert parse_model_card((tmp_path / "pulled" / "README.md").read_text())["metrics"] == {"loss": 0.5}

    again = runner.invoke(cli, ["pull", repo_id, str(tmp_path / "pulled"), "--token", ALICE_TOKEN])
    assert again.exit_code != 0 and "not empty" in again.output
    denied = runner.invoke(cli, ["pull", repo_id, str(tmp_path / "other"), "--token", BOB_TOKEN])
    assert denied.exit_code != 0 and "not found" in denied.output and not (tmp_path / "other").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapterzoo_config.json").write_text("{")
    refused = runner.invoke(cli, ["push", str(broken), f"alice/broken-{unique}", "--token", ALICE_TOKEN])
    assert refused.exit_code != 0 and "not valid JSON" in refused.output


# ------------------------------------------------------------------------ a download cut off halfway


class CuttingProxy(http.server.ThreadingHTTPServer):
    """A reverse proxy on 127.0.0.1 in front of the registry. While `cutting`, the first download
    of the weights file gets its headers and half its bytes, then the connection drops; further
    tries at it get 503 (so the client gives up instead of resuming)."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream
        self.cutting = True
        self.cuts = 0
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: CuttingProxy

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._forward(send_body=False)

    def do_GET(self) -> None:
        self._forward(send_body=True)

    def _forward(self, send_body: bool) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "accept-encoding")}
        headers["accept-encoding"] = "identity"
        reply = httpx.request(
            self.command, self.server.upstream + self.path, headers=headers, follow_redirects=False, timeout=30
        )
        weights = send_body and self.path.endswith("/adapterzoo_model.safetensors") and reply.status_code in (200, 206)
        if weights and self.server.cutting and self.server.cuts > 0:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(reply.status_code)
        for key, value in reply.headers.items():
            if key.lower() not in (
                "connection",
                "transfer-encoding",
                "content-encoding",
                "keep-alive",
                "date",
                "server",
            ):
                self.send_header(key, value)
        self.end_headers()
        if not send_body:
            return
        body = reply.content
        if weights and self.server.cutting:
            self.server.cuts += 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def cutting_proxy(registry):
    proxy = CuttingProxy(registry.url)
    proxy.thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()
    proxy.thread.join(timeout=10)


def test_download_cut_off_halfway_leaves_nothing_broken(
    registry, cutting_proxy: CuttingProxy, unique: str, _fresh_hf_cache: Path
) -> None:
    repo_id = f"alice/cut-{unique}"
    zoo = _zoo_with("houlsby")
    zoo.push_to_hub("a", repo_id, token=ALICE_TOKEN, endpoint=registry.url)

    fresh = tiny_zoo("llama")
    with pytest.raises(HubError, match="could not download"):
        fresh.load_adapter("a", repo_id, endpoint=cutting_proxy.url)
    assert cutting_proxy.cuts == 1, "the proxy should have cut the weights download"
    assert fresh.adapters == {}
    snapshots = list((_fresh_hf_cache / "hub").glob("models--alice--cut-*/snapshots/*/adapterzoo_model.safetensors"))
    assert snapshots == [], "no half-downloaded weights may appear in a snapshot"

    cutting_proxy.cutting = False
    fresh.load_adapter("a", repo_id, endpoint=cutting_proxy.url)
    torch.testing.assert_close(_out(fresh), _out(zoo), atol=0, rtol=0)
    assert not list((_fresh_hf_cache / "hub").rglob("*.incomplete"))


def test_pull_refuses_a_corrupt_upload(registry, alice: HfApi, unique: str, tmp_path: Path) -> None:
    """An adapter whose weights do not match its config's checksum never lands in OUT_DIR."""
    repo_id = f"alice/corrupt-{unique}"
    zoo = _zoo_with("lora")
    folder = zoo.save_adapter("a", tmp_path / "saved")
    record = json.loads((folder / "adapterzoo_config.json").read_text())
    record["weights"]["sha256"] = "0" * 64
    alice.create_repo(repo_id)
    alice.upload_file(
        path_or_fileobj=json.dumps(record).encode(), path_in_repo="adapterzoo_config.json", repo_id=repo_id
    )
    alice.upload_file(
        path_or_fileobj=str(folder / "adapterzoo_model.safetensors"),
        path_in_repo="adapterzoo_model.safetensors",
        repo_id=repo_id,
    )
    from adapterzoo.hub import pull_adapter

    with pytest.raises(AdapterFileError, match="checksum"):
        pull_adapter(repo_id, tmp_path / "out", endpoint=registry.url)
    assert not (tmp_path / "out").exists()
    with pytest.raises(AdapterFileError, match="checksum"):
        tiny_zoo("llama").load_adapter("a", repo_id, endpoint=registry.url)


def test_card_record_reads_the_base_of_a_foreign_folder_and_tolerates_an_odd_entry(tmp_path: Path) -> None:
    """The model card takes the base fingerprint from the metadata adapterzoo adds to foreign files
    (parsed as the loader parses it); an entry that is not a JSON object gives no fingerprint."""
    from safetensors.torch import load_file, save_file

    from adapterzoo.formats import _common
    from adapterzoo.hub import card_record

    zoo = _zoo_with("lora")
    folder = zoo.save_adapter("a", tmp_path / "peft", format="peft")
    record = card_record(folder)
    assert record["format"] == "peft" and record["type"] == "lora" and record["base_fingerprint"] == zoo.fingerprint.id
    weights = folder / "adapter_model.safetensors"
    meta = _common.safetensors_metadata(weights)
    save_file(load_file(weights), weights, metadata={**meta, _common.META_BASE: "[1, 2]"})
    assert card_record(folder)["base_fingerprint"] is None
