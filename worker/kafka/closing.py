"""Closing a client that may hang, without hanging with it.

librdkafka's close can wait for good: a transactional producer's close first aborts the
open transaction and waits for a coordinator that may be gone, and a consumer's close
leaves its group the same way. A client being replaced is therefore closed on a thread of
its own; one whose close has not finished in time is kept referenced for the life of the
process, since destroying it (explicitly or by garbage collection) while a thread is
inside it could block or crash.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final

# Clients whose close did not finish in time, or that were left inside a hung call.
_ABANDONED: Final[list[object]] = []


def keep_forever(client: object) -> None:
    """Keep ``client`` referenced for good (it must never be destroyed)."""
    _ABANDONED.append(client)


def close_within(client: object, close: Callable[[], None], wait_s: float, name: str) -> bool:
    """Run ``close`` on a daemon thread called ``name`` and wait at most ``wait_s``.
    True if it finished; otherwise ``client`` is kept forever and False returned."""
    closed = threading.Event()

    def run() -> None:
        try:
            close()
        finally:
            closed.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    if closed.wait(wait_s):
        return True
    keep_forever(client)
    return False
