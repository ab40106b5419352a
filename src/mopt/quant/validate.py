"""Field checks for ModelOpt quantization configs: types, finite numbers, integers that are integers.

JSON gives Python ``bool`` (an ``int`` subclass), ``float`` (also NaN and infinities), integers of
any length and arbitrary nesting; each check below accepts exactly one meaning of a field and
raises :class:`QuantConfigError` naming the field and what it expected otherwise.
"""

from __future__ import annotations

import math
import re
from typing import Any

from mopt.errors import MoptError


class QuantConfigError(MoptError):
    """A quantization config that mopt cannot use; the message names the field."""


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def optional_str(value: Any, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise QuantConfigError(f"{field} must be a string or null, got {_describe(value)}")


def algo_name(value: Any, field: str) -> str:
    """A non-empty algorithm name, upper-cased (ModelOpt writes some lower-case)."""
    if not isinstance(value, str) or not value.strip():
        raise QuantConfigError(f"{field} must be a non-empty string, got {_describe(value)}")
    return value.strip().upper()


def module_patterns(value: Any, field: str) -> list[str]:
    """An exclusion list: module names or ``fnmatch`` patterns; null means none.

    An empty string would exclude every layer through the legacy substring rule, so it is
    refused rather than read that way.
    """
    if value is None:
        return []
    if not isinstance(value, list):
        raise QuantConfigError(f"{field} must be a list of module names, got {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise QuantConfigError(f"{field}[{i}] must be a module name (a string), got {_describe(item)}")
        if not item.strip():
            raise QuantConfigError(f"{field}[{i}] is an empty module name")
    return list(value)


_INTEGER_TEXT = re.compile(r"^[+-]?\d{1,18}$")


def optional_int(value: Any, field: str) -> int | None:
    """An integer given as a JSON integer, an integral finite float (16.0) or decimal text ("16")."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise QuantConfigError(f"{field} must be an integer, got {_describe(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise QuantConfigError(f"{field} must be an integer, got {_describe(value)}")
    if isinstance(value, str) and _INTEGER_TEXT.match(value.strip()):
        return int(value)
    raise QuantConfigError(f"{field} must be an integer, got {_describe(value)}")


def optional_dict(value: Any, field: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise QuantConfigError(f"{field} must be an object, got {_describe(value)}")
