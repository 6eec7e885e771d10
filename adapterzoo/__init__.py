"""adapterzoo: one frozen base transformer, many adapters of many types, one mixed batch.

Public API: `Zoo`, `hookimpl` (for plugins), `AdapterType` / `AdapterConfig` (the plugin
contract, see `adapterzoo.types` and `adapterzoo.hookspecs`), and the error classes.

Importing the package changes nothing in the process (no environment variable, no global
registration) and loads no torch: the errors and `hookimpl` are plain Python, and the names that
need torch (`Zoo`, `AdapterType`, ...) load on first use (PEP 562 `__getattr__` below). So
`adapterzoo.tasks` and `adapterzoo.errors` import anywhere, and the `adapterzoo` command can set
OpenMP's wait policy before torch loads (`adapterzoo.cli.main`, docs/serving.md "On the CPU").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterLoadError,
    AdapterZooError,
    BaseMismatchError,
    BatchError,
    ContextLengthError,
    EngineClosedError,
    EngineError,
    InvalidConfigError,
    InvalidNameError,
    MaxTokensError,
    PluginError,
    PoolFullError,
    PoolLimitError,
    QueueFullError,
    RequestFailedError,
    ShapeMismatchError,
    TrainingDivergedError,
    TrainingError,
    UnknownAdapterError,
    UnknownAdapterTypeError,
    UnknownTaskError,
)
from .hookspecs import hookimpl
from .lazy import lazy_names

if TYPE_CHECKING:  # pragma: no cover
    from .plan import SlotWeights
    from .types import AdapterConfig, AdapterHubMapping, AdapterType, PeftMapping, require
    from .zoo import AdapterInfo, Zoo, ZooOutput

__version__ = "0.1.0"

# name -> the module that defines it; each loads (with torch) the first time the name is read
_LAZY = {
    "Zoo": ".zoo",
    "ZooOutput": ".zoo",
    "AdapterInfo": ".zoo",
    "SlotWeights": ".plan",
    "AdapterType": ".types",
    "AdapterConfig": ".types",
    "require": ".types",
    "PeftMapping": ".types",
    "AdapterHubMapping": ".types",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY)


__all__ = [
    "Zoo",
    "ZooOutput",
    "AdapterInfo",
    "hookimpl",
    "AdapterType",
    "AdapterConfig",
    "require",
    "SlotWeights",
    "PeftMapping",
    "AdapterHubMapping",
    "AdapterZooError",
    "AdapterExistsError",
    "AdapterFileError",
    "BaseMismatchError",
    "BatchError",
    "InvalidConfigError",
    "InvalidNameError",
    "PluginError",
    "PoolFullError",
    "PoolLimitError",
    "ShapeMismatchError",
    "TrainingDivergedError",
    "TrainingError",
    "UnknownAdapterError",
    "UnknownAdapterTypeError",
    "UnknownTaskError",
    "EngineError",
    "QueueFullError",
    "EngineClosedError",
    "ContextLengthError",
    "MaxTokensError",
    "RequestFailedError",
    "AdapterLoadError",
]
