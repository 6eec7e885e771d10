"""LoRA for adapterzoo, registered through the same entry point as any third-party plugin."""

from adapterzoo import hookimpl

from .lora import Lora, LoraConfig

__all__ = ["Lora", "LoraConfig"]


@hookimpl
def register_adapter_types(register):
    register(Lora)
