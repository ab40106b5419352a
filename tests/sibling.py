"""Importing another folder's test module from a test (tests/ is on ``sys.path``: pytest puts conftest.py's
folder there)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def load_test_module(folder: str, name: str):
    """tests/FOLDER/NAME.py as a module, under the name pytest gives it (so that caches are shared when
    both files run)."""
    if name not in sys.modules:
        sys.path.insert(0, str(TESTS / folder))
        try:
            importlib.import_module(name)
        finally:
            sys.path.remove(str(TESTS / folder))
    return sys.modules[name]
