"""adapterzoo-registry: a self-hosted registry speaking the Hugging Face Hub API subset `huggingface_hub` uses.

Run it with `adapterzoo-registry serve --root DIR`, then point the official client at it:
`HfApi(endpoint="http://127.0.0.1:PORT", token=...)`. See docs/registry.md.
"""

from .app import create_app

__version__ = "0.1.0"

__all__ = ["create_app", "__version__"]
