"""`python -m twin` is the same as the `fleet-twin` command."""

from twin.cli import main

raise SystemExit(main())
