"""``tagstream profiles``: write and read the label profiles of the control topic.

``tagstream profiles set NAME --labels a,b [...]`` validates the profile with the rules the
workers apply (``TAGSTREAM_MAX_LABELS``, ``TAGSTREAM_MAX_LABEL_CHARS``,
``TAGSTREAM_MAX_PROFILE_RECORD_BYTES``) and writes it, keyed by its name;
``tagstream profiles delete NAME`` writes the tombstone that deletes it;
``tagstream profiles list [--json]`` reads the control topic to its end, as a worker does
at start-up, and prints the profiles in force with their versions (rejected records are
logged on stderr, as the workers log them).

The topic is ``--topic`` or ``TAGSTREAM_CONTROL_TOPIC``; the Kafka connection and security
settings are those of ``tagstream run`` (``TAGSTREAM_*``, ``--config FILE``,
``--bootstrap-servers``). Exit status: 0 done, 1 the broker did not acknowledge the record,
2 a usage error or an invalid profile (the message names the flag or setting), 3 a fatal
Kafka error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Final

import orjson

from worker.commands.replay import load_kafka_settings
from worker.config.loading import build_section, read_yaml
from worker.config.settings import ProfileSettings, TaggingSettings, split_csv
from worker.contract.events import check_profile_name
from worker.contract.profiles import (
    Profile,
    ProfileLimits,
    ProfileSpec,
    parse_spec,
    validate_spec,
)
from worker.errors import ConfigError, KafkaFatalError, ProfileError
from worker.exit_codes import EXIT_FATAL, EXIT_OK, EXIT_UNDELIVERED, EXIT_USAGE
from worker.kafka.admin import missing_topics
from worker.kafka.config import control_consumer_config, producer_config
from worker.kafka.errors import ClientError
from worker.kafka.producer import KafkaProducer
from worker.observability.logs import configure_logging
from worker.pipeline.observer import Observer
from worker.pipeline.profiles import ProfileFeed, ProfileTable
from worker.pipeline.worker import connect_control_consumer

# The topic check and reading the control topic: a loaded cluster answers well within it,
# a wrong bootstrap address fails within half a minute.
METADATA_TIMEOUT_S: Final = 30.0
# The written record must be acknowledged before the command returns.
FLUSH_TIMEOUT_S: Final = 60.0
PROG: Final = "tagstream profiles"


def _threshold(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {value}")
    return number


def _label_threshold(value: str) -> tuple[str, float]:
    label, separator, number = value.rpartition("=")
    if not separator or not label:
        raise argparse.ArgumentTypeError(f"expected LABEL=THRESHOLD, got {value!r}")
    return label, _threshold(number)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topic", help="control topic [TAGSTREAM_CONTROL_TOPIC]")
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="YAML file of settings, as for `run`"
    )
    parser.add_argument(
        "--bootstrap-servers", help="Kafka bootstrap servers [TAGSTREAM_BOOTSTRAP_SERVERS]"
    )


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    set_parser = actions.add_parser("set", help="create or replace a profile")
    set_parser.add_argument("name", help="profile name (the record key)")
    set_parser.add_argument(
        "--labels", required=True, help="candidate labels, comma-separated or a JSON list"
    )
    set_parser.add_argument("--hypothesis-template", help="NLI hypothesis with '{}' once")
    choice = set_parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--multi-label", dest="multi_label", action="store_true", default=None, help="(default)"
    )
    choice.add_argument(
        "--single-label", dest="multi_label", action="store_false", help="one softmax choice"
    )
    set_parser.add_argument("--threshold", type=_threshold, help="tag threshold (default 0.5)")
    set_parser.add_argument(
        "--label-threshold",
        type=_label_threshold,
        action="append",
        default=[],
        metavar="LABEL=X",
        help="per-label threshold (repeatable)",
    )
    _common(set_parser)
    delete_parser = actions.add_parser("delete", help="delete a profile (a tombstone)")
    delete_parser.add_argument("name", help="profile name")
    _common(delete_parser)
    list_parser = actions.add_parser("list", help="print the profiles in force")
    list_parser.add_argument("--json", action="store_true", help="one JSON object per line")
    _common(list_parser)


class _Context:
    """The settings one invocation works with; raises :class:`ConfigError`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.kafka, _ = load_kafka_settings(args)
        file_values = read_yaml(args.config) if args.config is not None else {}
        profiles = build_section(ProfileSettings, file_values, {})
        tagging = build_section(TaggingSettings, file_values, {})
        topic = args.topic or profiles.control_topic
        if not topic:
            raise ConfigError("--topic is required (or TAGSTREAM_CONTROL_TOPIC)")
        self.topic: str = topic
        self.max_profiles = profiles.max_profiles
        self.load_timeout_s = profiles.control_load_timeout_s
        self.limits = ProfileLimits(
            max_labels=tagging.max_labels,
            max_label_chars=tagging.max_label_chars,
            max_record_bytes=profiles.max_profile_record_bytes,
        )


def spec_of(args: argparse.Namespace, limits: ProfileLimits) -> ProfileSpec:
    """The profile ``set`` writes, validated as a worker validates it; raises
    :class:`ConfigError` naming what is wrong."""
    obj: dict[str, Any] = {"labels": split_csv(args.labels)}
    if args.hypothesis_template is not None:
        obj["hypothesis_template"] = args.hypothesis_template
    if args.multi_label is not None:
        obj["multi_label"] = args.multi_label
    if args.threshold is not None:
        obj["threshold"] = args.threshold
    if args.label_threshold:
        obj["label_thresholds"] = dict(args.label_threshold)
    try:
        return parse_spec(validate_spec(obj, limits).to_json(), limits)
    except ProfileError as exc:
        raise ConfigError(f"invalid profile: {exc}") from None


def _usage(message: str) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    return EXIT_USAGE


def execute(args: argparse.Namespace) -> int:
    configure_logging(stream=sys.stderr)
    try:
        context = _Context(args)
        if args.action in ("set", "delete"):
            check_profile_name(args.name)
        value = spec_of(args, context.limits).to_json() if args.action == "set" else None
    except (ConfigError, ValueError) as exc:
        return _usage(str(exc))
    try:
        if args.action == "list":
            return _list(context, args.json)
        return _write(context, args.name, value)
    except KafkaFatalError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return EXIT_FATAL


def _write(context: _Context, name: str, value: bytes | None) -> int:
    """Write one control record (``None``: the tombstone) and wait for its acknowledgement."""
    if missing_topics(context.kafka, [context.topic], METADATA_TIMEOUT_S):
        return _usage(f"--topic {context.topic}: no such topic")
    failures: list[str] = []

    def delivered(error: ClientError | None) -> None:
        if error is not None:
            failures.append(error.message)

    producer = KafkaProducer(producer_config(context.kafka), on_error=_report_client_error)
    refused = producer.produce(context.topic, name.encode("utf-8"), value, [], delivered)
    if refused is not None:
        failures.append(refused.message)
    remaining = producer.flush(FLUSH_TIMEOUT_S)
    producer.close()
    if failures or remaining:
        reason = failures[0] if failures else f"not acknowledged within {FLUSH_TIMEOUT_S:g} s"
        sys.stderr.write(f"{PROG}: {name} not written: {reason}\n")
        return EXIT_UNDELIVERED
    verb = "set" if value is not None else "deleted"
    sys.stderr.write(f"profile {name} {verb} in {context.topic}\n")
    return EXIT_OK


def _list(context: _Context, as_json: bool) -> int:
    """Read the control topic to its end as a worker does and print the profiles."""
    consumer = connect_control_consumer(control_consumer_config(context.kafka))
    table = ProfileTable(context.max_profiles, context.topic)
    feed = ProfileFeed(consumer, context.topic, table, context.limits, Observer())
    try:
        feed.start(context.load_timeout_s)
    finally:
        feed.close()
    for line in profile_lines(table.profiles(), as_json):
        sys.stdout.write(line + "\n")
    return EXIT_OK


def profile_lines(profiles: list[Profile], as_json: bool) -> list[str]:
    """The lines ``list`` prints: JSON objects, or a tab-separated table with a header."""
    if as_json:
        return [orjson.dumps(profile.describe()).decode() for profile in profiles]
    lines = ["name\tversion\tmulti_label\tthreshold\tlabel_thresholds\ttemplate\tlabels"]
    for profile in profiles:
        overrides = ",".join(f"{k}={v:g}" for k, v in sorted(profile.label_thresholds.items()))
        lines.append(
            f"{profile.name}\t{profile.version}\t{str(profile.multi_label).lower()}\t"
            f"{profile.threshold:g}\t{overrides or '-'}\t{profile.hypothesis_template}\t"
            f"{','.join(profile.labels)}"
        )
    return lines


def _report_client_error(error: ClientError) -> None:
    if error.fatal:
        sys.stderr.write(f"{PROG}: {error.message}\n")
