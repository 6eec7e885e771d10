"""Old import path: the catalog is serve/catalog.py (`Catalog`, `Entry`), the tiers serve/tiers.py
(`Tiers`, the engine's resolver that a server builds around its zoo). `Router` is `Tiers`."""

from .catalog import Catalog, Entry
from .tiers import Tiers

Router = Tiers

__all__ = ["Catalog", "Entry", "Router", "Tiers"]
