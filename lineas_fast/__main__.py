"""``python -m lineas_fast`` — the same as the ``lineas-fast`` command."""

import sys

from .cli import main

sys.exit(main())
