"""The ``broadcast-history`` command line (Typer + Rich).

Every module of this package whose name does not start with ``_`` is imported on
start-up and may add commands to :data:`app`::

    # broadcast_history/cli/demo.py
    from ._app import app

    @app.command()
    def demo() -> None: ...
"""

from __future__ import annotations

import importlib
import pkgutil

from . import _db, _read, _serve, _write  # noqa: F401  (they register their commands)
from ._app import DEFAULT_LOG, app, main


def _load_extensions() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_load_extensions()

__all__ = ["DEFAULT_LOG", "app", "main"]
