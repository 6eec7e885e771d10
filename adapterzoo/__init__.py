"""adapterzoo: one frozen base transformer, many adapters of many types, one mixed batch.

Public API: `Zoo`, `hookimpl` (for plugins), `AdapterType` / `AdapterConfig` (the plugin
contract, see `adapterzoo.types` and `adapterzoo.hookspecs`), and the error classes.
"""

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
