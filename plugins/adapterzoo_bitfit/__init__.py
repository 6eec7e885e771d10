"""BitFit for adapterzoo, registered through the same entry point as any third-party plugin."""

from adapterzoo import hookimpl

from .bitfit import BitFit, BitFitConfig

__all__ = ["BitFit", "BitFitConfig"]


@hookimpl
def register_adapter_types(register):
    register(BitFit)
