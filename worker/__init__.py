"""tagstream: a Kafka worker that tags text events with zero-shot classification."""

__version__ = "0.1.0"
