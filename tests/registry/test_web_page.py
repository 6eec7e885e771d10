"""The browsable page (GET /) in a real headless Chromium, driven by Playwright.

Debian's `chromium` is used (`executable_path`), since Playwright's own browser download is not
reachable; scripts/setup.sh installs it. Set ADAPTERZOO_UPDATE_SCREENSHOT=1 to refresh
docs/registry-page.png from this test.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.sync_api import sync_playwright

from .conftest import ALICE_TOKEN, REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = REPO_ROOT / "docs" / "registry-page.png"
FINGERPRINT = "3f9a1c0de4b27781"

CARD = f"""---
library_name: adapterzoo
tags: [adapterzoo, "adapterzoo-type:lora", "base-fingerprint:{FINGERPRINT}", sql]
adapterzoo:
  type: lora
  format: native
  base_fingerprint: {FINGERPRINT}
  config: {{r: 8}}
---
# lora-sql

Turns questions into **SQL**. <script>window.__pwned = "script"</script>
<img src=x onerror="window.__pwned = 'img'">

[a link](javascript:window.__pwned='link')

| metric | value |
| --- | --- |
| exact match | 0.81 |
"""


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def published(start_server):
    server = start_server()
    alice = server.api(ALICE_TOKEN)
    alice.create_repo("alice/lora-sql")
    alice.upload_file(path_or_fileobj=os.urandom(3000), path_in_repo="adapter.safetensors", repo_id="alice/lora-sql")
    alice.upload_file(path_or_fileobj=CARD.encode(), path_in_repo="README.md", repo_id="alice/lora-sql",
                      commit_message="Card <script>window.__pwned='commit'</script>")  # fmt: skip
    alice.upload_file(path_or_fileobj=b"{}", path_in_repo="<b>odd</b>.json", repo_id="alice/lora-sql")
    alice.create_branch("alice/lora-sql", branch="exp/wider")
    alice.create_tag("alice/lora-sql", tag="v1.0")
    alice.create_repo("alice/secret-adapter", private=True)
    alice.upload_file(path_or_fileobj=b"---\ntags: [internal]\n---\n# secret", path_in_repo="README.md",
                      repo_id="alice/secret-adapter")  # fmt: skip
    return server


def test_the_page_lists_visible_repos_and_a_token_reveals_private_ones(browser, published, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(published.url + "/")
    rows = page.locator("table.repos tbody tr")
    assert rows.count() == 1 and "alice/lora-sql" in rows.first.inner_text()
    assert "lora" in rows.first.locator(".adapter-type").inner_text()
    assert FINGERPRINT in rows.first.locator(".fingerprint").inner_text()
    assert "secret-adapter" not in page.content()

    page.fill("input[name=token]", ALICE_TOKEN)
    page.click("form.token button[type=submit]")
    assert page.locator("table.repos tbody tr").count() == 2
    assert "alice/secret-adapter" in page.locator("table.repos").inner_text()
    assert ALICE_TOKEN not in page.url

    page.click("button.link:has-text('alice/lora-sql')")
    assert page.locator("main > h1").inner_text().startswith("alice/lora-sql")
    assert page.locator("dd.adapter-type").inner_text() == "lora"
    assert page.locator("dd.fingerprint").inner_text() == FINGERPRINT
    files = page.locator("table.files").inner_text()
    assert "adapter.safetensors" in files and "2.9 KB" in files and "<b>odd</b>.json" in files
    assert "exp/wider" in page.locator("ul.branches").inner_text() and "v1.0" in page.locator("ul.tags").inner_text()
    assert "Card <script>" in page.locator("ol.commits").inner_text()
    card = page.locator("article.card")
    assert card.locator("strong").inner_text() == "SQL" and "exact match" in card.locator("table").inner_text()
    assert "<script>" in card.inner_text()  # shown as text, not run
    if card.locator("a").count():
        assert not (card.locator("a").first.get_attribute("href") or "").startswith("javascript:")
        card.locator("a").first.click()
    assert page.evaluate("window.__pwned") is None and dialogs == []
    page.screenshot(path=str(tmp_path / "repo.png"), full_page=True)

    page.goto(published.url + "/")
    page.fill("input[name=token]", ALICE_TOKEN)
    page.click("form.token button[type=submit]")
    page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
    if os.environ.get("ADAPTERZOO_UPDATE_SCREENSHOT"):
        shutil.copyfile(tmp_path / "repo.png", SCREENSHOT)
        shutil.copyfile(tmp_path / "index.png", SCREENSHOT.with_name("registry-index.png"))


def test_the_page_works_without_javascript(browser, published) -> None:
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    page.goto(published.url + "/")
    page.fill("input[name=token]", ALICE_TOKEN)
    page.click("form.token button[type=submit]")
    assert "alice/secret-adapter" in page.locator("table.repos").inner_text()
    page.goto(published.url + "/alice/secret-adapter")
    assert page.locator("main > h1").inner_text() == "Not found"  # no token carried in a URL
    context.close()


def test_a_wrong_token_is_said_plainly(browser, published) -> None:
    page = browser.new_page()
    page.goto(published.url + "/")
    page.fill("input[name=token]", "hf_not_a_token")
    page.click("form.token button[type=submit]")
    assert "not valid" in page.locator("form.token").inner_text()
    assert "secret-adapter" not in page.content()


def test_the_page_searches_and_pages_through_many_repos(browser, start_server) -> None:
    server = start_server()
    alice = server.api(ALICE_TOKEN)
    for index in range(105):
        alice.create_repo(f"alice/many-{index:03d}", private=index == 104)
    page = browser.new_page()
    page.goto(server.url + "/")
    assert page.locator("table.repos tbody tr").count() == 100
    page.click("p.pages a:has-text('next')")
    assert page.locator("table.repos tbody tr").count() == 4  # the private one is not shown
    page.fill("input[name=q]", "many-10")
    page.fill("input[name=token]", ALICE_TOKEN)
    page.click("form.token button[type=submit]")
    names = page.locator("table.repos").inner_text()
    assert page.locator("table.repos tbody tr").count() == 5 and "alice/many-104" in names
    page.fill("input[name=q]", "many-104")
    page.click("form.token button[type=submit]")  # the token stays in its box
    assert page.locator("table.repos tbody tr").count() == 1
    page.goto(server.url + "/?q=" + quote("<b id=injected>x</b>"))
    assert page.locator("#injected").count() == 0 and "<b id=injected>" in page.locator("p.muted").inner_text()
