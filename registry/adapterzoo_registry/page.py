"""The web page (GET /): placeholder until the page lands."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse


async def index(request: Request) -> HTMLResponse:
    return HTMLResponse("<!doctype html><title>adapterzoo registry</title>")


async def repo_page(request: Request) -> HTMLResponse:
    return HTMLResponse("<!doctype html><title>adapterzoo registry</title>")
