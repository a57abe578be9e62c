"""The worker's whole configuration: environment, an optional YAML file, and CLI flags.

Precedence, highest first: CLI flags, ``TAGSTREAM_*`` environment variables, the YAML
file, the defaults. The YAML file is a flat mapping whose keys are the setting names
(the environment names without the prefix, lower case), for example::

    bootstrap_servers: kafka-0:9092,kafka-1:9092
    input_topics: [news]
    output_topic: news.tagged
    labels: [sports, politics, finance]
    max_batch_size: 32
    consumer_config: {fetch.min.bytes: 1024}

A value that does not validate, an unknown YAML key, or a missing required setting raises
:class:`ConfigError`, whose message names the setting by its environment name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from pydantic_settings import SettingsError as PydanticSettingsError

from worker.config.observability import ObservabilitySettings, TracingSettings
from worker.config.settings import (
    ENV_PREFIX,
    BatchSettings,
    CircuitSettings,
    DeliverySettings,
    KafkaSettings,
    ModelSettings,
    ProfileSettings,
    ShutdownSettings,
    TaggingSettings,
)
from worker.errors import ConfigError

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Everything ``tagstream run`` is configured with, one object per concern."""

    kafka: KafkaSettings
    model: ModelSettings
    tagging: TaggingSettings
    batch: BatchSettings
    delivery: DeliverySettings
    circuit: CircuitSettings
    shutdown: ShutdownSettings
    observability: ObservabilitySettings
    profiles: ProfileSettings
    tracing: TracingSettings


# The classes that make up RunSettings, by RunSettings field name. Every setting name is
# unique across them (a unit test checks it), so one flat namespace (env, YAML, flags)
# addresses them all.
SECTIONS: dict[str, type[BaseSettings]] = {
    "kafka": KafkaSettings,
    "model": ModelSettings,
    "tagging": TaggingSettings,
    "batch": BatchSettings,
    "delivery": DeliverySettings,
    "circuit": CircuitSettings,
    "shutdown": ShutdownSettings,
    "observability": ObservabilitySettings,
    "profiles": ProfileSettings,
    "tracing": TracingSettings,
}


def env_name(setting: str) -> str:
    """``max_batch_size`` -> ``TAGSTREAM_MAX_BATCH_SIZE``."""
    return f"{ENV_PREFIX}{setting.upper()}"


def setting_names() -> dict[str, type[BaseSettings]]:
    """Every setting name and the class that owns it."""
    return {name: cls for cls in SECTIONS.values() for name in cls.model_fields}


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML file as a flat mapping; unknown keys are an error, not silently ignored."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: cannot read: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting names to values")
    known = setting_names()
    unknown = sorted(str(key) for key in loaded if key not in known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown setting(s): {', '.join(unknown)}")
    return {str(key): value for key, value in loaded.items()}


def describe_setting(name: str, flag_names: Mapping[str, str] | None = None) -> str:
    """How an error names a setting: ``TAGSTREAM_MAX_BATCH_SIZE (max_batch_size)``, or with
    a command's own flag ``threshold (--threshold / TAGSTREAM_THRESHOLD)``."""
    flag = (flag_names or {}).get(name)
    if flag is None:
        return f"{env_name(name)} ({name})"
    return f"{name} (--{flag.replace('_', '-')} / {env_name(name)})"


def describe_errors(exc: ValidationError, flag_names: Mapping[str, str] | None = None) -> str:
    """The one message for invalid settings, every command alike: each broken setting by
    name, environment variable (and flag), and what is wrong with it; never its value."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        location = error.get("loc") or ()
        if location:
            message = f"{describe_setting(str(location[0]), flag_names)}: {message}"
        parts.append(message)
    return "invalid setting: " + "; ".join(parts)


def _env_is_set(name: str, environ: Mapping[str, str]) -> bool:
    wanted = env_name(name)
    return any(key.upper() == wanted for key in environ)


def build_section(
    cls: type[SettingsT],
    file_values: Mapping[str, Any],
    flags: Mapping[str, Any],
    flag_names: Mapping[str, str] | None = None,
) -> SettingsT:
    """One settings class from flags > environment > file > defaults; raises
    :class:`ConfigError` (``flag_names``: the command's flag of each setting, for the
    message)."""
    own = cls.model_fields
    from_file = {
        key: value
        for key, value in file_values.items()
        if key in own and not _env_is_set(key, os.environ)
    }
    from_flags = {key: value for key, value in flags.items() if key in own}
    try:
        return cls(**{**from_file, **from_flags})
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, flag_names)) from None
    except PydanticSettingsError as exc:
        raise ConfigError(f"invalid setting: {exc}") from None


def load_observability_settings(
    config_file: Path | None = None, flags: Mapping[str, Any] | None = None
) -> ObservabilitySettings:
    """Only the logging and HTTP settings, from the same sources as the rest: read first,
    so that logging is configured before anything else can fail. Raises
    :class:`ConfigError`."""
    file_values = read_yaml(config_file) if config_file is not None else {}
    return build_section(ObservabilitySettings, file_values, dict(flags or {}))


def load_run_settings(
    config_file: Path | None = None, flags: Mapping[str, Any] | None = None
) -> RunSettings:
    """Read and validate the whole configuration; raises :class:`ConfigError`."""
    file_values = read_yaml(config_file) if config_file is not None else {}
    given = dict(flags or {})
    return RunSettings(
        kafka=build_section(KafkaSettings, file_values, given),
        model=build_section(ModelSettings, file_values, given),
        tagging=build_section(TaggingSettings, file_values, given),
        batch=build_section(BatchSettings, file_values, given),
        delivery=build_section(DeliverySettings, file_values, given),
        circuit=build_section(CircuitSettings, file_values, given),
        shutdown=build_section(ShutdownSettings, file_values, given),
        observability=build_section(ObservabilitySettings, file_values, given),
        profiles=build_section(ProfileSettings, file_values, given),
        tracing=build_section(TracingSettings, file_values, given),
    )
