"""``python -m lab``: the fault lab's command line (see ``lab.runner``)."""

from lab.runner import main

raise SystemExit(main())
