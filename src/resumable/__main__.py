"""``python -m resumable`` runs the command line."""

from resumable.cli import main

raise SystemExit(main())
