"""Find and load plugins: pluggy, entry-point group "adapterzoo".

Which plugins load can be narrowed with two environment variables, in the manner of simonw/llm:
`ADAPTERZOO_LOAD_PLUGINS=lora,houlsby` loads only those entry points (empty: none), and
`ADAPTERZOO_DISABLE_PLUGINS=prefix` blocks those. Tests register throwaway plugins with
`pm.register(module)` and must `pm.unregister(...)` afterwards; `adapter_types()` is not cached, so
a plugin registered at run time is seen at once.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownAdapterTypeError

GROUP = "adapterzoo"

pm = pluggy.PluginManager(GROUP)
pm.add_hookspecs(hookspecs)


@dataclass(frozen=True)
class TypeInfo:
    """A registered adapter type and where it comes from (for `adapterzoo plugins`)."""

    name: str
    cls: type
    plugin: str
    distribution: str | None
    version: str | None


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [item.strip() for item in raw.split(",") if item.strip()]


class PluginLoadWarning(UserWarning):
    """A plugin that could not be loaded; the others load and the command line still runs."""


@dataclass(frozen=True)
class PluginFailure:
    """An entry point whose plugin failed to import (listed by `adapterzoo plugins`)."""

    plugin: str
    distribution: str | None
    version: str | None
    error: str  # "ModuleNotFoundError: No module named 'x'"


failures: dict[str, PluginFailure] = {}  # entry-point name -> why it did not load
# id(plugin object) -> its distribution; pluggy keeps its own list only for the plugins it loads itself
_distributions: dict[int, importlib.metadata.Distribution] = {}


def load_entry_points() -> None:
    """Register every plugin named by an `adapterzoo` entry point (once), honouring the env vars.

    A plugin that fails to import does not take the others (or the command line) down with it: it
    becomes a `PluginLoadWarning` naming the plugin, its distribution, the error and the way to
    silence it, and `failures` records it for `adapterzoo plugins`.
    """
    allowed = _env_list("ADAPTERZOO_LOAD_PLUGINS")
    for name in _env_list("ADAPTERZOO_DISABLE_PLUGINS") or []:
        pm.set_blocked(name)
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != GROUP or pm.has_plugin(ep.name) or pm.is_blocked(ep.name) or ep.name in failures:
                continue
            if allowed is not None and ep.name not in allowed:
                pm.set_blocked(ep.name)
                continue
            project = dist.metadata["Name"] if dist.metadata else None
            try:
                plugin = ep.load()
            except Exception as exc:  # an ImportError, or anything the module raises at import
                failures[ep.name] = PluginFailure(ep.name, project, dist.version, f"{type(exc).__name__}: {exc}")
                warnings.warn(
                    f"adapterzoo plugin {ep.name!r} (from {project or 'an unnamed distribution'}) failed to load: "
                    f"{type(exc).__name__}: {exc}. Its adapter types are unavailable; fix or reinstall it "
                    f"(pip install -U {project or '<plugin>'}), or skip it with ADAPTERZOO_DISABLE_PLUGINS={ep.name}",
                    PluginLoadWarning,
                    stacklevel=2,
                )
                continue
            pm.register(plugin, name=ep.name)
            _distributions[id(plugin)] = dist
    pm.check_pending()  # an impl of a misspelt hook fails here, loudly


_loaded = False


def load_plugins() -> None:
    """Load the entry-point plugins once per process (later calls do nothing)."""
    global _loaded
    if not _loaded:
        _loaded = True
        load_entry_points()


def adapter_types() -> dict[str, TypeInfo]:
    """Every registered adapter type by name, asking the plugins afresh each time."""
    load_plugins()
    found: dict[str, TypeInfo] = {}
    for impl in pm.hook.register_adapter_types.get_hookimpls():
        registered: list[type] = []
        way_out = f"fix or reinstall it, or skip it with ADAPTERZOO_DISABLE_PLUGINS={impl.plugin_name}"
        try:
            impl.function(register=registered.append)
        except Exception as exc:  # a bug in the plugin's hook: name the plugin, not just the exception
            raise PluginError(
                f"plugin {impl.plugin_name!r}: register_adapter_types raised {type(exc).__name__}: {exc}; {way_out}"
            ) from exc
        dist = _distributions.get(id(impl.plugin))
        for cls in registered:
            try:
                _check_type_class(cls, impl.plugin_name)
            except PluginError as exc:
                raise PluginError(f"{exc}; {way_out}") from exc
            if cls.name in found and found[cls.name].cls is not cls:
                raise PluginError(
                    f"adapter type {cls.name!r} is registered twice: by {found[cls.name].plugin!r} "
                    f"and by {impl.plugin_name!r}; uninstall one or block it with "
                    f"ADAPTERZOO_DISABLE_PLUGINS={impl.plugin_name}"
                )
            found[cls.name] = TypeInfo(
                name=cls.name,
                cls=cls,
                plugin=impl.plugin_name,
                distribution=dist.metadata["Name"] if dist else None,
                version=dist.version if dist else None,
            )
    return found


def get_adapter_type(name: str) -> type:
    """The adapter type class registered under `name`, or a clear error listing the known ones."""
    types = adapter_types()
    if name not in types:
        known = ", ".join(sorted(types)) or "none"
        raise UnknownAdapterTypeError(
            f"unknown adapter type {name!r}; installed types: {known}. "
            "Install the plugin that provides it (pip install <plugin>) or check the spelling."
        )
    return types[name].cls


def _check_type_class(cls: type, plugin: str) -> None:
    from .contract import check_type_class

    check_type_class(cls, plugin)
