"""``python -m broadcast_history.demo``: the same as ``broadcast-history demo``."""

import typer

from ._command import demo

if __name__ == "__main__":
    typer.run(demo)
