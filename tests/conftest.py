"""Shared fixtures: the real Kafka broker harness and the tiny model builders."""

pytest_plugins = [
    "tests.support.kafka_fixtures",
    "tests.support.model_fixtures",
    "tests.support.logging_fixtures",
]
