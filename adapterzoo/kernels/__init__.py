"""Fused decode-step deltas: a pool's whole delta at a site in one C++ call (fused.cpp beside this file).

In a decode step (one token a row, no autograd, on the CPU) a type that offers `fused_call` hands
the core a checked call of one kernel here for its rows (`lora_call`, ...), instead of running its
eager `delta` (a few small PyTorch ops per pool and site, each a round trip through memory).
Punica's BGMV idea, one kernel per type: `lora` (shrink and expand fused), `bottleneck` (Houlsby:
down, activation, up, residual), `adapterbias` and `bias` (BitFit). The core keeps a site's calls
with a decode plan and runs all of them in one `run` per step (runtime._fused_site). Measured
effect: docs/serving.md, "Fused delta kernels".

The library is plain C (no torch headers, so it builds in about a second), compiled once with the
system compiler ($CXX, else c++ or g++) into the torch extensions folder, keyed by its source and
flags, and loaded with ctypes. Where there is no compiler or the build fails, a warning is logged
once and every delta runs eagerly, as before. ADAPTERZOO_KERNELS=0 forces the eager path (read at
every forward, so tests can compare both in one process).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused.cpp")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=c++17"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
ACTIVATIONS = {"swish": 0, "silu": 0, "relu": 1, "gelu": 2, "tanh": 3}

_state: dict[str, object] = {}  # "lib": the loaded library or None once tried


def enabled() -> bool:
    """Whether fused kernels may run (ADAPTERZOO_KERNELS=0 turns them off)."""
    # "false" and "off" turned them on while only "0" turned them off (found by an attack review)
    return os.environ.get("ADAPTERZOO_KERNELS", "1").strip().lower() not in {"0", "false", "no", "off"}


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (after one warning) where they cannot be built."""
    if "lib" not in _state:
        try:
            _state["lib"] = _load()
        except Exception as error:  # no compiler, a failed build, a library that will not load
            _state["lib"] = None
            log.warning(
                "adapterzoo: fused delta kernels unavailable (%s); deltas run eagerly. Install a C++ compiler "
                "(or set CXX) for faster decode steps, or set ADAPTERZOO_KERNELS=0 to silence this.",
                error,
            )
    return _state["lib"]


def reset() -> None:
    """Forget the loaded library, so that the next use builds or finds it again (tests)."""
    _state.clear()


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no C++ compiler found (tried $CXX, c++, g++)")


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for this CPU: a cached build must not reach another)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _load() -> ctypes.CDLL:
    compiler = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), _cpu_flags().encode()]))
    from torch.utils.cpp_extension import get_default_build_root  # the user's cache

    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    path = folder / "adapterzoo_kernels" / f"fused_{key.hexdigest()[:16]}{'.dll' if sys.platform == 'win32' else '.so'}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # built beside its final name and renamed: processes building at once never load half a file
        fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
        os.close(fd)
        try:
            done = subprocess.run(
                [compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    rows = [i64, i64, ptr, ptr, i64, i64, i64]  # B, d, rows, slots, slot, n, S
    signatures = {
        "az_adapterbias": [ctypes.c_int, ptr, ptr, *rows, ptr, ptr, ptr],
        "az_bias": [ctypes.c_int, ptr, ptr, *rows, ptr],
        "az_lora": [ctypes.c_int, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i64, i64, i64, ptr, ptr, i64, ptr],
        "az_bottleneck": [ctypes.c_int, ptr, ptr, *rows, ptr, ptr, ptr, ptr, i64, ctypes.c_int],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def may_fuse(training: bool) -> bool:
    """Whether a forward's deltas may run fused: no autograd, kernels on and built. The same at every site
    of a forward (the core asks once a forward: reading the environment at each of ~420 sites of a mixed
    decode step cost ~1 us each). Anything else (training) runs eagerly."""
    return not training and not torch.is_grad_enabled() and enabled() and library() is not None


def fits(y: torch.Tensor) -> bool:
    """Whether a site's output may take the kernels: one token a row (a decode step), on the CPU, float32
    or bfloat16. Anything else (a prefill, CUDA, another dtype) runs eagerly."""
    return y.shape[1] == 1 and y.is_cpu and y.dtype in DTYPES


def _rows(rows: torch.Tensor | None, slots: torch.Tensor | int, batch: int) -> tuple | None:
    """(rows pointer, slots pointer, slot, n) for the C side; None (run eagerly) unless rows and slots
    are int64 on the CPU, contiguous, one slot a row."""
    for t in (rows, slots):
        if isinstance(t, torch.Tensor) and not (t.dtype == torch.int64 and t.is_cpu and t.is_contiguous()):
            return None
    n = batch if rows is None else rows.shape[0]  # (shape, not len(): Tensor.__len__ is Python, ~1.5 us)
    if isinstance(slots, int):
        return (None if rows is None else rows.data_ptr(), None, slots, n)
    if slots.dim() != 1 or slots.shape[0] != n:
        return None
    return (None if rows is None else rows.data_ptr(), slots.data_ptr(), 0, n)


def _check(code: int, kernel: str) -> None:
    if code != 0:
        raise IndexError(
            f"{kernel} kernel: a row is outside the batch or a slot outside its pool (a stale plan?); rebuild the plan"
        )


def _ready(y: torch.Tensor, *tensors: torch.Tensor, dtype: torch.dtype) -> bool:
    # y (B, 1, d): the C side reads one token a row
    return y.dim() == 3 and y.shape[1] == 1 and all(t.dtype == dtype and t.is_contiguous() for t in (y, *tensors))


class Call(NamedTuple):
    """One pool's kernel at one site, checked and converted once (`lora_call`, ...): what `run` needs
    besides the step's x and y. A decode plan kept across steps calls the same kernels with the same
    tables at every step, so the core keeps a site's calls with the plan (`runtime.DeltaSite`) and runs
    them all in one `run`: checking them again cost a mixed 16-row step a few Python checks at each of
    ~420 pool sites. `keep` holds the tensors its pointers point into, so they live as long as it does
    (pools and plans never resize or move a tensor they hold)."""

    kernel: str
    fn: Any  # the library's az_<kernel>
    args: tuple  # its arguments after (dtype, out, y[, x])
    shape: torch.Size  # the y it was checked for: (B, 1, d)
    dtype: torch.dtype
    x_shape: torch.Size | None  # the x it reads, None: it reads no x
    keep: tuple


def run(
    calls: list[Call] | tuple[Call, ...], x: torch.Tensor, y: torch.Tensor, *, into_y: bool = False
) -> torch.Tensor | None:
    """y plus every call's delta, in one new tensor; None (run them eagerly) where x or y is not what a
    call was checked for. The first call reads y, the others add in place:
    a row belongs to one pool, and a kernel leaves the other rows as they are.

    `into_y`: y is the caller's own (a module's fresh output that nothing else holds), so the deltas
    are added into it and y is returned. Why: the new tensor meant a pass over every row of y, in a
    mixed batch mostly rows of no call here, by one core, just after both cores wrote y; into y, only
    the calls' rows are touched (a kept 16-row mixed SmolLM2 decode step, in three runs: 1.158x, 1.172x,
    1.151x of the base's with a new tensor; 1.149x, 1.156x, 1.151x into y)."""
    if not y.is_contiguous():  # (a Call exists only where the library loaded: it holds its function)
        return None
    shape, dtype, xp = y.shape, y.dtype, None
    for c in calls:
        if c.shape != shape or c.dtype != dtype:
            return None
        if c.x_shape is not None:
            if c.x_shape != x.shape or x.dtype != dtype or not x.is_contiguous():
                return None
            xp = x.data_ptr()
    out = y if into_y else torch.empty_like(y)
    code, dst, src = DTYPES[dtype], out.data_ptr(), y.data_ptr()
    for c in calls:
        failed = c.fn(code, dst, src, xp, *c.args) if c.x_shape is not None else c.fn(code, dst, src, *c.args)
        if failed:
            _check(failed, c.kernel)
        src = dst
    return out


def _bound(kernel: str, y: torch.Tensor, x: torch.Tensor | None, args: tuple, keep: tuple) -> Call | None:
    lib = library()
    if lib is None:
        return None
    return Call(kernel, getattr(lib, f"az_{kernel}"), args, y.shape, y.dtype, None if x is None else x.shape, keep)


def adapterbias_call(y: torch.Tensor, v: torch.Tensor, L: torch.Tensor, b: torch.Tensor, rows, slots) -> Call | None:
    """y + (L[slot] . y + b[slot]) v[slot] for each listed row. v, L (S, d), b (S, 1)."""
    index = _rows(rows, slots, y.shape[0])
    S, d = v.shape[0], y.shape[-1]
    if index is None or not _ready(y, v, L, b, dtype=y.dtype) or not v.shape == L.shape == (S, d) or b.shape != (S, 1):
        return None  # (shapes checked here: the C side trusts them)
    args = (y.shape[0], d, *index, S, v.data_ptr(), L.data_ptr(), b.data_ptr())
    return _bound("adapterbias", y, None, args, (v, L, b, rows, slots))


def bias_call(y: torch.Tensor, b: torch.Tensor, rows, slots) -> Call | None:
    """y + b[slot] for each listed row (BitFit). b (S, d)."""
    index = _rows(rows, slots, y.shape[0])
    if index is None or not _ready(y, b, dtype=y.dtype) or b.dim() != 2 or b.shape[1] != y.shape[-1]:
        return None  # (shapes checked here: the C side trusts them)
    return _bound("bias", y, None, (y.shape[0], y.shape[-1], *index, len(b), b.data_ptr()), (b, rows, slots))


def lora_call(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, scale: torch.Tensor, rows, slots):
    """y + scale[slot] (x A[slot]) B[slot] for each listed row. x (B, 1, in), A (S, in, r), B (S, r, out)."""
    index = _rows(rows, slots, y.shape[0])
    S, din, r = A.shape
    shapes = x.shape == (y.shape[0], 1, din) and Bt.shape == (S, r, y.shape[-1]) and scale.shape == (S,)
    if index is None or not shapes or not _ready(y, x, A, Bt, scale, dtype=y.dtype):
        return None  # (shapes checked here: the C side trusts them)
    B, _, dout = y.shape
    args = (B, din, dout, *index, S, A.data_ptr(), Bt.data_ptr(), r, scale.data_ptr())
    return _bound("lora", y, x, args, (A, Bt, scale, rows, slots))


def bottleneck_call(y, down, down_bias, up, up_bias, activation: str, rows, slots) -> Call | None:
    """y + f(y D[slot] + b_d[slot]) U[slot] + b_u[slot] for each listed row (Houlsby). down (S, d, m),
    up (S, m, d), down_bias (S, m), up_bias (S, d). None for an activation the kernel lacks."""
    act, index = ACTIVATIONS.get(activation), _rows(rows, slots, y.shape[0])
    S, d, m = down.shape
    shapes = y.shape[-1] == d and up.shape == (S, m, d) and down_bias.shape == (S, m) and up_bias.shape == (S, d)
    if act is None or index is None or not shapes or not _ready(y, down, down_bias, up, up_bias, dtype=y.dtype):
        return None  # (shapes checked here: the C side trusts them)
    pointers = (down.data_ptr(), down_bias.data_ptr(), up.data_ptr(), up_bias.data_ptr())
    args = (y.shape[0], d, *index, S, *pointers, m, act)
    return _bound("bottleneck", y, None, args, (down, down_bias, up, up_bias, rows, slots))


def _once(call: Call | None, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
    if call is None:
        return None
    return run((call,), y if x is None else x, y)


def adapterbias(y, v, L, b, rows, slots):
    """`adapterbias_call` run once: y plus the delta, or None."""
    return _once(adapterbias_call(y, v, L, b, rows, slots), None, y)


def bias(y, b, rows, slots):
    """`bias_call` run once: y plus the delta, or None."""
    return _once(bias_call(y, b, rows, slots), None, y)


def lora(x, y, A, Bt, scale, rows, slots):
    """`lora_call` run once: y plus the delta, or None."""
    return _once(lora_call(x, y, A, Bt, scale, rows, slots), x, y)


def bottleneck(y, down, down_bias, up, up_bias, activation: str, rows, slots):
    """`bottleneck_call` run once: y plus the delta, or None."""
    return _once(bottleneck_call(y, down, down_bias, up, up_bias, activation, rows, slots), None, y)
