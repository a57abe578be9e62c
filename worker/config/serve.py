"""Settings of ``tagstream serve``, the HTTP face of the scorer, from ``TAGSTREAM_SERVE_*``.

The model, tagging and batching settings are the worker's own (``ModelSettings``,
``TaggingSettings``, ``BatchSettings``): a request is scored exactly as an event would be.
What is here bounds what the HTTP server accepts before anything reaches the batcher.
"""

from __future__ import annotations

import enum
from typing import Final

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.config.observability import MAX_PORT
from worker.config.settings import ENV_PREFIX

# The port zero-shot HTTP services conventionally use in containers; clear of the worker's
# metrics port (9400), so a pod may run both.
DEFAULT_SERVE_PORT: Final = 8080
# A request body of 1 MiB holds dozens of long texts; anything larger is a backfill that
# belongs on the Kafka path (or split into requests).
DEFAULT_MAX_REQUEST_BYTES: Final = 1024 * 1024
# One request may fill one default micro-batch (TAGSTREAM_MAX_BATCH_SIZE, 64) but not more,
# so one caller cannot hold the model for many batches in a row.
DEFAULT_MAX_INPUTS: Final = 64
# Texts accepted and not yet answered: 16 default batches. Past it a caller waits longer
# than the queue is worth (429 and Retry-After tell it to come back) instead of piling up.
DEFAULT_MAX_PENDING_TEXTS: Final = 1024
# Open connections the server takes at once (uvicorn's limit_concurrency); beyond it a new
# one is answered 503 at once. Each may hold a body of up to the request limit, so 256 bound
# what requests hold at 256 MiB by default; 4x the largest concurrency benchmarked (64).
DEFAULT_MAX_CONNECTIONS: Final = 256
# TAGSTREAM_SERVE_TORCH_THREADS=0: one CPU is left to the event loop, which parses and
# answers requests while the model runs; with a torch thread on every CPU the two fought
# over the cores: the tiny CPU model served 42.7 requests/s at concurrency 64 instead of
# 388.6 on 2 CPUs (bench/serve.py, README).
AUTO_TORCH_THREADS: Final = 0
# Kubernetes sends SIGKILL 30 s after SIGTERM by default; the drain stays at or under it.
DEFAULT_DRAIN_TIMEOUT_S: Final = 30.0


class ServeBatching(enum.StrEnum):
    """When the open micro-batch of ``tagstream serve`` goes to the model."""

    # As the HF text-embeddings-inference router: at once whenever the inference thread is
    # idle; while it is busy the batch fills, up to the size and token caps.
    CONTINUOUS = "continuous"
    # The worker's rule: size, token budget, or TAGSTREAM_MAX_WAIT_MS after its first text.
    WINDOWED = "windowed"


class ServeSettings(BaseSettings):
    """Where ``tagstream serve`` listens and what one request, and all of them, may hold."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", validate_default=True, frozen=True
    )

    serve_host: str = Field(default="0.0.0.0", min_length=1, description="Address to bind.")
    serve_port: int = Field(
        default=DEFAULT_SERVE_PORT,
        ge=0,
        le=MAX_PORT,
        description="Port of /v1/classify, /openapi.json, /healthz, /readyz and /metrics; "
        "0 picks a free one.",
    )
    serve_batching: ServeBatching = Field(
        default=ServeBatching.CONTINUOUS,
        description="continuous: a batch goes to the model as soon as it is idle and fills "
        "only while it is busy (TAGSTREAM_MAX_WAIT_MS unused); windowed: the worker's rule, "
        "a text waits up to TAGSTREAM_MAX_WAIT_MS for company.",
    )
    serve_torch_threads: int = Field(
        default=AUTO_TORCH_THREADS,
        ge=0,
        description="torch's CPU threads (torch.set_num_threads); 0: all CPUs but one, left "
        "to the event loop (unless OMP_NUM_THREADS is set, which then applies).",
    )
    serve_max_request_bytes: int = Field(
        default=DEFAULT_MAX_REQUEST_BYTES,
        ge=1024,
        description="Largest request body; a larger one is answered 413.",
    )
    serve_max_inputs: int = Field(
        default=DEFAULT_MAX_INPUTS, ge=1, description="Most texts in one request's 'inputs'."
    )
    serve_max_pending_texts: int = Field(
        default=DEFAULT_MAX_PENDING_TEXTS,
        ge=1,
        description="Texts accepted and not yet answered; past it requests get 429.",
    )
    serve_max_connections: int = Field(
        default=DEFAULT_MAX_CONNECTIONS,
        ge=1,
        description="Open connections at once; past it new ones get 503.",
    )
    serve_drain_timeout_s: float = Field(
        default=DEFAULT_DRAIN_TIMEOUT_S,
        ge=0.0,
        description="After SIGTERM: how long requests in flight may take to finish.",
    )

    @model_validator(mode="after")
    def _one_request_fits(self) -> ServeSettings:
        if self.serve_max_inputs > self.serve_max_pending_texts:
            raise ValueError(
                "TAGSTREAM_SERVE_MAX_INPUTS must not exceed TAGSTREAM_SERVE_MAX_PENDING_TEXTS: "
                "a full request could never be accepted"
            )
        return self
