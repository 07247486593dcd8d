"""`python -m bertforge` (also what torchrun launches)."""

import sys

from bertforge.cli import main

sys.exit(main())
