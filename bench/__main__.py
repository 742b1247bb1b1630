import sys

if sys.argv[1:2] == ["streams"]:
    from .streams import main as streams

    sys.exit(streams(sys.argv[2:]))
if sys.argv[1:2] == ["metrics"]:
    from .metrics_cost import main as metrics_cost

    sys.exit(metrics_cost(sys.argv[2:]))
if sys.argv[1:2] == ["h3"]:
    from .h3 import main as h3

    sys.exit(h3(sys.argv[2:]))
if sys.argv[1:2] == ["accesslog"]:
    from .accesslog import main as accesslog

    sys.exit(accesslog(sys.argv[2:]))

from .run import main

sys.exit(main())
