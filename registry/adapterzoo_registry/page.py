"""The web page for people who browse the registry: `GET /` and `GET /{namespace}/{name}`.

Server-rendered HTML with no JavaScript at all, so it works with scripts off. Everything a
tenant wrote (repo names, card text, file names, commit messages, branch and tag names) is
escaped; the card's Markdown is rendered by markdown-it with raw HTML turned off, which also
refuses `javascript:` links. The page sets a Content-Security-Policy that forbids scripts, so
even a mistake in escaping could not run one.

Private repos: the token box POSTs the token (a same-origin form; the guard checks the Origin)
and the page is rendered for that caller. The token is carried to the repo pages by small
forms, never put in a URL (where it would land in logs and history) or in a cookie.
"""

from __future__ import annotations

import re
from html import escape
from itertools import islice
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from markdown_it import MarkdownIt
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse

from .auth import Principal, Unauthorized
from .cards import CardReader, ModelCard
from .storage import DEFAULT_BRANCH, BoundedCache, RegistryError, RepoId, RepoNotFound

MAX_FORM_BYTES = 8 * 1024
PAGE_REPOS = 100
PAGE_COMMITS = 20
MAX_RENDERED_CARD_CHARS = 64 * 1024
# Rendered cards, by (registry root, repo, commit id): commits never change, so neither does their card.
# Few entries: a hostile table renders to ~700 KB of HTML from a few KB of Markdown.
_RENDERED_CARDS: BoundedCache[tuple[str, str, str], str] = BoundedCache(200)
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; base-uri 'none'"


async def index(request: Request) -> HTMLResponse:
    """The repos this caller may see (searchable, 100 a page), with type, base fingerprint and tags."""
    registry = request.app.state.registry
    fields = await _form_fields(request)
    token, principal, problem = _caller(request, fields)
    search = fields.get("q", request.query_params.get("q", "")).strip()
    page_text = fields.get("page", request.query_params.get("page", "1"))
    # ASCII digits only, and few of them: "²" passes str.isdigit() but not int(), and a page past any
    # list must not become an `islice` bound too big for it (both were 500s).
    page = int(page_text) if re.fullmatch(r"[0-9]{1,7}", page_text) and int(page_text) > 0 else 1

    def rows() -> tuple[list[str], bool]:
        visible = (
            summary
            for summary in registry.store.summaries()
            if registry.can_see(principal, summary) and search.lower() in str(summary.repo).lower()
        )
        window = list(islice(visible, (page - 1) * PAGE_REPOS, page * PAGE_REPOS + 1))
        shown = []
        for summary in window[:PAGE_REPOS]:
            card = registry.cards.card(summary.repo, registry.store.read_commit(summary.repo, summary.head))
            shown.append(_repo_row(str(summary.repo), summary.meta.private, card, summary.last_modified, token))
        return shown, len(window) > PAGE_REPOS

    shown, more = await run_in_threadpool(rows)
    pages = [
        _page_link("← previous", token, search, page - 1) if page > 1 else "",
        _page_link("next →", token, search, page + 1) if more else "",
    ]
    matching = f" matching &ldquo;{escape(search)}&rdquo;" if search else ""
    body = [
        "<h1>adapterzoo registry</h1>",
        _token_box("/", token, problem, search),
        f"<p class=muted>Page {page}: {len(shown)} repo{'s' if len(shown) != 1 else ''}{matching},"
        f" visible {'with this token' if token else 'without a token'}.</p>",
        "<table class=repos><thead><tr><th>repo</th><th>adapter type</th><th>base fingerprint</th><th>tags</th>"
        "<th>updated</th></tr></thead><tbody>",
        *shown,
        "</tbody></table>" if shown else "</tbody></table><p>No repos to show.</p>",
        f"<p class=pages>{' '.join(pages)}</p>",
    ]
    return _html("adapterzoo registry", body)


async def repo_page(request: Request) -> HTMLResponse:
    """One repo: its rendered card, adapter type, base fingerprint, files, branches, tags and commits."""
    registry = request.app.state.registry
    token, principal, problem = _caller(request, await _form_fields(request))
    try:
        repo = RepoId.parse(request.path_params["namespace"], request.path_params["name"])
        detail = await run_in_threadpool(_repo_detail, registry, principal, repo)
    except RepoNotFound:
        body = [
            _nav(token), "<h1>Not found</h1>", "<p>No such repo, or it is private: give a token that can read it.</p>",
            _token_box(request.url.path, token, problem),
        ]  # fmt: skip
        return _html("Not found", body, status=404)
    except RegistryError as error:
        body = [_nav(token), f"<h1>Bad request</h1><p>{escape(error.message)}</p>"]
        return _html("Bad request", body, status=error.status)
    body = [_nav(token), *detail(token), _token_box(request.url.path, token, problem)]
    return _html(f"{repo} - adapterzoo registry", body)


def _repo_detail(registry: Any, principal: Principal, repo: RepoId):
    meta = registry.readable_repo(principal, repo)
    head = registry.store.resolve(repo, DEFAULT_BRANCH)
    cards: CardReader = registry.cards
    card = cards.card(repo, head)
    card_html = _RENDERED_CARDS.get_or_compute(
        (str(registry.store.root), str(repo), head.id), lambda: _render_markdown(cards.readme_text(repo, head))
    )
    branches, tags = registry.store.branches(repo), registry.store.tags(repo)
    commits = []
    for number, commit in enumerate(registry.store.history(repo, head)):
        if number == PAGE_COMMITS:
            break
        commits.append(commit)

    def render(token: str | None) -> list[str]:
        block = card.adapterzoo
        fingerprint = _text(block.get("base_fingerprint")) or "-"
        parts = [
            f"<h1>{escape(str(repo))} {_badge('private') if meta.private else _badge('public')}</h1>",
            "<dl class=facts>",
            f"<dt>adapter type</dt><dd class=adapter-type>{escape(_text(block.get('type')) or '-')}</dd>",
            f"<dt>base fingerprint</dt><dd class=fingerprint><code>{escape(fingerprint)}</code></dd>",
            f"<dt>format</dt><dd>{escape(_text(block.get('format')) or '-')}</dd>",
            f"<dt>tags</dt><dd>{' '.join(_badge(tag) for tag in card.tags) or '-'}</dd>",
            f"<dt>head of main</dt><dd><code>{escape(head.id)}</code></dd>",
            "</dl>",
        ]
        if card.error:
            parts.append(f"<p class=warning>The model card metadata could not be read: {escape(card.error)}</p>")
        parts.append("<h2>Files</h2><table class=files><thead><tr><th>path</th><th>size</th></tr></thead><tbody>")
        parts += [
            f"<tr><td>{escape(path)}</td><td class=size>{_size(entry.size)}</td></tr>"
            for path, entry in sorted(head.files.items())
        ]
        parts.append("</tbody></table>")
        parts.append("<h2>Branches</h2><ul class=branches>")
        parts += [_ref_item(name, target) for name, target in branches.items()]
        parts.append("</ul><h2>Tags</h2><ul class=tags>")
        parts += [_ref_item(name, target) for name, target in tags.items()]
        parts.append("</ul>" if tags else "<li class=muted>none</li></ul>")
        parts.append("<h2>Commits</h2><ol class=commits>")
        parts += [
            f"<li><code>{escape(commit.id[:12])}</code> {escape(commit.summary)} "
            f"<span class=muted>{escape(commit.author)}, {escape(commit.date)}</span></li>"
            for commit in commits
        ]
        parts.append("</ol><h2>Model card</h2>")
        parts.append(f"<article class=card>{card_html}</article>")
        return parts

    return render


# --------------------------------------------------------------------------- pieces


async def _form_fields(request: Request) -> dict[str, str]:
    """The fields of a POSTed form (the token box and the links that carry the token); {} for a GET."""
    if request.method != "POST":
        return {}
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_FORM_BYTES:
            break
    form = parse_qs(raw[:MAX_FORM_BYTES].decode(errors="replace"))
    return {name: values[0] for name, values in form.items() if values}


def _caller(request: Request, fields: dict[str, str]) -> tuple[str | None, Principal, str | None]:
    """The token typed in the box (or carried by a form), the caller it names, and any problem."""
    registry = request.app.state.registry
    token = fields.get("token", "").strip() or None
    try:
        if token is not None:
            return token, registry.tokens.authenticate(f"Bearer {token}"), None
        return None, registry.principal(request), None
    except Unauthorized:
        return None, registry.tokens.authenticate(None), "That token is not valid here."


def _page_link(label: str, token: str | None, search: str, page: int) -> str:
    if token is None:
        return f"<a href='/?{escape(urlencode({'q': search, 'page': page}))}'>{escape(label)}</a>"
    return (
        "<form method=post action='/' class=inline>"
        f"<input type=hidden name=token value='{escape(token)}'><input type=hidden name=q value='{escape(search)}'>"
        f"<input type=hidden name=page value='{page}'><button type=submit class=link>{escape(label)}</button></form>"
    )


def _repo_row(repo_id: str, private: bool, card: ModelCard, updated: str, token: str | None) -> str:
    block = card.adapterzoo
    tags = " ".join(_badge(tag) for tag in card.tags if not tag.startswith(("adapterzoo-type:", "base-fingerprint:")))
    return (
        f"<tr><td>{_repo_link(repo_id, token)} {_badge('private') if private else ''}</td>"
        f"<td class=adapter-type>{escape(_text(block.get('type')) or '-')}</td>"
        f"<td class=fingerprint><code>{escape((_text(block.get('base_fingerprint')) or '-')[:16])}</code></td>"
        f"<td>{tags}</td><td class=muted>{escape(updated[:10])}</td></tr>"
    )


def _repo_link(repo_id: str, token: str | None) -> str:
    href = "/" + quote(repo_id)
    if token is None:
        return f"<a href='{escape(href)}'>{escape(repo_id)}</a>"
    # With a token the link is a form, so the token travels in a POST body, not in the URL.
    return (
        f"<form method=post action='{escape(href)}' class=inline><input type=hidden name=token value='{escape(token)}'>"
        f"<button type=submit class=link>{escape(repo_id)}</button></form>"
    )


def _nav(token: str | None) -> str:
    if token is None:
        return "<p><a href='/'>← all repos</a></p>"
    return (
        f"<form method=post action='/' class=inline><input type=hidden name=token value='{escape(token)}'>"
        "<button type=submit class=link>← all repos</button></form>"
    )


def _token_box(action: str, token: str | None, problem: str | None, search: str | None = None) -> str:
    note = f"<p class=warning>{escape(problem)}</p>" if problem else ""
    state = "Showing what this token may read." if token else "Private repos need a token."
    search_box = (
        f"<label>Search <input type=search name=q value='{escape(search)}' placeholder='name'></label> "
        if search is not None
        else ""
    )
    return (
        f"<form method=post action='{escape(action)}' class=token>{note}{search_box}"
        f"<label>Token <input type=password name=token autocomplete=off placeholder='hf_...'"
        f" value='{escape(token or '')}'></label> "
        f"<button type=submit>Show</button> <span class=muted>{state}</span></form>"
    )


def _render_markdown(readme: str) -> str:
    """The README without its front matter, as HTML; raw HTML in it is shown as text.

    Only the first MAX_RENDERED_CARD_CHARS are rendered: markdown-it spends ~10 µs a character on
    hostile text ("[" repeated), so a 1 MiB card cost 9 s of CPU per view. Callers cache the result.
    """
    text = readme
    if text.lstrip().startswith("---"):
        start = text.find("---")
        end = text.find("\n---", start + 3)
        if end != -1:
            text = text[text.find("\n", end + 1) + 1 :] if text.find("\n", end + 1) != -1 else ""
    if not text.strip():
        return "<p class=muted>No README.</p>"
    if len(text) <= MAX_RENDERED_CARD_CHARS:
        return _MARKDOWN.render(text)
    note = (
        f"<p class=warning>This model card is longer than {MAX_RENDERED_CARD_CHARS // 1024} KB: it is truncated"
        " here. Download README.md for the whole text.</p>"
    )
    return _MARKDOWN.render(text[:MAX_RENDERED_CARD_CHARS]) + note


def _ref_item(name: str, target: str) -> str:
    return f"<li><code>{escape(name)}</code> → <code>{escape(target[:12])}</code></li>"


def _badge(text: str) -> str:
    return f"<span class=badge>{escape(text)}</span>"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _html(title: str, body: list[str], status: int = 200) -> HTMLResponse:
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body><main>"
        + "\n".join(body)
        + "</main></body></html>"
    )
    return HTMLResponse(
        page, status_code=status,
        headers={"Content-Security-Policy": _CSP, "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY",
                 "Cache-Control": "no-store"},
    )  # fmt: skip


_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1000px;margin:0 auto;padding:24px}
h1{font-size:24px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e3e6eb;vertical-align:top}
th{font-weight:600;background:#eef0f4}
.badge{display:inline-block;background:#e6ecff;color:#2b4bb8;border-radius:10px;padding:0 8px;margin:1px;font-size:12px}
.muted{color:#6b7280}.warning{color:#a23b00}.size{text-align:right;white-space:nowrap}
.token{margin:12px 0;padding:10px;background:#fff;border:1px solid #e3e6eb}
form.inline{display:inline}button.link{background:none;border:0;color:#2b4bb8;cursor:pointer;padding:0;font:inherit}
a{color:#2b4bb8}.card{background:#fff;padding:4px 16px;border:1px solid #e3e6eb}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:4px 16px}dt{color:#6b7280}dd{margin:0}
code{font-size:13px}
"""
