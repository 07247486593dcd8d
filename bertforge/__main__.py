"""`python -m bertforge` (also what torchrun launches)."""

import sys

from bertforge.cli.main import main

sys.exit(main())
