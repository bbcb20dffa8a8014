"""`python -m mambascope` runs the CLI."""

import sys

from mambascope.cli.main import main

sys.exit(main())
