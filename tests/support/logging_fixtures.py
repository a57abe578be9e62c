"""A fixture that undoes process-wide logging set-up (what ``tagstream run`` does first)."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator

import pytest
import structlog

from worker.observability.logs import clear_process_context
from worker.observability.redaction import clear_secrets


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Root handlers and level, excepthooks, structlog, context and registered secrets are
    as they were before the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = sys.excepthook, threading.excepthook
    yield
    root.handlers, root.level = handlers, level
    sys.excepthook, threading.excepthook = hooks
    logging.captureWarnings(False)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    clear_secrets()
    clear_process_context()
