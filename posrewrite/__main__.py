"""``python -m posrewrite`` runs the command line."""

from posrewrite.cli import main

raise SystemExit(main())
