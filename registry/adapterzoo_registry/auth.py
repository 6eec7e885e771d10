"""Bearer tokens mapped to a user and per-namespace read/write rights.

The tokens file is JSON::

    {"tokens": {"<token>": {"user": "alice", "namespaces": {"alice": "write", "acme": "read"}}}}

`write` implies `read`. Public repos are readable by everyone, without a token.
Without a tokens file the registry runs open: every request may read and write
everything, which is meant for local experiments only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .storage import RegistryError

Access = Literal["read", "write"]
ACCESS_LEVELS: tuple[str, ...] = ("read", "write")

# `huggingface_hub.utils.hf_raise_for_status` keys on this exact message for bad tokens.
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


class Unauthorized(RegistryError):
    status = 401


class Forbidden(RegistryError):
    status = 403


class TokenFileError(ValueError):
    """The tokens file cannot be used; raised at start-up so a typo never opens the registry."""


@dataclass(frozen=True)
class Principal:
    """Who is calling and what they may touch."""

    user: str | None
    namespaces: Mapping[str, str] = field(default_factory=dict)
    unrestricted: bool = False

    @property
    def authenticated(self) -> bool:
        return self.user is not None

    def can_read(self, namespace: str) -> bool:
        return self.unrestricted or namespace in self.namespaces

    def can_write(self, namespace: str) -> bool:
        return self.unrestricted or self.namespaces.get(namespace) == "write"

    def require_write(self, namespace: str) -> None:
        """401 when nobody is identified (a token would help), 403 when this identity lacks the right."""
        if not self.authenticated:
            raise Unauthorized("Authentication required: send a token with write access (Authorization: Bearer ...).")
        if not self.can_write(namespace):
            raise Forbidden(f"You don't have the rights to write to the namespace '{namespace}'.")


ANONYMOUS = Principal(user=None)
OPEN_ACCESS = Principal(user="anonymous", unrestricted=True)


class TokenTable:
    """Looks tokens up by their SHA-256 so the table never compares secrets character by character."""

    def __init__(self, principals_by_token: Mapping[str, Principal] | None) -> None:
        self._open = principals_by_token is None
        self._by_digest = {_digest(token): principal for token, principal in (principals_by_token or {}).items()}

    @classmethod
    def open_access(cls) -> TokenTable:
        return cls(None)

    @classmethod
    def load(cls, path: Path | str) -> TokenTable:
        """Read and validate a tokens file; any problem raises `TokenFileError` naming the entry."""
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise TokenFileError(f"Cannot read tokens file {path}: {error}") from error
        tokens = document.get("tokens") if isinstance(document, dict) else None
        if not isinstance(tokens, dict):
            raise TokenFileError(f'{path}: expected {{"tokens": {{"<token>": {{...}}}}}} at the top level.')
        return cls({token: _parse_principal(path, token, entry) for token, entry in tokens.items()})

    @property
    def is_open(self) -> bool:
        return self._open

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind an `Authorization` header; an unknown token is an error, not anonymity."""
        if self._open:
            return OPEN_ACCESS
        token = _bearer_token(authorization)
        if token is None:
            return ANONYMOUS
        principal = self._by_digest.get(_digest(token))
        if principal is None:
            raise Unauthorized(INVALID_CREDENTIALS)
        return principal


def _parse_principal(path: Path | str, token: object, entry: object) -> Principal:
    user = entry.get("user") if isinstance(entry, dict) else None
    where = f"{path}: token entry of user {user!r}"
    if not isinstance(token, str) or not token.strip():
        raise TokenFileError(f"{where}: the token must be a non-empty string.")
    if not isinstance(entry, dict) or not isinstance(entry.get("user"), str) or not entry["user"]:
        raise TokenFileError(f'{where}: expected {{"user": "<name>", "namespaces": {{...}}}}.')
    namespaces = entry.get("namespaces", {})
    if not isinstance(namespaces, dict) or any(
        not isinstance(name, str) or level not in ACCESS_LEVELS for name, level in namespaces.items()
    ):
        raise TokenFileError(f'{where}: \'namespaces\' must map namespace names to "read" or "write".')
    return Principal(user=entry["user"], namespaces=dict(namespaces))


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(INVALID_CREDENTIALS)
    return token.strip()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
