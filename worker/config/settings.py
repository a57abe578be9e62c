"""Typed settings, one class per concern, read from ``TAGSTREAM_*`` environment variables.

Every class validates at construction, so a bad value stops the worker at start-up with
a message that names the setting. List settings accept comma-separated strings
(``TAGSTREAM_LABELS=sports,finance``) as well as JSON lists.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.contract.events import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    DEFAULT_MAX_LABEL_CHARS,
    DEFAULT_MAX_LABELS,
    DEFAULT_MAX_METADATA_BYTES,
    DEFAULT_MAX_METADATA_DEPTH,
    DEFAULT_MAX_TEXT_CHARS,
    DEFAULT_THRESHOLD,
    check_labels,
    check_template,
)
from worker.contract.profiles import DEFAULT_MAX_PROFILE_RECORD_BYTES, DEFAULT_MAX_PROFILES

ENV_PREFIX = "TAGSTREAM_"
DEFAULT_MODEL = "facebook/bart-large-mnli"
# Padded tokens per forward pass: ~16k keeps a bart-large activation footprint well under
# 1 GiB in half precision while leaving enough rows per pass to saturate a modern GPU.
DEFAULT_MAX_BATCH_TOKENS = 16_384
# One event costs the model at most four full forward passes at the default token budget:
# enough for 100 labels on a 600-token text, and a cap on label x text amplification when
# the other limits are raised.
DEFAULT_MAX_EVENT_TOKENS = 4 * DEFAULT_MAX_BATCH_TOKENS

Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")]
Dtype = Literal["auto", "float32", "float16", "bfloat16", "int8"]
LongText = Literal["truncate", "chunk"]
ChunkAggregation = Literal["max", "mean"]
# Chunk mode: consecutive windows share this many tokens, so a sentence cut at one window's
# edge is read whole by the next one (a long sentence is ~40 tokens; 64 leaves room).
DEFAULT_CHUNK_OVERLAP_TOKENS = 64
# The overlap may take at most 1/2 of a window: every window then reads at least half new
# text, so TAGSTREAM_MAX_CHUNKS windows always cover at least that many half windows.
MAX_OVERLAP_DIVISOR = 2
# Chunk mode: at most 4 windows per event. With 1,024-token windows that reads ~16,000
# characters of text, and 16 labels x 4 full windows stay within DEFAULT_MAX_EVENT_TOKENS.
DEFAULT_MAX_CHUNKS = 4
# dtype=int8 quantizes on the CPU only: torch's dynamic int8 kernels have no CUDA or MPS version.
CPU_ONLY_DTYPES = frozenset({"int8"})


def split_csv(value: Any) -> Any:
    """Turn ``"a, b,c"`` into ``["a", "b", "c"]``; leave lists and JSON lists alone."""
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            return orjson.loads(stripped)
        return [part.strip() for part in stripped.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class _Base(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", validate_default=True, frozen=True
    )


class ModelSettings(_Base):
    """Which model scores the events, and where it runs."""

    model: str = Field(default=DEFAULT_MODEL, description="Hub id or local directory.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag, commit).")
    scorer: str = Field(
        default="nli",
        description="'nli', 'embedding', or 'module:attr' import path of a scorer factory.",
    )
    device: Device = "auto"
    dtype: Dtype = Field(
        default="auto",
        description="'int8': dynamic int8 quantization of the linear layers, CPU only.",
    )
    max_batch_tokens: int = Field(default=DEFAULT_MAX_BATCH_TOKENS, ge=64)
    long_text: LongText = Field(
        default="truncate",
        description="A text longer than the model reads: 'truncate' it, or 'chunk' it into "
        "overlapping token windows scored separately (NLI scorer only).",
    )
    chunk_tokens: int = Field(
        default=0,
        ge=0,
        description="Chunk mode: text tokens per window; 0 is as many as the model's maximum "
        "leaves beside the event's longest hypothesis (never more).",
    )
    chunk_overlap_tokens: int = Field(
        default=DEFAULT_CHUNK_OVERLAP_TOKENS,
        ge=0,
        description="Chunk mode: tokens consecutive windows share (at most half a window).",
    )
    max_chunks: int = Field(
        default=DEFAULT_MAX_CHUNKS,
        ge=1,
        description="Chunk mode: windows scored per event; the rest of a longer text is not "
        "read and the scored event says truncated.",
    )
    chunk_aggregation: ChunkAggregation = Field(
        default="max",
        description="Chunk mode: a label's score over the windows, 'max' or 'mean'.",
    )
    allow_pickle: bool = Field(
        default=False, description="Allow loading non-safetensors (pickle) weights."
    )
    trust_remote_code: bool = False

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, value: str) -> str:
        if value in ("nli", "embedding") or ":" in value:
            return value
        raise ValueError("scorer must be 'nli', 'embedding' or a 'module:attribute' path")

    @model_validator(mode="after")
    def _cpu_only_dtype(self) -> ModelSettings:
        if self.dtype in CPU_ONLY_DTYPES and self.device not in ("auto", "cpu"):
            raise ValueError(
                f"TAGSTREAM_DTYPE={self.dtype} runs on the CPU only; set TAGSTREAM_DEVICE=cpu "
                f"(got {self.device!r})"
            )
        return self

    @model_validator(mode="after")
    def _chunk_overlap(self) -> ModelSettings:
        if (
            self.chunk_tokens
            and self.chunk_overlap_tokens * MAX_OVERLAP_DIVISOR > self.chunk_tokens
        ):
            raise ValueError(
                f"TAGSTREAM_CHUNK_OVERLAP_TOKENS ({self.chunk_overlap_tokens}) may be at most "
                f"half of TAGSTREAM_CHUNK_TOKENS ({self.chunk_tokens})"
            )
        return self


class TaggingSettings(_Base):
    """How scores become tags, and the defaults for events that do not say."""

    multi_label: bool = True
    threshold: float = Field(default=DEFAULT_THRESHOLD, ge=0.0, le=1.0)
    label_thresholds: dict[str, float] = Field(
        default_factory=dict, description="Per-label thresholds overriding 'threshold'."
    )
    hypothesis_template: str = DEFAULT_HYPOTHESIS_TEMPLATE
    include_nli_probs: bool = False
    max_text_chars: int = Field(default=DEFAULT_MAX_TEXT_CHARS, ge=1)
    max_labels: int = Field(default=DEFAULT_MAX_LABELS, ge=1)
    max_label_chars: int = Field(
        default=DEFAULT_MAX_LABEL_CHARS, ge=1, description="Longest label an event may give."
    )
    max_metadata_bytes: int = Field(
        default=DEFAULT_MAX_METADATA_BYTES, ge=2, description="Largest metadata, as JSON."
    )
    max_metadata_depth: int = Field(
        default=DEFAULT_MAX_METADATA_DEPTH, ge=1, description="Deepest metadata nesting."
    )
    max_event_tokens: int = Field(
        default=DEFAULT_MAX_EVENT_TOKENS,
        ge=1,
        description="Most tokens one event may cost the model: labels x (text + hypothesis).",
    )
    # After the limits it obeys: its validator reads them.
    labels: CsvList = Field(default_factory=list, description="Default candidate labels.")

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        return split_csv(value)

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """The default labels obey the limits an event's own labels do."""
        if not value:
            return value
        max_labels = info.data.get("max_labels", DEFAULT_MAX_LABELS)
        max_label_chars = info.data.get("max_label_chars", DEFAULT_MAX_LABEL_CHARS)
        try:
            return check_labels(value, max_labels, max_label_chars)
        except ValueError as exc:
            raise ValueError(
                f"{exc} (TAGSTREAM_MAX_LABELS={max_labels}, "
                f"TAGSTREAM_MAX_LABEL_CHARS={max_label_chars})"
            ) from None

    @field_validator("label_thresholds")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for label, threshold in value.items():
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold for {label!r} must be within 0..1")
        return value

    @field_validator("hypothesis_template")
    @classmethod
    def _template(cls, value: str) -> str:
        return check_template(value)


# ---------------------------------------------------------------------------------------
# The streaming worker (``tagstream run``): Kafka, batching, delivery and shutdown.
# ---------------------------------------------------------------------------------------

DEFAULT_BOOTSTRAP_SERVERS = "localhost:9092"
DEFAULT_GROUP_ID = "tagstream"
# After its partitions were lost, a consumer that has no new assignment this long is
# replaced: a healthy rejoin takes seconds, while librdkafka can keep waiting for good on a
# group coordinator that restarted. Generous, so a slow rebalance is never cut short.
DEFAULT_REJOIN_TIMEOUT_S = 120.0
DEFAULT_CLIENT_ID = "tagstream"
DLQ_SUFFIX = ".dlq"
# 64 events fill a GPU forward pass for short texts without making one slow batch hold
# back the latency of the whole partition.
DEFAULT_MAX_BATCH_SIZE = 64
# A quiet stream still gets its answer within a twentieth of a second.
DEFAULT_MAX_WAIT_MS = 50
# One batch runs on the model while the next one is assembled: the minimum for overlap.
DEFAULT_MAX_IN_FLIGHT_BATCHES = 2
# Events decoded and waiting for the model pause the input at 32 MiB (~25,000 small events,
# seconds of input at full speed): far enough from empty that the model never waits for a
# refetch after a pause, small beside the model's own memory.
DEFAULT_MAX_BUFFERED_BYTES = 32 * 1024 * 1024
# Committing once a second bounds the replay after a crash to about a second of input.
DEFAULT_COMMIT_INTERVAL_MS = 1_000
# A record librdkafka could not deliver within its own message.timeout.ms (5 min) is retried;
# unwritten 10 minutes after its first failure, the topic is not coming back by itself.
DEFAULT_RETRY_DEADLINE_S = 600.0
# Per partition: what a crash may replay at most. 20k records are seconds of input at GPU
# speed, far above the few batches a healthy worker has in flight.
DEFAULT_MAX_UNCOMMITTED_RECORDS = 20_000
# Per partition: a record not done after 5 minutes is stuck (a write being retried), not
# slow; stop reading the partition further until it is done.
DEFAULT_MAX_UNCOMMITTED_AGE_S = 300.0
# The circuit judges the model on the last 200 events (a few batches): long enough that a
# burst of bad input is not taken for a broken model, short enough to react in seconds.
DEFAULT_CIRCUIT_WINDOW = 200
# Half the traffic failing is not the events' fault.
DEFAULT_CIRCUIT_FAILURE_SHARE = 0.5
# Ten minutes of retries without a working model: stop and let the orchestrator (and its
# alert on restarts) take over.
DEFAULT_CIRCUIT_MAX_OPEN_S = 600.0
# Long enough for a couple of GPU batches to finish, short enough not to stall the group.
DEFAULT_REVOKE_TIMEOUT_MS = 10_000
# Kubernetes sends SIGKILL 30 s after SIGTERM by default; stay at or under it.
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
# librdkafka's own default: the coordinator aborts a transaction open longer than this, and
# a read_committed reader waits at most this long behind a crashed worker's open one.
DEFAULT_TRANSACTION_TIMEOUT_MS = 60_000
# A transaction stays open for a commit interval plus its drain: the interval may take at
# most this share of the transaction timeout, the rest is the drain's.
MAX_COMMIT_SHARE_OF_TRANSACTION = 0.5

ProcessingGuarantee = Literal["at-least-once", "exactly-once"]

# Extra librdkafka settings that would break the at-least-once guarantee.
PROTECTED_CONSUMER_KEYS = frozenset(
    {
        "enable.auto.commit",
        "enable.auto.offset.store",
        # Set from TAGSTREAM_ASSIGNMENT_STRATEGY / TAGSTREAM_GROUP_PROTOCOL: the rebalance
        # callbacks assign incrementally or eagerly to match them.
        "partition.assignment.strategy",
        "group.protocol",
        # read_committed in both modes: aborted upstream records are never scored.
        "isolation.level",
    }
)
PROTECTED_PRODUCER_KEYS = frozenset(
    {
        "enable.idempotence",
        "acks",
        "request.required.acks",
        # Set from TAGSTREAM_TRANSACTIONAL_ID / TAGSTREAM_TRANSACTION_TIMEOUT_MS in
        # exactly-once mode; a transactional producer in at-least-once mode would never commit.
        "transactional.id",
        "transaction.timeout.ms",
    }
)

KafkaValue = str | int | float | bool
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]


def parse_json_map(value: Any) -> Any:
    """Accept a JSON object string (env, CLI) as well as a mapping (YAML, code)."""
    if isinstance(value, str):
        return orjson.loads(value) if value.strip() else {}
    return value


def _check_extra(value: dict[str, KafkaValue], protected: frozenset[str]) -> dict[str, KafkaValue]:
    clashes = sorted(protected.intersection(value))
    if clashes:
        raise ValueError(f"{', '.join(clashes)} is managed by the worker and cannot be overridden")
    return value


class KafkaSettings(_Base):
    """Where the worker reads and writes, how it joins its group, and how it authenticates."""

    bootstrap_servers: str = Field(default=DEFAULT_BOOTSTRAP_SERVERS, min_length=1)
    input_topics: CsvList = Field(default_factory=list, description="Topics to consume.")
    input_topic_regex: str | None = Field(
        default=None, description="Subscribe to every topic matching this regex instead."
    )
    output_topic: str = Field(min_length=1, description="Where scored events go (required).")
    dlq_topic: str | None = Field(
        default=None, description="Dead-letter topic; '<output_topic>.dlq' when not set."
    )
    group_id: str = Field(default=DEFAULT_GROUP_ID, min_length=1)
    group_instance_id: str | None = Field(
        default=None, description="Static group membership: a stable id per replica."
    )
    transactional_id: str | None = Field(
        default=None,
        min_length=1,
        description="Exactly-once: this worker's transactional.id, stable and unique per "
        "replica; '<group_id>-<group_instance_id>' when that is set, else unique per process.",
    )
    client_id: str = Field(default=DEFAULT_CLIENT_ID, min_length=1)
    assignment_strategy: Literal["cooperative-sticky", "range", "roundrobin"] = "cooperative-sticky"
    group_protocol: Literal["classic", "consumer"] = Field(
        default="classic", description="'consumer' selects the KIP-848 group protocol."
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest", description="Where a group without committed offsets starts."
    )
    rejoin_timeout_s: float = Field(
        default=DEFAULT_REJOIN_TIMEOUT_S,
        gt=0.0,
        description="After its partitions were lost, a consumer with no new assignment this "
        "long is replaced by a new one (once per loss).",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    consumer_config: dict[str, KafkaValue] = Field(
        default_factory=dict, description="Extra librdkafka consumer settings (JSON object)."
    )
    producer_config: dict[str, KafkaValue] = Field(
        default_factory=dict, description="Extra librdkafka producer settings (JSON object)."
    )

    @field_validator("input_topics", mode="before")
    @classmethod
    def _split_topics(cls, value: Any) -> Any:
        return split_csv(value)

    @field_validator("consumer_config", "producer_config", mode="before")
    @classmethod
    def _parse_map(cls, value: Any) -> Any:
        return parse_json_map(value)

    @field_validator("consumer_config")
    @classmethod
    def _consumer_extra(cls, value: dict[str, KafkaValue]) -> dict[str, KafkaValue]:
        return _check_extra(value, PROTECTED_CONSUMER_KEYS)

    @field_validator("producer_config")
    @classmethod
    def _producer_extra(cls, value: dict[str, KafkaValue]) -> dict[str, KafkaValue]:
        return _check_extra(value, PROTECTED_PRODUCER_KEYS)

    @field_validator("input_topic_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_input(self) -> KafkaSettings:
        if bool(self.input_topics) == bool(self.input_topic_regex):
            raise ValueError(
                "set exactly one of TAGSTREAM_INPUT_TOPICS and TAGSTREAM_INPUT_TOPIC_REGEX"
            )
        if self.sasl_mechanism is not None and not self.security_protocol.startswith("SASL"):
            raise ValueError(
                "TAGSTREAM_SASL_MECHANISM needs TAGSTREAM_SECURITY_PROTOCOL "
                "SASL_PLAINTEXT or SASL_SSL"
            )
        return self

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.output_topic}{DLQ_SUFFIX}"

    @property
    def subscription(self) -> list[str]:
        """Topic names, or the regex in librdkafka's form (a leading ``^``)."""
        if self.input_topic_regex is None:
            return list(self.input_topics)
        regex = self.input_topic_regex
        return [regex if regex.startswith("^") else f"^{regex}"]


class BatchSettings(_Base):
    """When a micro-batch closes, how many may be in flight, and how much may wait."""

    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1)
    max_wait_ms: int = Field(default=DEFAULT_MAX_WAIT_MS, ge=0)
    max_in_flight_batches: int = Field(default=DEFAULT_MAX_IN_FLIGHT_BATCHES, ge=1)
    max_buffered_bytes: int = Field(
        default=DEFAULT_MAX_BUFFERED_BYTES,
        ge=1024,
        description="Events waiting for the model, in bytes, that pause the input.",
    )


class DeliverySettings(_Base):
    """The delivery guarantee, how often done offsets are committed, and how far the commit
    may fall behind."""

    processing_guarantee: ProcessingGuarantee = Field(
        default="at-least-once",
        description="'exactly-once': outputs, dead letters and input offsets in one "
        "Kafka transaction per commit interval.",
    )
    transaction_timeout_ms: int = Field(
        default=DEFAULT_TRANSACTION_TIMEOUT_MS,
        ge=1_000,
        le=900_000,
        description="Exactly-once: the broker aborts a transaction open this long; bounds "
        "every wait of a transaction commit or abort.",
    )
    commit_interval_ms: int = Field(default=DEFAULT_COMMIT_INTERVAL_MS, ge=1)
    retry_deadline_s: float = Field(
        default=DEFAULT_RETRY_DEADLINE_S,
        gt=0.0,
        description="A record unwritten this long after its first failure stops the worker.",
    )
    max_uncommitted_records: int = Field(
        default=DEFAULT_MAX_UNCOMMITTED_RECORDS,
        ge=1,
        description="Per partition: received records past the first not done that pause it.",
    )
    max_uncommitted_age_s: float = Field(
        default=DEFAULT_MAX_UNCOMMITTED_AGE_S,
        gt=0.0,
        description="Per partition: age of the oldest record not done that pauses it.",
    )

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee == "exactly-once"

    @model_validator(mode="after")
    def _transaction_room(self) -> DeliverySettings:
        limit = self.transaction_timeout_ms * MAX_COMMIT_SHARE_OF_TRANSACTION
        if self.exactly_once and self.commit_interval_ms > limit:
            raise ValueError(
                "TAGSTREAM_PROCESSING_GUARANTEE=exactly-once needs TAGSTREAM_COMMIT_INTERVAL_MS "
                f"at most half of TAGSTREAM_TRANSACTION_TIMEOUT_MS ({self.transaction_timeout_ms}):"
                " a transaction stays open for a commit interval plus its drain"
            )
        return self


class CircuitSettings(_Base):
    """When failing events mean a failing model: stop dead-lettering, pause, retry."""

    circuit_window: int = Field(
        default=DEFAULT_CIRCUIT_WINDOW, ge=1, description="Last scored events counted."
    )
    circuit_failure_share: float = Field(
        default=DEFAULT_CIRCUIT_FAILURE_SHARE,
        gt=0.0,
        le=1.0,
        description="Share of failed events in the window that opens the circuit.",
    )
    circuit_max_open_s: float = Field(
        default=DEFAULT_CIRCUIT_MAX_OPEN_S,
        gt=0.0,
        description="A circuit open this long stops the worker (fatal exit).",
    )


# Reading a control topic of at most max_profiles small records takes well under a second;
# a minute means the brokers do not answer, and a worker must not start without its labels.
DEFAULT_CONTROL_LOAD_TIMEOUT_S = 60.0


class ProfileSettings(_Base):
    """Label profiles from a compacted control topic: where, and how much of it a worker
    keeps."""

    control_topic: str | None = Field(
        default=None,
        min_length=1,
        description="Compacted topic of label profiles (key: name, value: JSON); none: off.",
    )
    max_profiles: int = Field(
        default=DEFAULT_MAX_PROFILES,
        ge=1,
        description="Most profiles a worker holds; a record for one more is rejected.",
    )
    max_profile_record_bytes: int = Field(
        default=DEFAULT_MAX_PROFILE_RECORD_BYTES,
        ge=64,
        description="Largest control record value; a larger one is rejected.",
    )
    control_load_timeout_s: float = Field(
        default=DEFAULT_CONTROL_LOAD_TIMEOUT_S,
        gt=0.0,
        description="Start-up: the control topic must be read to its end within this.",
    )


class ShutdownSettings(_Base):
    """How long revokes and shutdowns wait for in-flight work."""

    revoke_timeout_ms: int = Field(default=DEFAULT_REVOKE_TIMEOUT_MS, ge=0)
    shutdown_timeout_s: float = Field(default=DEFAULT_SHUTDOWN_TIMEOUT_S, ge=0.0)
