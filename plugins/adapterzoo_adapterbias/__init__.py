"""AdapterBias for adapterzoo, registered through the same entry point as any third-party plugin."""

from adapterzoo import hookimpl

from .adapterbias import AdapterBias, AdapterBiasConfig

__all__ = ["AdapterBias", "AdapterBiasConfig"]


@hookimpl
def register_adapter_types(register):
    register(AdapterBias)
