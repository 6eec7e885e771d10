"""One tenant's README can neither freeze the server nor break listing for anyone else.

The attacks of the issue at small sizes: a "billion laughs" alias bomb, a 10 MB YAML list and
front matter nested 5,000 deep. The client checks a README with /api/validate-yaml before it
commits, so the bodies that skip that check are sent as raw NDJSON commits.
"""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from adapterzoo_registry.cards import CardError, parse_front_matter

from .conftest import ALICE_TOKEN, BOB_TOKEN

AUTH = {"authorization": f"Bearer {ALICE_TOKEN}"}
NDJSON = {**AUTH, "content-type": "application/x-ndjson"}


def alias_bomb(levels: int = 9) -> str:
    """The classic ~300-byte "billion laughs": each level names the previous one ten times."""
    names = "abcdefghijklmnop"[:levels]
    lines = [f'{names[0]}: &{names[0]} "lol"']
    lines += [f"{name}: &{name} [{','.join(['*' + previous] * 10)}]" for previous, name in zip(names, names[1:])]
    return "---\n" + "\n".join(lines) + "\n---\n"


def deep_card(depth: int = 5000) -> str:
    return "---\ntags: " + "[" * depth + "]" * depth + "\n---\n# deep\n"


def commit_readme(registry, repo_id: str, readme: str) -> httpx.Response:
    lines = [
        {"key": "header", "value": {"summary": "hostile card"}},
        {"key": "file", "value": {"path": "README.md", "content": base64.b64encode(readme.encode()).decode()}},
    ]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return httpx.post(f"{registry.url}/api/models/{repo_id}/commit/main", headers=NDJSON, content=body, timeout=30)


def test_the_alias_bomb_is_a_real_bomb_for_plain_pyyaml() -> None:
    import yaml

    document = yaml.safe_load(alias_bomb(4).strip("-\n"))  # small enough to expand: 10**3 leaves
    assert len(json.dumps(document)) > 5_000 and len(alias_bomb()) < 400


def test_the_card_parser_refuses_aliases_depth_size_and_node_count() -> None:
    with pytest.raises(CardError, match="aliases"):
        parse_front_matter(alias_bomb())
    with pytest.raises(CardError, match="deeper"):
        parse_front_matter(deep_card())
    with pytest.raises(CardError, match="64 KB"):
        parse_front_matter("---\nnotes: " + "x" * 70_000 + "\n---\n")
    with pytest.raises(CardError, match="values"):
        parse_front_matter("---\nitems: [" + ",".join("1" * 20_000) + "]\n---\n")
    assert parse_front_matter("---\ntags: [a, b]\nlibrary_name: peft\n---\n# ok") == {
        "tags": ["a", "b"],
        "library_name": "peft",
    }


def test_an_alias_bomb_sent_to_validate_yaml_is_refused_at_once(registry) -> None:
    started = time.monotonic()
    reply = httpx.post(f"{registry.url}/api/validate-yaml", headers=AUTH, json={"content": alias_bomb(12)}, timeout=30)
    assert reply.status_code == 400 and "aliases" in reply.json()["error"]
    assert time.monotonic() - started < 2


def test_a_ten_megabyte_yaml_list_is_refused_without_being_parsed(registry) -> None:
    huge = "---\nitems:\n" + "- x\n" * 2_500_000 + "---\n"
    started = time.monotonic()
    reply = httpx.post(f"{registry.url}/api/validate-yaml", headers=AUTH, json={"content": huge}, timeout=60)
    assert reply.status_code == 400 and "64 KB" in reply.json()["error"]
    assert time.monotonic() - started < 5


def test_validate_yaml_needs_a_token(registry) -> None:
    reply = httpx.post(f"{registry.url}/api/validate-yaml", json={"content": "---\na: 1\n---\n"})
    assert reply.status_code == 401


@pytest.mark.parametrize("card", [alias_bomb(12), deep_card(5000)], ids=["alias-bomb", "nested-5000-deep"])
def test_one_hostile_card_never_breaks_listing_for_anyone(registry, alice, bob, anonymous, unique, card: str) -> None:
    hostile, fine = f"alice/hostile-{unique}", f"bob/fine-{unique}"
    alice.create_repo(hostile)
    bob.create_repo(fine)
    bob.upload_file(path_or_fileobj=b"---\ntags: [good]\n---\n", path_in_repo="README.md", repo_id=fine)
    assert commit_readme(registry, hostile, card).status_code == 200

    for caller in (alice, bob, anonymous):
        listed = {model.id: model for model in caller.list_models(search=unique)}
        assert set(listed) == {hostile, fine}
        assert "good" in listed[fine].tags and listed[hostile].tags == []
    info = alice.model_info(hostile)  # the repo itself stays readable; only its card is ignored
    assert [sibling.rfilename for sibling in info.siblings] == ["README.md"]
    assert [model.id for model in bob.list_models(filter="good", search=unique)] == [fine]
    assert httpx.get(f"{registry.url}/api/models", headers={"authorization": f"Bearer {BOB_TOKEN}"}).status_code == 200


def test_card_parsing_runs_off_the_event_loop(tmp_path, monkeypatch) -> None:
    """A slow parse (stood in for by a sleep) must not hold up any other request."""
    import threading

    import uvicorn

    from adapterzoo_registry import app as app_module
    from adapterzoo_registry import create_app

    from .conftest import TOKENS, free_port

    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    monkeypatch.setattr(app_module, "parse_front_matter", lambda text: time.sleep(5) or {})
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(tmp_path / "root", tokens_file=tokens), port=port, log_level="critical")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        slow = threading.Thread(
            target=httpx.post,
            args=(f"{url}/api/validate-yaml",),
            kwargs={"headers": AUTH, "json": {"content": "x"}, "timeout": 30},
        )
        slow.start()
        time.sleep(0.3)
        started = time.monotonic()
        assert httpx.get(f"{url}/api/whoami-v2", headers=AUTH, timeout=30).status_code == 200
        assert time.monotonic() - started < 3  # the parse holds its thread for 5 s
        slow.join()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
