"""``python -m benchmarks.peers``: the peer comparison (see ``benchmarks.peers_main``)."""

import sys

from benchmarks.peers_main import main

sys.exit(main())
