"""Fixtures the routing attack tests share: a tenant's two adapters with honest routing records."""

from __future__ import annotations

import pytest
import torch

from adapterzoo import routing
from adapterzoo.tasks import instructed_examples, routing_examples
from adapterzoo.testing.models import tiny_zoo


@pytest.fixture(scope="module")
def encoder():
    return routing.SentenceEncoder()


@pytest.fixture
def zoo(encoder):
    """A tenant's two adapters, "reverse" and "upper", with honest routing records."""
    zoo = tiny_zoo("llama")
    routing._cache(zoo).sentence = encoder
    for task in ("reverse", "upper"):
        zoo.add_adapter(task, "lora", r=4, trainable=False)
        zoo.add_routing_examples(task, routing_examples(task, 12))
    return zoo


def victims_prompts() -> list[str]:
    """Held-out prompts of the tenant's "reverse" task: what a forger wants routed to itself."""
    return [ex.prompt for ex in instructed_examples("reverse", 4, "test", seed=3, held_out=True)]


def record_with(examples: list[str], feats: torch.Tensor) -> dict:
    """A sentence-encoder routing record holding `examples` and, as its stored features, `feats`."""
    return {
        "examples": examples,
        "encoder": "sentence",
        "layer": None,
        "kind": routing.FEATURES["sentence"],
        "shape": list(feats.shape),
        "features": routing._pack(feats),
    }
