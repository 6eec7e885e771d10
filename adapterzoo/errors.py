"""Every error adapterzoo raises on bad input, in one place.

Each class says what went wrong; each message also says how to fix it. All of them derive from
`AdapterZooError`, and each also derives from the built-in exception a Python user would reach
for first (`ValueError`, `KeyError`, ...), so `except ValueError` keeps working.
"""

from __future__ import annotations


class AdapterZooError(Exception):
    """Base class of every error adapterzoo raises on purpose."""

    def __str__(self) -> str:  # KeyError would otherwise print the message inside quotes
        return str(self.args[0]) if self.args else ""


class UnknownAdapterTypeError(AdapterZooError, KeyError):
    """An adapter type name that no installed plugin registers."""


class InvalidConfigError(AdapterZooError, ValueError):
    """An adapter config with an unknown key or a value out of range."""


class InvalidNameError(AdapterZooError, ValueError):
    """An adapter name that is empty, has a path separator or `..`, or is otherwise unsafe."""


class UnknownAdapterError(AdapterZooError, KeyError):
    """An adapter name that is not in the zoo."""


class AdapterExistsError(AdapterZooError, ValueError):
    """Adding an adapter under a name that is taken."""


class AdapterFileError(AdapterZooError, ValueError):
    """A saved adapter that cannot be read: missing, truncated, corrupt, or a pickle file."""


class UnsupportedFormatError(AdapterFileError):
    """A foreign adapter (PEFT, AdapterHub) using an option adapterzoo cannot reproduce exactly."""


class HubError(AdapterZooError, RuntimeError):
    """A push to or pull from a Hub (or a registry speaking its API) that failed."""


class ShapeMismatchError(AdapterZooError, ValueError):
    """Adapter tensors whose shapes do not match what the type and the base expect."""


class BaseMismatchError(AdapterZooError, ValueError):
    """An adapter saved for another base model (its fingerprint differs)."""


class PoolLimitError(AdapterZooError, ValueError):
    """An adapter bigger than its slot pool allows (rank, bottleneck, prefix length...)."""


class PoolFullError(AdapterZooError, RuntimeError):
    """A batch needs more distinct adapters of one pool than the pool has slots."""


class BatchError(AdapterZooError, ValueError):
    """A batch whose inputs disagree (e.g. `adapters` has another length than the batch)."""


class PluginError(AdapterZooError, RuntimeError):
    """A plugin that breaks the contract (bad hook name, duplicate type name, missing attribute)."""


class UnknownTaskError(AdapterZooError, KeyError):
    """An unknown task name (`adapterzoo.tasks`); the message lists the closest known names."""


# ----------------------------------------------------------------------------- Serving
# Raised by the continuous-batching engine (adapterzoo.serve.engine); HTTP maps each to a status.


class EngineError(AdapterZooError, RuntimeError):
    """The engine could not take or finish a request."""


class QueueFullError(EngineError):
    """More requests are waiting than the engine's queue limit allows: retry later (HTTP 429)."""


class EngineClosedError(EngineError):
    """The engine is shutting down (or stopped) and takes no new requests (HTTP 503)."""


class ContextLengthError(BatchError):
    """A prompt (with its adapter's virtual tokens) plus max_tokens does not fit the base's context."""


class MaxTokensError(ContextLengthError):
    """max_tokens alone is over the base's context length."""


class RequestFailedError(EngineError):
    """One request could not go on (its logits were NaN or inf, sampling failed, its adapter
    raised in a forward). Only that request fails; the batch it ran in goes on."""


class AdapterLoadError(EngineError):
    """The adapter a request names could not be loaded (corrupt file, registry down, ...)."""

    @classmethod
    def wrap(cls, name: str | None, exc: BaseException) -> BaseException:
        """What a request for adapter `name` fails with when loading it raised `exc`: an
        `UnknownAdapterError` as it is (404), anything else as an `AdapterLoadError` (500)."""
        if isinstance(exc, UnknownAdapterError):
            return exc
        return cls(f"adapter {name!r} could not be loaded: {exc}")


# ----------------------------------------------------------------------------- Training


class TrainingError(AdapterZooError, ValueError):
    """Bad training input: empty or malformed examples, a label outside the head's classes, a
    sequence longer than the base allows, an adapter of another type, a bad option."""


class TrainingDivergedError(AdapterZooError, RuntimeError):
    """The loss became nan or inf; the adapters were restored to their last good state."""


# HTTP


class APIError(AdapterZooError):
    """An answer of the OpenAI-compatible server: an HTTP status and OpenAI's error fields
    (`{"error": {"message", "type", "param", "code"}}`). Raised by its routes; each leaves as JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(AdapterZooError):
    """The client went away while sending its body: nothing to answer, nothing to log."""
