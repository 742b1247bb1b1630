"""``python -m bench.cprofile_node serve --config X``: a Hapax node under cProfile.

The stats go to the file named by ``HAPAX_BENCH_CPROFILE`` when the node exits
(SIGTERM drains and returns normally). Used only by ``python -m bench --profile cprofile``.
"""

from __future__ import annotations

import cProfile
import os
import sys

from node.cli import main

if __name__ == "__main__":
    prof = cProfile.Profile()
    prof.enable()
    try:
        rc = main(sys.argv[1:])
    finally:
        prof.disable()
        prof.dump_stats(os.environ["HAPAX_BENCH_CPROFILE"])
    sys.exit(rc)
