"""Round two of attacks on the hardened registry, each found against a real server and then fixed.

A hostile tenant and a hostile web page, with the official `huggingface_hub` client where it can
send the attack and raw HTTP where it cannot. Sizes are small; every test here failed before its fix.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import time
from html.parser import HTMLParser

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, hf_hub_download

from .conftest import ALICE_TOKEN, BOB_TOKEN

ALICE = {"authorization": f"Bearer {ALICE_TOKEN}"}
BOB = {"authorization": f"Bearer {BOB_TOKEN}"}


def raw_get(server, target: str) -> bytes:
    """GET `target` exactly as written (no client-side normalisation); the whole raw reply."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < reply.index(b"\r\n\r\n") + 4 + _length(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def _length(reply: bytes) -> int:
    match = re.search(rb"(?i)content-length: *(\d+)", reply)
    return int(match.group(1)) if match else 0


# --------------------------------------------------------------------------- error hygiene


@pytest.mark.parametrize("control", ["%00", "%01", "%1B", "%7F"])
def test_a_control_character_in_a_revision_gets_a_clean_404_not_a_dropped_connection(
    registry, alice, unique, control
) -> None:
    repo_id = f"alice/ctl-{unique}"
    alice.create_repo(repo_id)
    for target in (
        f"/api/models/{repo_id}/tree/main{control}",
        f"/{repo_id}/resolve/main{control}/README.md",
        f"/api/models/{repo_id}/revision/main{control}",
    ):
        reply = raw_get(registry, target)
        assert reply.startswith(b"HTTP/1.1 404"), (target, reply[:200])
        assert b"X-Error-Code: RevisionNotFound" in reply or b"x-error-code: RevisionNotFound" in reply


def test_a_tampered_listing_cursor_or_limit_is_a_400_not_a_500(registry) -> None:
    for query in ("cursor=" + "9" * 30, "cursor=\u00b2", "limit=\u00b2", "limit=" + "9" * 5000, "limit=-3"):
        reply = httpx.get(f"{registry.url}/api/models?{query}")
        assert reply.status_code == 400, (query, reply.status_code, reply.text[:200])
        assert "cursor" in reply.json()["error"] or "limit" in reply.json()["error"]
    # A cursor past the end is an empty page, as any client following `Link` could ask for.
    assert httpx.get(f"{registry.url}/api/models?cursor=999999999").json() == []


def test_a_tampered_page_number_on_the_web_page_shows_a_page_not_a_500(registry) -> None:
    for page in ("\u00b2", "9" * 30, "9" * 5000, "-1", "0x10"):
        reply = httpx.get(f"{registry.url}/", params={"page": page})
        assert reply.status_code == 200, (page, reply.status_code)
        assert "adapterzoo registry" in reply.text


# --------------------------------------------------------------------------- web-page-proof writes


def test_validate_yaml_refuses_a_text_plain_body_like_every_other_write(registry) -> None:
    reply = httpx.post(
        f"{registry.url}/api/validate-yaml",
        headers={**ALICE, "content-type": "text/plain"},
        content=json.dumps({"content": "---\nlicense: mit\n---\n"}),
    )
    assert reply.status_code == 415


# --------------------------------------------------------------------------- path tricks


@pytest.mark.parametrize("name", ["resolve", "tree", "commits"])
def test_a_repo_named_like_a_route_word_can_be_downloaded_and_listed(registry, alice, unique, tmp_path, name) -> None:
    # "alice/resolve" puts "/resolve/" twice in /alice/resolve/resolve/main/f.txt: the revision is the
    # part after the repo's own prefix, not after the first "/resolve/".
    repo_id = f"alice/{name}"
    alice.create_repo(repo_id, exist_ok=True)
    alice.upload_file(path_or_fileobj=f"hello {unique}".encode(), path_in_repo="f.txt", repo_id=repo_id)
    assert "f.txt" in alice.list_repo_files(repo_id)
    local = hf_hub_download(repo_id, "f.txt", endpoint=registry.url, token=ALICE_TOKEN, cache_dir=tmp_path)
    assert open(local, "rb").read() == f"hello {unique}".encode()


# --------------------------------------------------------------------------- work an anonymous caller can cause


def test_paths_info_with_more_paths_than_the_limit_is_refused_by_name(registry, alice, unique) -> None:
    # Each asked path used to be compared with every file of the repo, on a public repo, without a
    # token: 100,000 made-up paths against 300 files held a worker for seconds, a full body for minutes.
    repo_id = f"alice/paths-{unique}"
    alice.create_repo(repo_id)
    alice.create_commit(
        repo_id, [CommitOperationAdd(f"d{i}/f.txt", b"x") for i in range(5)], commit_message="files in folders"
    )
    body = "&".join(f"paths=z{i}" for i in range(10_001))
    reply = httpx.post(
        f"{registry.url}/api/models/{repo_id}/paths-info/main", content=body,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert reply.status_code == 400 and "10000 paths" in reply.json()["error"]
    # Within the limit, files and folders are still found (and made-up paths skipped).
    infos = alice.get_paths_info(repo_id, ["d1", "d2/f.txt", "nope", "d"] + [f"z{i}" for i in range(2000)])
    found = sorted((type(info).__name__, info.path) for info in infos)
    assert found == [("RepoFile", "d2/f.txt"), ("RepoFolder", "d1")]


def test_paths_info_on_a_private_repo_is_refused_before_its_body_is_read(registry, alice, unique) -> None:
    repo_id = f"alice/paths-private-{unique}"
    alice.create_repo(repo_id, private=True)
    with socket.create_connection(("127.0.0.1", registry.port), timeout=10) as sock:
        sock.sendall(
            f"POST /api/models/{repo_id}/paths-info/main HTTP/1.1\r\nHost: 127.0.0.1:{registry.port}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 10000000\r\n\r\n".encode()
        )
        reply = sock.recv(65536)  # answered with the body still unsent
    assert reply.startswith(b"HTTP/1.1 404")


def test_a_huge_model_card_is_rendered_truncated_with_a_note(registry, alice, unique) -> None:
    # Rendering a 1 MiB README of "[" took 9 s of CPU on every anonymous page view.
    repo_id = f"alice/bigcard-{unique}"
    alice.create_repo(repo_id)
    readme = "---\nlicense: mit\n---\n# Big\n\n" + "[" * 300_000 + "\n\nTHE-END-MARKER\n"
    alice.upload_file(path_or_fileobj=readme.encode(), path_in_repo="README.md", repo_id=repo_id)
    page = httpx.get(f"{registry.url}/{repo_id}", timeout=60)
    assert page.status_code == 200
    card = page.text.split("<article class=card>", 1)[1].split("</article>", 1)[0]
    assert "# Big" not in card and "<h1>Big</h1>" in card  # rendered, from the top
    assert "THE-END-MARKER" not in card and len(card) < 100_000
    assert "truncated" in page.text


# --------------------------------------------------------------------------- quota


def _usage(root, namespace: str) -> int:
    return sum(path.stat().st_size for path in (root / "models" / namespace).rglob("*") if path.is_file())


def test_commit_messages_count_against_the_namespace_quota(start_server) -> None:
    # Only blobs were counted: commit records, which hold the message, filled the disk past any quota.
    quota = 300_000
    server = start_server(extra_args=("--namespace-quota-bytes", str(quota)))
    api = server.api(ALICE_TOKEN)
    api.create_repo("alice/chatty")
    refused = None
    for number in range(12):
        try:
            api.upload_file(
                path_or_fileobj=f"{number}".encode(), path_in_repo=f"f{number}.txt", repo_id="alice/chatty",
                commit_message="long", commit_description="y" * 60_000,
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - the client wraps the 507 in its own error types
            refused = error
            break
    assert refused is not None and "quota" in str(refused)
    assert _usage(server.root, "alice") <= quota + 64 * 1024  # within one small record of the quota


def test_a_commit_message_longer_than_the_limit_is_refused_by_name(registry, alice, unique) -> None:
    repo_id = f"alice/longmsg-{unique}"
    alice.create_repo(repo_id)
    for summary, description in (("s" * 5_000, ""), ("ok", "d" * 70_000)):
        lines = [
            {"key": "header", "value": {"summary": summary, "description": description}},
            {"key": "file", "value": {"path": "a.txt", "content": base64.b64encode(b"a").decode()}},
        ]
        reply = httpx.post(
            f"{registry.url}/api/models/{repo_id}/commit/main",
            headers={**ALICE, "content-type": "application/x-ndjson"},
            content=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
        )
        assert reply.status_code == 400 and "characters" in reply.json()["error"], reply.text[:200]
    assert alice.list_repo_files(repo_id) == [".gitattributes"] or "a.txt" not in alice.list_repo_files(repo_id)


# --------------------------------------------------------------------------- refs and names


def test_a_branch_cannot_shadow_a_tag_nor_a_tag_a_branch(registry, alice, unique, tmp_path) -> None:
    # Branches resolve before tags, so a branch named "v1.0" silently redirected every
    # `revision="v1.0"` pinned to the tag to whatever the branch holds.
    repo_id = f"alice/shadow-{unique}"
    alice.create_repo(repo_id)
    first = alice.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=repo_id).oid
    alice.create_tag(repo_id, tag="v1.0", revision=first)
    second = alice.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=repo_id).oid
    with pytest.raises(Exception, match="tag"):
        alice.create_branch(repo_id, branch="v1.0", revision=second)
    with pytest.raises(Exception, match="branch"):
        alice.create_tag(repo_id, tag="main", revision=first)
    local = hf_hub_download(
        repo_id, "f.txt", revision="v1.0", endpoint=registry.url, token=ALICE_TOKEN, cache_dir=tmp_path
    )
    assert open(local, "rb").read() == b"v1"
    assert [ref.name for ref in alice.list_repo_refs(repo_id).branches] == ["main"]


@pytest.mark.parametrize("kind", ["branch", "tag"])
def test_ref_names_that_look_like_full_ref_paths_are_refused(alice, unique, kind) -> None:
    # A branch "refs/tags/v2" is listed as refs/heads/refs/tags/v2 and reads like a tag.
    repo_id = f"alice/refpath-{kind}-{unique}"
    alice.create_repo(repo_id)
    for name in ("refs/tags/v2", "refs/heads/dev", "HEAD"):
        with pytest.raises(Exception, match="refs/|HEAD"):
            (alice.create_branch(repo_id, branch=name) if kind == "branch" else alice.create_tag(repo_id, tag=name))


@pytest.mark.parametrize(
    "path",
    ["README\u200b.md", "adapter\u00admodel.safetensors", "\ufeffadapter_config.json", "a\u2060b.bin", "x\u200d.txt"],
)
def test_file_names_with_invisible_characters_are_refused(alice, unique, path) -> None:
    # "README<zero-width space>.md" shows as README.md on the page and in every listing.
    repo_id = f"alice/invisible-{unique}"
    alice.create_repo(repo_id)
    with pytest.raises(Exception, match="invisible"):
        alice.upload_file(path_or_fileobj=b"x", path_in_repo=path, repo_id=repo_id)
    assert path not in alice.list_repo_files(repo_id)


def test_two_paths_that_differ_only_in_unicode_normalization_cannot_coexist(alice, unique) -> None:
    # "café.txt" composed and decomposed are two files here but one on macOS, and look the same everywhere.
    repo_id = f"alice/nfc-{unique}"
    alice.create_repo(repo_id)
    alice.upload_file(path_or_fileobj=b"composed", path_in_repo="caf\u00e9.txt", repo_id=repo_id)
    with pytest.raises(Exception, match="normali"):
        alice.upload_file(path_or_fileobj=b"decomposed", path_in_repo="cafe\u0301.txt", repo_id=repo_id)
    assert [name for name in alice.list_repo_files(repo_id) if name.startswith("caf")] == ["caf\u00e9.txt"]


# --------------------------------------------------------------------------- card bombs


def test_a_nan_or_infinity_in_one_tenants_card_breaks_neither_listing_nor_model_info(registry, bob, anonymous, unique):
    # YAML `.nan` and `.inf` are floats that JSON cannot carry: model_info and every
    # list_models(cardData=True) page holding this repo answered 500, to every caller.
    repo_id = f"bob/nan-{unique}"
    bob.create_repo(repo_id)
    readme = "---\nscore: .nan\nbig: .inf\nmodel-index:\n- results:\n  - metrics:\n    - value: -.inf\n---\nhi\n"
    bob.upload_file(path_or_fileobj=readme.encode(), path_in_repo="README.md", repo_id=repo_id)
    info = anonymous.model_info(repo_id)
    assert info.card_data["score"] == "NaN" and info.card_data["big"] == "Infinity"
    listed = list(anonymous.list_models(search=f"nan-{unique}", cardData=True))
    assert [model.id for model in listed] == [repo_id]


# --------------------------------------------------------------------------- LFS abuse (these held; kept as guards)


def _batch(server, repo_id: str, token_headers: dict, data: bytes) -> dict:
    reply = httpx.post(
        f"{server.url}/{repo_id}.git/info/lfs/objects/batch",
        headers={**token_headers, "content-type": "application/vnd.git-lfs+json"},
        json={"operation": "upload", "objects": [{"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}]},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["objects"][0]


def _lfs_commit(server, repo_id: str, token_headers: dict, data: bytes) -> httpx.Response:
    lines = [
        {"key": "header", "value": {"summary": "point at an object"}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": hashlib.sha256(data).hexdigest(),
                                     "size": len(data)}},
    ]  # fmt: skip
    return httpx.post(
        f"{server.url}/api/models/{repo_id}/commit/main",
        headers={**token_headers, "content-type": "application/x-ndjson"},
        content=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
    )


def test_another_tenants_lfs_object_can_be_neither_committed_nor_verified_by_its_hash(registry, alice, bob, unique):
    secret = b"alice's private weights " + unique.encode()
    alice.create_repo(f"alice/lfs-secret-{unique}", private=True)
    alice.upload_file(path_or_fileobj=secret, path_in_repo="w.bin", repo_id=f"alice/lfs-secret-{unique}")
    bob.create_repo(f"bob/lfs-thief-{unique}")
    reply = _lfs_commit(registry, f"bob/lfs-thief-{unique}", BOB, secret)
    assert reply.status_code == 400 and "never uploaded" in reply.json()["error"]
    verify = httpx.post(
        f"{registry.url}/bob/lfs-thief-{unique}.git/info/lfs/objects/verify",
        headers={**BOB, "content-type": "application/json"},
        json={"oid": hashlib.sha256(secret).hexdigest(), "size": len(secret)},
    )
    assert verify.status_code == 404
    # And batch still asks bob for the bytes: it never says the object is already there.
    assert "upload" in _batch(registry, f"bob/lfs-thief-{unique}", BOB, secret)["actions"]


def test_a_signed_upload_url_works_only_for_its_repo_and_object(registry, alice, bob, unique) -> None:
    alice.create_repo(f"alice/lfs-target-{unique}", private=True)
    bob.create_repo(f"bob/lfs-own-{unique}")
    data = b"bob's bytes " + unique.encode()
    href = _batch(registry, f"bob/lfs-own-{unique}", BOB, data)["actions"]["upload"]["href"]
    moved = href.replace(f"/bob/lfs-own-{unique}.git", f"/alice/lfs-target-{unique}.git")
    assert httpx.put(moved, content=data).status_code == 400
    other = bytes(reversed(data))
    swapped = href.replace(hashlib.sha256(data).hexdigest(), hashlib.sha256(other).hexdigest())
    assert httpx.put(swapped, content=other).status_code == 400
    assert httpx.put(href + "&size=1", content=data[:1]).status_code == 400
    assert httpx.put(href, content=data).status_code == 200
    assert httpx.put(href, content=data).status_code == 200  # reuse: the same bytes again, harmless
    stolen = registry.root / "models" / "alice" / f"lfs-target-{unique}" / "blobs" / hashlib.sha256(data).hexdigest()
    assert not stolen.exists()


def test_an_upload_cut_mid_put_keeps_nothing_and_the_server_answers_the_next_one(registry, alice, unique) -> None:
    repo_id = f"alice/lfs-cut-{unique}"
    alice.create_repo(repo_id)
    data = bytes(range(256)) * 4096  # 1 MiB
    href = _batch(registry, repo_id, ALICE, data)["actions"]["upload"]["href"]
    target = href.split(str(registry.port), 1)[1]
    with socket.create_connection(("127.0.0.1", registry.port), timeout=10) as sock:
        sock.sendall(
            f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1:{registry.port}\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data[: len(data) // 2]
        )
    # The object never became visible, and a proper upload afterwards lands.
    assert _lfs_commit(registry, repo_id, ALICE, data).status_code == 400
    assert httpx.put(href, content=data).status_code == 200
    assert _lfs_commit(registry, repo_id, ALICE, data).status_code == 200


def test_a_commit_with_more_operations_than_the_limit_is_refused_by_name(registry, alice, unique) -> None:
    # 40,000 empty files in a 2.4 MB body held a decoding slot for 17 s; the 512 MiB body limit
    # allowed millions of them, each a staged file and a commit-record entry in memory.
    repo_id = f"alice/manyops-{unique}"
    alice.create_repo(repo_id)
    lines = [{"key": "header", "value": {"summary": "too many"}}]
    lines += [{"key": "deletedFolder", "value": {"path": f"d{number}"}} for number in range(25_001)]
    reply = httpx.post(
        f"{registry.url}/api/models/{repo_id}/commit/main",
        headers={**ALICE, "content-type": "application/x-ndjson"},
        content=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
        timeout=60,
    )
    assert reply.status_code == 400 and "25000 operations" in reply.json()["error"]
    assert len(alice.list_repo_commits(repo_id)) == 1


# --------------------------------------------------------------------------- the web page (these held; kept as guards)


def test_card_links_with_script_schemes_are_never_rendered_as_links(registry, bob, unique) -> None:
    repo_id = f"bob/links-{unique}"
    bob.create_repo(repo_id)
    readme = (
        "---\ntags:\n- '<script>alert(1)</script>'\nadapterzoo:\n  type: '<img src=x onerror=alert(1)>'\n---\n"
        "[a](javascript:alert(1)) [b](JAVASCRIPT:alert(1)) [c](&#106;avascript:alert(1)) [d](vbscript:x)\n"
        "[e](data:text/html;base64,PHNjcmlwdD4=) ![i](javascript:alert(1)) <a href='javascript:alert(3)'>x</a>\n"
        "<script>alert(2)</script> [f]\n\n[f]: javascript:alert(4)\n"
    )
    bob.upload_file(path_or_fileobj=readme.encode(), path_in_repo="README.md", repo_id=repo_id)
    page = httpx.get(f"{registry.url}/{repo_id}").text
    links, tags = _links_and_tags(page)
    assert "/" in links and not [link for link in links if re.match(r"(?i)\s*(javascript|vbscript|data):", link)]
    assert "script" not in tags and "img" not in tags  # the injected ones stayed text


def _links_and_tags(page: str) -> tuple[list[str], set[str]]:
    """Every href/src of a real element of `page`, and the element names: what a browser would act on."""
    found: tuple[list[str], set[str]] = ([], set())

    class Collector(HTMLParser):
        def handle_starttag(self, tag, attrs) -> None:
            found[1].add(tag)
            found[0].extend(value or "" for name, value in attrs if name in ("href", "src", "action"))

    Collector().feed(page)
    return found


def test_a_token_given_to_the_page_never_lands_in_a_url(registry, alice, unique) -> None:
    for number in range(3):
        alice.create_repo(f"alice/tokenpage-{unique}-{number}", private=True)
    page = httpx.post(
        f"{registry.url}/", data={"token": ALICE_TOKEN, "q": f"tokenpage-{unique}"},
        headers={"origin": registry.url},
    ).text  # fmt: skip
    assert f"tokenpage-{unique}-0" in page
    for tag in re.findall(r"<(?:a|form|img|link)\b[^>]*>", page, flags=re.IGNORECASE):
        assert ALICE_TOKEN not in tag, tag
        if tag.lower().startswith("<form"):
            assert "method=post" in tag.lower(), tag


# --------------------------------------------------------------------------- Host, Origin, content type (held)


def test_content_types_are_judged_by_their_media_type_alone(registry, alice, unique) -> None:
    repo_id = f"alice/ctype-{unique}"
    url = f"{registry.url}/api/models/{repo_id}/branch/dev-{unique}"
    alice.create_repo(repo_id)
    for disguised in ("text/plain; x=application/json", "text/plain, application/json", "application/json5",
                      "application/jsonp", "multipart/form-data; boundary=application/json"):  # fmt: skip
        assert httpx.post(url, headers={**ALICE, "content-type": disguised}, content="{}").status_code == 415, disguised
    reply = httpx.post(url, headers={**ALICE, "content-type": "Application/JSON; Charset=UTF-8"}, content="{}")
    assert reply.status_code == 200


def test_missing_wrong_or_tricky_host_and_origin_headers_are_refused(registry, alice, unique) -> None:
    repo_id = f"alice/origin-{unique}"
    alice.create_repo(repo_id)
    url = f"{registry.url}/api/models/{repo_id}/branch/o-{unique}"
    json_type = {"content-type": "application/json"}
    for origin in ("null", "http://127.0.0.1.evil.example", f"http://127.0.0.1:{registry.port}@evil.example",
                   f"http://127.0.0.1:{registry.port + 1}", "file://"):  # fmt: skip
        reply = httpx.post(url, headers={**ALICE, **json_type, "origin": origin}, content="{}")
        assert reply.status_code == 403, origin
    for host in ("evil.example", "127.0.0.1.nip.io", "localhost.", ""):
        with socket.create_connection(("127.0.0.1", registry.port), timeout=10) as sock:
            sock.sendall(f"GET /api/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 421"), host
    assert alice.list_repo_refs(repo_id).branches[0].name == "main"
    assert len(alice.list_repo_refs(repo_id).branches) == 1


# --------------------------------------------------------------------------- disk a tenant can fill


def test_big_commit_bodies_are_received_a_bounded_number_at_a_time(start_server, unique) -> None:
    # Inline commit bodies were streamed to tmp/ with no bound on how many at once, outside any quota:
    # one tenant opening many slow uploads could fill the disk under every other tenant.
    server = start_server(extra_args=("--max-concurrent-uploads", "1", "--upload-queue-seconds", "1"))
    server.api(ALICE_TOKEN).create_repo(f"alice/slow-{unique}")
    head = (
        f"POST /api/models/alice/slow-{unique}/commit/main HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {ALICE_TOKEN}\r\nContent-Type: application/x-ndjson\r\n"
        "Content-Length: 3000000\r\n\r\n"
    ).encode()
    first = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    try:
        first.sendall(head + b'{"key": "header"')  # the first upload holds the only slot, and stalls
        deadline = time.monotonic() + 20
        while not list((server.root / "tmp").glob("*.ndjson")) and time.monotonic() < deadline:
            time.sleep(0.05)  # until the server is receiving it
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as second:
            second.sendall(head + b'{"key": "header"')
            reply = second.recv(65536)
        assert reply.startswith(b"HTTP/1.1 503") and b"retry-after" in reply.lower()
        assert len(list((server.root / "tmp").glob("*.ndjson"))) == 1
    finally:
        first.close()
    # A small commit is never made to wait behind big ones.
    api = server.api(ALICE_TOKEN)
    small = api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=f"alice/slow-{unique}")
    assert small.oid


# --------------------------------------------------------------------------- JSON types


@pytest.mark.parametrize("gated", [0, "", [], {}, "false", "auto"])
def test_gated_must_be_the_boolean_false_not_something_equal_to_it(registry, alice, unique, gated) -> None:
    # `0 in (None, False)` is true in Python: `"gated": 0` was taken for `false`.
    repo_id = f"alice/gated-{unique}"
    alice.create_repo(repo_id, exist_ok=True)
    reply = httpx.put(
        f"{registry.url}/api/models/{repo_id}/settings", headers={**ALICE, "content-type": "application/json"},
        json={"gated": gated, "private": True},
    )  # fmt: skip
    assert reply.status_code == 400 and "gated" in reply.json()["error"]
    assert alice.model_info(repo_id).private is False  # nothing of the request was applied
