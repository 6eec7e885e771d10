"""Model cards: the YAML front matter of a repo's README.md, read so that no tenant can hurt another.

Any tenant writes README.md, and every listing reads it, so the parser is built for hostile input:

- Aliases (`*name`) are refused: they are what makes a 300-byte "billion laughs" expand to
  gigabytes, and model cards have no use for them.
- The front matter is at most 64 KB, at most 32 levels deep and at most 10,000 nodes.
- A card that breaks any rule, or fails in any other way, makes *that* card unreadable
  (no tags, no metadata); the repo itself and every listing stay fine.

Callers run `parse_front_matter` off the event loop (it is CPU work).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .storage import BoundedCache, Commit, RepoId, Store

MAX_FRONT_MATTER_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_NODES = 10_000
MAX_README_BYTES = 1024 * 1024  # only the start of a README is read; the front matter is at its top

_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)^---[ \t]*\r?$", re.DOTALL | re.MULTILINE)


class CardError(ValueError):
    """README.md front matter that is not a small, plain YAML mapping."""


class _CardLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases and counting depth and nodes as it composes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise CardError("YAML aliases (*name) are not allowed in model card metadata; write the value out.")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise CardError(f"Model card metadata has more than {MAX_NODES} values.")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise CardError(f"Model card metadata is nested deeper than {MAX_DEPTH} levels.")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_front_matter(readme: str) -> dict[str, Any]:
    """The YAML metadata block at the top of a README.md; `CardError` if it is not a small YAML mapping."""
    match = _FRONT_MATTER.match(readme)
    if match is None:
        return {}
    text = match.group(1)
    if len(text.encode("utf-8", errors="replace")) > MAX_FRONT_MATTER_BYTES:
        raise CardError(f"README.md metadata is larger than {MAX_FRONT_MATTER_BYTES // 1024} KB; keep it short.")
    loader = _CardLoader(text)
    try:
        metadata = loader.get_single_data()
    except CardError:
        raise
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # ValueError: e.g. an int of 5,000 digits
        raise CardError(f"Invalid YAML in README.md metadata: {error}") from None
    finally:
        loader.dispose()
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise CardError("README.md metadata must be a YAML mapping (key: value).")
    # Dates and such become strings, and so do YAML's .nan and .inf ("NaN", "Infinity"): a float JSON
    # cannot carry made model_info, and every listing page with cardData, answer 500.
    return json.loads(json.dumps(metadata, default=str), parse_constant=str)


@dataclass(frozen=True)
class ModelCard:
    """What search needs from a README: its metadata and the tags derived from it.

    `error` says why the card could not be read; such a card has no metadata and no tags.
    """

    metadata: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def tags(self) -> list[str]:
        """`tags:` from the front matter, then `library_name`, without duplicates."""
        declared = self.metadata.get("tags")
        if isinstance(declared, (str, int, float)):
            declared = [declared]
        if not isinstance(declared, list):
            declared = []
        tags = [str(tag) for tag in declared if isinstance(tag, (str, int, float)) and not isinstance(tag, bool)]
        if self.library_name:
            tags.append(self.library_name)
        return list(dict.fromkeys(tags))

    @property
    def library_name(self) -> str | None:
        value = self.metadata.get("library_name")
        return value if isinstance(value, str) else None

    @property
    def pipeline_tag(self) -> str | None:
        value = self.metadata.get("pipeline_tag")
        return value if isinstance(value, str) else None

    @property
    def adapterzoo(self) -> Mapping[str, Any]:
        """The `adapterzoo:` block adapterzoo's push writes (type, base fingerprint, config, metrics)."""
        block = self.metadata.get("adapterzoo")
        return block if isinstance(block, dict) else {}


class CardReader:
    """Reads README.md front matter per commit; commits are immutable, so results are cached."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._cache: BoundedCache[tuple[str, str], ModelCard] = BoundedCache(100_000)

    def card(self, repo: RepoId, commit: Commit) -> ModelCard:
        return self._cache.get_or_compute((str(repo), commit.id), lambda: self._read(repo, commit))

    def readme_text(self, repo: RepoId, commit: Commit) -> str:
        entry = commit.files.get("README.md")
        if entry is None:
            return ""
        with open(self._store.blob_path(repo, entry), "rb") as blob:
            return blob.read(MAX_README_BYTES).decode("utf-8", errors="replace")

    def _read(self, repo: RepoId, commit: Commit) -> ModelCard:
        try:
            return ModelCard(parse_front_matter(self.readme_text(repo, commit)))
        except Exception as error:  # noqa: BLE001 - one tenant's broken card must never break a listing
            return ModelCard(error=str(error) if isinstance(error, CardError) else "README.md could not be read.")
