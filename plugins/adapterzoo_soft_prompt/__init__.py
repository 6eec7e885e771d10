"""SoftPrompt for adapterzoo, registered through the same entry point as any third-party plugin."""

from adapterzoo import hookimpl

from .soft_prompt import SoftPrompt, SoftPromptConfig

__all__ = ["SoftPrompt", "SoftPromptConfig"]


@hookimpl
def register_adapter_types(register):
    register(SoftPrompt)
