"""Reading JSON files and headers that may be malformed, with one error class per caller.

``json.loads`` alone lets through, or fails with low-level exceptions on, what real files
contain: text that is not UTF-8 (UTF-16 with a BOM), nesting deep enough for a
``RecursionError``, integers longer than Python's digit limit (``ValueError``), and duplicate
keys (silently, the last one wins). These helpers turn all of that into the caller's error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(data: bytes | str, where: str, error: type[ValueError]) -> Any:
    """Parse UTF-8 JSON ``data`` (``where`` names it in errors); duplicate keys are an error."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if data.startswith("\ufeff"):
        raise error(f"{where}: starts with a byte-order mark; JSON files must be UTF-8 without one")
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, duplicate keys, integers past the digit limit
        raise error(f"{where}: not valid JSON ({e})") from None


def read_json_object(path: Path, error: type[ValueError]) -> dict[str, Any]:
    """The JSON object in ``path``; anything else (unreadable, not JSON, not an object) is ``error``."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    value = parse_json(data, str(path), error)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
