"""``python -m rib_client``: the ``rib-remote`` command line (``rib remote`` runs this)."""

import sys

from rib_client.cli import main

sys.exit(main())
