"""`ServeConfig`: every option of `adapterzoo serve`, typed, checked once, passed whole.

The command line builds one; the single-process server, the Ray ingress and every Ray replica are
built from that same object (Ray pickles it to the replicas, so it holds only plain values: no
zoo, no open files, no secrets in its repr). A bad value fails here, before the base loads, with
a message that names the flag and the fix.

    config = ServeConfig(base="HuggingFaceTB/SmolLM2-135M", adapters_dir="adapters", max_batch=16)
    server = server_from_config(config)        # adapterzoo/serve/server.py
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidConfigError

MAX_BODY_BYTES = 4 * 2**20  # default request body limit (--max-body-bytes)
BODY_TIMEOUT = 30.0  # default seconds for a whole request body to arrive (--body-timeout)

#: --dtype's names (and their short forms) -> torch dtype names
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}

#: fields whose flag is not `--` + the field name with dashes
FLAGS = {
    "base": "BASE",
    "base_name": "--name",
    "adapters_dir": "--adapters",
    "keys_file": "--keys",
    "default_max_tokens": "--max-tokens",
    "registry_endpoint": "--registry",
    "open_access": "--open",
    # no flag: set these where a ServeConfig is built in Python
    "max_queue_per_tenant": "max_queue_per_tenant",
    "max_rows_per_tenant": "max_rows_per_tenant",
    "threads": "threads",
}


def flag(name: str) -> str:
    """The `adapterzoo serve` flag of a `ServeConfig` field (the field's name where it has none)."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def base_name_of(base: str) -> str:
    """The base's model id in the API when --name is not given: a folder's name, else BASE as given."""
    return Path(base.rstrip("/")).name if os.sep in base or Path(base).exists() else base


@dataclass(frozen=True)
class ServeConfig:
    """The options of one server (see `adapterzoo serve --help` for each flag)."""

    base: str  # a folder or Hub id (BASE); only `server_from_config` loads it
    base_name: str | None = None  # the base's model id in the API (None: from `base`, see `base_name_of`)
    host: str = "127.0.0.1"
    port: int = 8000
    adapters_dir: Path | None = None
    keys_file: Path | None = None  # None: an open server (every caller is an admin)
    open_access: bool = False  # without keys, allow a bind beyond loopback
    # the zoo and the engine
    slots: int = 16
    device: str | None = None
    dtype: str | None = None
    max_batch: int = 32
    max_queue: int = 256
    max_host: int | None = None
    # fair shares (None: half the queue and all but an eighth of the batch when there are tenants)
    max_queue_per_tenant: int | None = None
    max_rows_per_tenant: int | None = None
    stuck_after: float = 60.0
    # MiB for the keys and values of prompt openings reused across requests (serve/prefix_cache.py); 0: off
    prefix_cache_mb: int = 256
    drain_timeout: float = 30.0
    # requests
    default_max_tokens: int = 16
    max_body_bytes: int = MAX_BODY_BYTES
    max_prompt_chars: int | None = None  # None: 32 x the context length
    body_timeout: float = BODY_TIMEOUT
    # the registry missing adapters are pulled from
    registry_endpoint: str | None = None
    registry_token: str | None = field(default=None, repr=False)  # never printed, never logged
    registry_namespace: str | None = None
    # Ray Serve
    ray: bool = False
    replicas: int = 1
    models_per_replica: int = 64  # adapters Serve's multiplexing keeps warm per replica
    threads: int | None = None  # torch threads per replica (None: torch's default)
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base:
            raise InvalidConfigError(
                "BASE is missing: give the base model as a folder or a Hub id, "
                "e.g. adapterzoo serve HuggingFaceTB/SmolLM2-135M"
            )
        for name in ("adapters_dir", "keys_file"):  # a str from Python callers, a Path from the CLI
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.base_name is None:  # resolved here, where BASE is: a Ray replica may not see the folder
            object.__setattr__(self, "base_name", base_name_of(self.base))
        self._check()

    def _check(self) -> None:
        at_least = {
            "port": 0,
            "slots": 1,
            "max_batch": 1,
            "max_queue": 1,
            "max_host": 0,
            "max_queue_per_tenant": 1,
            "max_rows_per_tenant": 1,
            "default_max_tokens": 1,
            "max_body_bytes": 1,
            "max_prompt_chars": 1,
            "replicas": 1,
            "models_per_replica": 1,
            "threads": 1,
            "prefix_cache_mb": 0,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidConfigError(
                    f"{flag(name)} must be a whole number of at least {low} (got {value!r}); "
                    f"give {flag(name)} {max(low, 1)} or more."
                )
        if self.port > 65535:
            raise InvalidConfigError(f"--port must be at most 65535 (got {self.port}); give a free TCP port.")
        for name, positive in (("stuck_after", True), ("body_timeout", True), ("drain_timeout", False)):
            value = getattr(self, name)
            # not finite: nan made every body a 408 at once and silenced the watchdog; inf let a body
            # dribble for ever and a shutdown wait for ever
            finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not finite or value < 0 or (positive and value == 0):
                bound = "over 0" if positive else "0 or more"
                raise InvalidConfigError(
                    f"{flag(name)} must be a finite number of seconds {bound} (got {value!r}); e.g. {flag(name)} 30."
                )
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InvalidConfigError(
                f"--dtype {self.dtype!r} is not a dtype this server loads; give one of "
                f"{', '.join(sorted(set(DTYPES.values())))}, or leave it out."
            )
        if not self.base_name:
            raise InvalidConfigError("--name is empty; give the base's model id, or leave --name out.")

    def replace(self, **changes) -> ServeConfig:
        """A copy with `changes` (checked again)."""
        return dataclasses.replace(self, **changes)


_OPTIONAL = {f.name for f in dataclasses.fields(ServeConfig) if f.default is None}
