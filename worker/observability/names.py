"""Metric names: the ``tagstream_`` prefix every series carries."""

from __future__ import annotations

from typing import Final

PREFIX: Final = "tagstream"


def metric_name(suffix: str) -> str:
    return f"{PREFIX}_{suffix}"
