"""``python -m scalable_shampoo_bench.step_time``: see the package's docstring, or ``--help``."""

import sys

from .main import main

sys.exit(main())
