"""The ``broadcast-history`` command line (Typer + Rich, the ``admin`` extra).

Every module of this package whose name does not start with ``_`` is imported on
start-up and may add commands to :data:`app`::

    # broadcast_history/cli/demo.py
    from ._app import app

    @app.command()
    def demo() -> None: ...

Importing this package needs nothing beyond the core install: the command's own
dependencies are loaded by :func:`main` (or on first use of :data:`app`), so that a
missing extra is named instead of failing with a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._app import app
    from ._options import DEFAULT_LOG

# What the command line imports that the core install lacks: all in the admin extra.
_ADMIN_MODULES = {"typer", "rich", "click", "fastapi", "starlette", "uvicorn", "pydantic"}


def _load() -> Any:
    from . import _consumers, _db, _read, _serve, _write  # noqa: F401  (they register commands)
    from ._app import app

    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    return app


def main() -> None:
    """Entry point of the ``broadcast-history`` command."""
    try:
        app = _load()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _ADMIN_MODULES:
            raise
        print(
            f"broadcast-history needs the admin extra ({exc.name} is missing): "
            "pip install 'broadcast-history[admin]'",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    app(prog_name="broadcast-history")


if not TYPE_CHECKING:  # type checkers see the imports above: a misspelled name is an error

    def __getattr__(name: str) -> Any:
        if name == "app":
            return _load()
        if name == "DEFAULT_LOG":
            from ._options import DEFAULT_LOG

            return DEFAULT_LOG
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_LOG", "app", "main"]
