"""`python -m strop ...`: the same as the `strop` command."""

import sys

from strop.cli.main import main

sys.exit(main())
