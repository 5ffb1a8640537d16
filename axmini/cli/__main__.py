"""`python -m axmini.cli ...` is `axmini ...` (how `axmini launch local` starts each process)."""

import sys

from axmini.cli import main

sys.exit(main())
