"""``python -m broadcast_history.cli``: the same as the ``broadcast-history`` command."""

from . import main

main()
