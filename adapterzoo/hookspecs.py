"""The whole plugin contract. Read this first.

A plugin is a module (or package) that an `adapterzoo` entry point names and that implements
one or more of the hooks below with `@adapterzoo.hookimpl`. The built-in adapter types in
`plugins/` are registered the same way as anyone else's.

    # pyproject.toml of a plugin
    [project.entry-points.adapterzoo]
    ia3 = "adapterzoo_ia3"

    # adapterzoo_ia3/__init__.py
    from adapterzoo import hookimpl
    @hookimpl
    def register_adapter_types(register):
        register(IA3)

What an adapter type class must provide is documented on `adapterzoo.types.AdapterType`.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("adapterzoo")
hookimpl = pluggy.HookimplMarker("adapterzoo")


@hookspec
def register_adapter_types(register: Callable[[type], None]) -> None:
    """Call `register(AdapterTypeClass)` once for each adapter type this plugin provides.

    :param register: takes a subclass of `adapterzoo.types.AdapterType`; its `name` must be unique.
    """


@hookspec
def register_commands(cli) -> None:
    """Add commands to the `adapterzoo` command line.

    :param cli: the root `click.Group`; call `cli.command()` / `cli.add_command(...)` on it.
    """
