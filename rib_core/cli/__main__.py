"""``python -m rib_core.cli``: the ``rib`` command."""

import sys

from rib_core.cli import main

sys.exit(main())
