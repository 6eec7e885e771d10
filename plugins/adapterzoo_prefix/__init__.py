"""Prefix for adapterzoo, registered through the same entry point as any third-party plugin."""

from adapterzoo import hookimpl

from .prefix import Prefix, PrefixConfig

__all__ = ["Prefix", "PrefixConfig"]


@hookimpl
def register_adapter_types(register):
    register(Prefix)
