"""Houlsby bottleneck adapters for adapterzoo, registered through an entry point."""

from adapterzoo import hookimpl

from .houlsby import Houlsby, HoulsbyConfig

__all__ = ["Houlsby", "HoulsbyConfig"]


@hookimpl
def register_adapter_types(register):
    register(Houlsby)
