"""``mopt serve``: an OpenAI-compatible HTTP server over :class:`mopt.engine.async_engine.AsyncEngine`, which
runs in a process of its own behind :class:`mopt.engine.process_client.EngineProcessClient` (or, with
``--no-engine-process``, in a thread of the server's process).

Needs the ``serve`` extra (``pip install 'mopt[serve]'``: fastapi, uvicorn, pydantic,
prometheus-client); ``import mopt`` and every other command work without it.
"""

from __future__ import annotations

import importlib

SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic": "pydantic",
                  "prometheus_client": "prometheus-client"}


def missing_packages() -> list[str]:
    """The ``serve`` extra's packages that cannot be imported (by their pip names)."""
    missing = []
    for module, pip in SERVE_PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(pip)
    return missing


def require_serve_extra() -> None:
    """Raise a clear error naming the extra when one of its packages is missing."""
    missing = missing_packages()
    if missing:
        raise RuntimeError(f"mopt serve needs the 'serve' extra ({', '.join(missing)} missing): "
                           "pip install 'mopt[serve]'")
