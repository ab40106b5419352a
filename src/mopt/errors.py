"""Errors mopt raises for inputs it cannot use: all ``ValueError`` subclasses of :class:`MoptError`.

Each message names what was wrong (file, tensor, config field, argument) and what was expected.
Classes that belong to one layer live beside it (``CheckpointError`` in ``engine.checkpoint``,
``WeightLoadError`` in ``layers.parameter``, ``QuantConfigError`` in ``quant.config``); the ones
several modules raise live here.
"""

from __future__ import annotations


class MoptError(ValueError):
    """Base of every error mopt raises for a bad input (checkpoint, config, argument or request)."""


class ModelConfigError(MoptError):
    """A model ``config.json`` field mopt cannot honour: out of range, inconsistent or unsupported."""


class EngineArgumentError(MoptError):
    """An argument of ``mopt.LLM(...)`` (device, dtype, cache and batching sizes) that is invalid."""


class RequestError(MoptError):
    """A request mopt cannot run: a bad prompt or ``SamplingParams`` (an HTTP server answers 400).

    ``field`` names the request field at fault (``"temperature"``, ``"prompt"``, ...) when one is,
    so a server can report it without parsing the message.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # pickled with its field (an engine in another process raises it to the server)
        return type(self), (str(self), self.field)
