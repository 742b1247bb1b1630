import sys

if sys.argv[1:2] == ["streams"]:
    from .streams import main as streams

    sys.exit(streams(sys.argv[2:]))

from .run import main

sys.exit(main())
