"""``python -m lineas_fast.cli`` — the same as ``python -m lineas_fast`` and the ``lineas-fast`` command."""

import sys

from . import main

sys.exit(main())
