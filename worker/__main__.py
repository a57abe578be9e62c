"""``python -m worker`` runs the same command line as the ``tagstream`` script."""

from worker.cli import main

raise SystemExit(main())
