"""``python -m txgateway``: the same as the ``txgateway`` command."""

from txgateway.cli import main

raise SystemExit(main())
