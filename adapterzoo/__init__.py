"""adapterzoo: one frozen base transformer, many adapters of many types, one mixed batch.

Public API: `Zoo`, `hookimpl` (for plugins), `AdapterType` / `AdapterConfig` (the plugin
contract, see `adapterzoo.types` and `adapterzoo.hookspecs`), and the error classes.
"""

import os as _os
import sys as _sys

# OpenMP reads its wait policy once, when torch loads. Its default spins at every barrier, which
# on a CPU shared with other processes turns each parallel region into a wait for a preempted
# thread: a decode step with 2 threads beside one busy process took 3.5 s spinning, 0.23 s with
# PASSIVE (docs/serving.md, "On the CPU"). Set OMP_WAIT_POLICY yourself (or import torch first)
# to keep OpenMP's default.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterZooError,
    BaseMismatchError,
    BatchError,
    InvalidConfigError,
    InvalidNameError,
    PluginError,
    PoolFullError,
    PoolLimitError,
    ShapeMismatchError,
    TrainingDivergedError,
    TrainingError,
    UnknownAdapterError,
    UnknownAdapterTypeError,
)
from .hookspecs import hookimpl
from .plan import SlotWeights
from .types import AdapterConfig, AdapterHubMapping, AdapterType, PeftMapping, require
from .zoo import AdapterInfo, Zoo, ZooOutput

__version__ = "0.1.0"

__all__ = [
    "Zoo", "ZooOutput", "AdapterInfo", "hookimpl", "AdapterType", "AdapterConfig", "require",
    "SlotWeights", "PeftMapping", "AdapterHubMapping",
    "AdapterZooError", "AdapterExistsError", "AdapterFileError", "BaseMismatchError", "BatchError",
    "InvalidConfigError", "InvalidNameError", "PluginError", "PoolFullError", "PoolLimitError",
    "ShapeMismatchError", "TrainingDivergedError", "TrainingError", "UnknownAdapterError", "UnknownAdapterTypeError",
]
