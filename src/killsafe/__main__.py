"""``python -m killsafe`` runs the command line."""

from killsafe.cli import main

raise SystemExit(main())
