"""``python -m bench.gc_default_node serve --config X``: a Hapax node with CPython's default GC.

``node.server.tune_gc`` (freeze after start-up, larger thresholds) is skipped, so
``python -m bench streams --gc tuned,default`` can show what it does in one run.
"""

from __future__ import annotations

import sys

import node.server
from node.cli import main

if __name__ == "__main__":
    node.server.tune_gc = lambda: None
    sys.exit(main(sys.argv[1:]))
