"""The exit codes of every ``tagstream`` command, defined once.

=====  =============================================================================
0      success; ``run``: a graceful stop (SIGTERM/SIGINT)
1      ``run``: a second signal cut the stop short; ``produce``: events left
       undelivered; ``replay``: a replay not acknowledged, the end not reached, or
       interrupted; ``schemas --check``: the committed schemas drifted
2      usage: an invalid or missing setting (the message names it), a missing topic,
       a metrics port that is taken, a scorer that cannot be built
3      ``run``: a fatal runtime error stopped the worker (a model that cannot be loaded
       or warmed up included); ``replay``: a fatal Kafka error
=====  =============================================================================
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_INTERRUPTED: Final = 1
EXIT_UNDELIVERED: Final = 1
EXIT_DRIFT: Final = 1
EXIT_USAGE: Final = 2
EXIT_FATAL: Final = 3
