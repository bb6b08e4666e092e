"""Settings: one definition of every knob, from env (``STREAM_LEARNER_…``, nested with ``__``) or a YAML file.

Precedence, highest first: explicit arguments, environment variables, the YAML file, the defaults below.
The defaults run the demo: a local broker, the bundled model, a local directory for versions.

    STREAM_LEARNER_KAFKA__BOOTSTRAP_SERVERS=broker:9092
    STREAM_LEARNER_TRAINING__L2SP_LAMBDA=0.01
    STREAM_LEARNER_MODEL__LABELS='["neg","pos"]'

A bad value stops start-up with :class:`ConfigError`, whose message is one line naming the setting,
what was given and what to put there. So does a variable under ``STREAM_LEARNER_`` that names no setting
(a misspelt section or key would otherwise be ignored without a word; see :data:`ENV_ALLOWED`), a
list or dict setting that is not valid JSON, and a config file that is not a YAML mapping.

Bounds: every float must be finite, and every duration has an upper bound with a reason (see
:data:`DAY` and the fields): ``inf`` or a year where seconds were meant fail at start-up instead of
turning a stop, a poll or a wait into forever.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import shutil
import typing
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "STREAM_LEARNER_"
CONFIG_FILE_ENV = "STREAM_LEARNER_CONFIG_FILE"
BUNDLED_MODEL = "bundled"
STORAGE_SCHEMES = ("file", "s3")

#: Variables under ``STREAM_LEARNER_`` that are not settings and are still allowed: every other one must
#: name a setting (``STREAM_LEARNER_<SECTION>__<KEY>``, a whole section as JSON ``STREAM_LEARNER_<SECTION>``,
#: or one entry of a dict setting ``STREAM_LEARNER_KAFKA__CLIENT_CONFIG__<key>``) or start-up fails.
ENV_ALLOWED = frozenset({CONFIG_FILE_ENV})
#: Prefixes under ``STREAM_LEARNER_`` the learner never reads and does not check: the test suite's own
#: variables (``STREAM_LEARNER_TEST_BOOTSTRAP``, tests/conftest.py), inherited by learners tests start.
ENV_EXEMPT_PREFIXES = ("STREAM_LEARNER_TEST_",)
# Kubernetes injects service links for every Service of the namespace (unless enableServiceLinks: false,
# as the chart sets): a Service named stream-learner gives STREAM_LEARNER_SERVICE_HOST=10.0.0.7,
# STREAM_LEARNER_PORT=tcp://10.0.0.7:9108 and so on: allowed when name and value both have that shape.
_SERVICE = r"STREAM_LEARNER(?:_[A-Z0-9_]+)?"
_SERVICE_LINKS = (  # name → the shape of its value
    (re.compile(_SERVICE + r"_SERVICE_HOST"), "ip"),
    (re.compile(_SERVICE + r"_SERVICE_PORT(?:_[A-Z0-9_]+)?"), "number"),
    (re.compile(_SERVICE + r"_PORT(?:_[0-9]+_(?:TCP|UDP|SCTP))?"), "url"),
    (re.compile(_SERVICE + r"_PORT_[0-9]+_(?:TCP|UDP|SCTP)_ADDR"), "ip"),
    (re.compile(_SERVICE + r"_PORT_[0-9]+_(?:TCP|UDP|SCTP)_PORT"), "number"),
    (re.compile(_SERVICE + r"_PORT_[0-9]+_(?:TCP|UDP|SCTP)_PROTO"), "protocol"),
)

# Upper bounds of durations, each with its reason at the field.
HOUR = 3600.0
DAY = 24 * HOUR
WEEK = 7 * DAY


class ConfigError(Exception):
    """A setting is invalid; the message is one line that says what to fix."""

    def __init__(self, message: object) -> None:
        # one line whatever went into it (a value with a newline, an exception's multi-line text)
        super().__init__(" ".join(str(message).splitlines()))


class _Section(BaseModel):
    # a misspelt key in a YAML file must fail, not be silently ignored; inf and nan are never a setting
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _exists(check: typing.Callable[[], bool]) -> bool:
    """``check()``, False where the path cannot even be looked at (``~nobody/x``, a name too long)."""
    try:
        return check()
    except (OSError, RuntimeError, ValueError):
        return False


_BROKER = re.compile(
    r"(?:[A-Za-z][A-Za-z0-9_]*://)?"  # librdkafka accepts an optional protocol://
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?)"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


def check_bootstrap_servers(value: str) -> str:
    """A comma-separated list of ``host[:port]`` (IPv6 in brackets); returns it without blanks.

    >>> check_bootstrap_servers("broker-1:9092, broker-2:9092")
    'broker-1:9092,broker-2:9092'
    >>> check_bootstrap_servers("broker:99999")
    Traceback (most recent call last):
    ...
    ValueError: 'broker:99999': the port must be 1 to 65535; give host:port[,host:port], e.g. kafka-0:9092
    """
    example = "give host:port[,host:port], e.g. kafka-0:9092"
    if not value.strip():
        raise ValueError(f"empty: {example}")
    entries = [e.strip() for e in value.split(",")]
    for entry in entries:
        if not entry:
            raise ValueError(f"an empty entry between commas; {example}")
        m = _BROKER.fullmatch(entry)
        if m is None:
            raise ValueError(f"{entry!r} is not host:port (an IPv6 address goes in brackets); {example}")
        if m["port"] is not None and not 1 <= int(m["port"]) <= 65535:
            raise ValueError(f"{entry!r}: the port must be 1 to 65535; {example}")
    return ",".join(entries)


class KafkaSettings(_Section):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="host:port[,host:port] of the Kafka brokers")
    topic: str = Field("stream-learner-events", min_length=1, description="input topic of labeled events")
    dlq_topic: str | None = Field(None, description="dead-letter topic; empty means '<topic>.dlq'")
    group_id: str = Field("stream-learner", min_length=1, description="consumer group id")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where to start in a partition no published version covers"
    )
    # a broker refuses a session longer than its group.max.session.timeout.ms: 30 min by default
    session_timeout_ms: int = Field(
        10_000, ge=1_000, le=1_800_000, description="consumer session timeout in ms"
    )
    poll_max_messages: int = Field(256, ge=1, le=100_000, description="messages taken per consume() call")
    # one consume() call holds up the consumer thread: stop, pause/resume and commits wait behind it
    poll_timeout_s: float = Field(0.2, gt=0, le=60, description="seconds one consume() call may wait")
    queue_max_batches: int = Field(
        8, ge=1, description="consumed batches queued for the trainer before the consumer pauses"
    )
    create_topics: bool = Field(True, description="create the input and dead-letter topics at start")
    topic_partitions: int = Field(1, ge=1, description="partitions of the topics created at start")
    client_config: dict[str, str] = Field(
        default_factory=dict,
        description="extra librdkafka settings (security.protocol, sasl.*, ssl.*), passed through",
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: str) -> str:
        return check_bootstrap_servers(v)

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"

    def librdkafka(self) -> dict[str, str]:
        """The common librdkafka configuration for every client of this learner."""
        return {"bootstrap.servers": self.bootstrap_servers, **self.client_config}


class EventSettings(_Section):
    max_text_bytes: int = Field(16_384, ge=1, description="largest accepted UTF-8 size of text + text_pair")
    dead_letter_alert_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="log an ERROR and set the dead_letter_share_high metric when more than this share of "
        "the recent events (dead_letter_alert_window) is dead-lettered",
    )
    dead_letter_alert_window: int = Field(
        1_000, ge=10, description="recent consumed events over which the dead-lettered share is measured"
    )


class ModelSettings(_Section):
    name_or_path: str = Field(
        BUNDLED_MODEL, description="'bundled' (all-MiniLM-L6-v2), a local model directory or a HuggingFace id"
    )
    labels: list[str] = Field(["neg", "pos"], description="the label names, in index order (at least two)")
    max_length: int = Field(128, ge=8, le=8192, description="tokens per event after truncation")
    num_hidden_layers: int | None = Field(
        None, ge=1, description="keep only the first N encoder layers (small CPUs, tests); empty = all"
    )

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError('give at least two label names, e.g. ["neg", "pos"]')
        if len(set(v)) != len(v) or any(not s.strip() for s in v):
            raise ValueError("label names must be non-empty and distinct")
        return v

    @field_validator("name_or_path")
    @classmethod
    def _model_path(cls, v: str) -> str:
        looks_local = v.startswith(("/", "./", "../", "~"))
        if v != BUNDLED_MODEL and looks_local and not _exists(lambda: Path(v).expanduser().is_dir()):
            raise ValueError(
                f"no model directory at {v!r}; give 'bundled', a local model directory or a hub id"
            )
        return v


class TrainingSettings(_Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when present")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="'auto' = bf16 autocast on a GPU with native bf16 (compute capability ≥ 8.0), and on a "
        "CPU with native bf16 (AVX512-BF16, AMX) where a start-up measurement finds it faster; fp32 "
        "elsewhere (TF32 matmuls on GPUs that have them)",
    )
    learning_rate: float = Field(
        5e-5, gt=0, le=1, description="AdamW learning rate of the pretrained weights"
    )
    head_learning_rate: float | None = Field(
        1e-3, gt=0, le=1, description="learning rate of the newly initialised head; empty = learning_rate"
    )
    # past 100 the penalty of the smallest move outweighs any classification loss: nothing is learned
    l2sp_lambda: float = Field(0.01, ge=0, le=100, description="λ of the L2-SP term λ‖θ−θ0‖² (0 disables it)")
    # AdamW's decoupled decay takes lr × this share of each weight per step: past 1 it outweighs the data
    head_weight_decay: float = Field(0.01, ge=0, le=1, description="plain weight decay of the new head")
    fresh_per_step: int = Field(16, ge=1, description="fresh events per micro-batch")
    replay_per_step: int = Field(16, ge=0, description="replayed events per micro-batch (0 disables replay)")
    bucket_window: int = Field(
        8,
        ge=1,
        le=8,
        description="micro-batches gathered, sorted by length and re-split together (1 = no bucketing); "
        "a fresh event is learned within this many steps of being taken",
    )
    # a norm of 10⁶ already clips nothing a finite loss produces
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="gradient clipping norm")
    compile: bool = Field(
        False,
        description="run the forward pass through torch.compile (dynamic shapes; needs a C++ compiler): on "
        "a 2-core CPU 4–5 % more examples/s after ≈ 100 s of compiling at start, so it pays in runs "
        "longer than ≈ 40 min (docs/performance.md)",
    )
    # fresh events wait this long to be learned: an hour is already far past any publish interval in use
    max_wait_s: float = Field(
        0.5,
        ge=0,
        le=HOUR,
        description="longest wait for a full window of fresh events (bucket_window micro-batches) "
        "before stepping",
    )
    seed: int = Field(0, description="seed of every random generator (a new head's weights, replay, torch)")
    metrics_window: int = Field(1_000, ge=10, description="fresh events in the prequential metrics window")

    @field_validator("compile")
    @classmethod
    def _compiler_present(cls, v: bool) -> bool:
        # inductor writes C++ (CPU) or Triton launchers (CUDA) and builds them with the system's compiler:
        # without one the first step would fail, long after start-up
        compilers = (os.environ.get("CXX"), "g++", "c++", "clang++")
        if v and not any(c and shutil.which(c) for c in compilers):
            raise ValueError(
                "torch.compile needs a C++ compiler and none is on PATH (g++, c++, clang++ or $CXX): "
                "install one (Debian: apt-get install g++) or set it to false (the CPU image has none, the "
                "CUDA image has one: docs/deploy.md)"
            )
        return v


class ReplaySettings(_Section):
    capacity: int = Field(10_000, ge=1, description="events kept in the reservoir")
    class_balanced: bool = Field(
        False,
        description="class-balanced replay: draws each class equally often from the first step on, and once "
        "full evicts from the largest class (CBRS); false = Algorithm R, uniform (see 'Replay' below)",
    )


class PublishSettings(_Section):
    storage_url: str = Field(
        "file://./stream-learner-models", description="where versions go: file:///dir or s3://bucket/prefix"
    )
    every_steps: int = Field(500, ge=1, description="publish after this many steps")
    # events after the last version are consumed again on restart: they must still be in the topic, and
    # Kafka's default retention (log.retention.hours) is a week
    every_seconds: float = Field(
        300.0, gt=0, le=WEEK, description="or after this many seconds, whichever comes first"
    )
    on_stop: bool = Field(True, description="publish a final version when stopping")
    # a timeout, not a wait: a day is far past any final publish (and the pod's grace period is this too)
    stop_timeout_s: float = Field(
        120.0,
        gt=0,
        le=DAY,
        description="longest a graceful stop may take (final publish and commit included)",
    )
    keep_versions: int = Field(20, ge=0, description="versions kept in storage (0 = keep all); LATEST always")
    # measured (docs/performance.md): at 0 a publish took the trainer down to 0.41 × its rate while it
    # ran; at 19 the trainer kept its rate and a publish took ≈ 2.5 × as long
    nice: int = Field(
        19,
        ge=0,
        le=19,
        description="the publisher thread's nice value (Linux): 19 = a publish uses the CPU the trainer "
        "leaves idle, 0 = it competes with the trainer as an equal",
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, SeaweedFS…); empty = AWS")
    s3_region: str | None = Field(None, description="S3 region; empty = the AWS default chain")
    s3_access_key_id: SecretStr | None = Field(None, description="S3 access key; empty = AWS default chain")
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret key; empty = AWS chain")

    @field_validator("storage_url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        scheme = urlparse(v).scheme or "file"
        if scheme not in STORAGE_SCHEMES:
            raise ValueError(f"unsupported scheme {scheme!r}; use file:///path or s3://bucket/prefix")
        if scheme == "s3" and not urlparse(v).netloc:
            raise ValueError("an s3:// URL needs a bucket: s3://bucket/prefix")
        return v


class ProbeSettings(_Section):
    file: str | None = Field(
        None, description="JSONL of labeled events scored at every publish (the probe set); empty = none"
    )
    max_events: int = Field(1000, ge=1, description="probe events used: the first N of the file")
    max_accuracy_drop: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="poisoning gate: a version whose probe accuracy falls more than this below LATEST's "
        "is kept as a rejected candidate; empty = no gate",
    )

    @field_validator("file")
    @classmethod
    def _readable(cls, v: str | None) -> str | None:
        if v and not _exists(Path(v).is_file):
            raise ValueError(f"no file {v!r}: give a JSONL file of labeled events, or leave it empty")
        return v or None


class LimitsSettings(_Section):
    memory_mib: int = Field(
        0,
        ge=0,
        description="fail at start when the memory bound of these settings "
        "(stream_learner.service.limits) exceeds this many MiB; 0 = no check",
    )


class HttpSettings(_Section):
    enabled: bool = Field(True, description="serve /metrics, /healthz and /readyz")
    host: str = Field("0.0.0.0", description="address the HTTP endpoint binds")
    port: int = Field(9108, ge=0, le=65535, description="port of the HTTP endpoint (0 = any free port)")


class ServingSettings(_Section):
    """``stream-learner serve``: the inference server of the versions under ``publish.storage_url``."""

    # a path segment of the protocol's URLs (/v2/models/<name>/infer): nothing that needs escaping
    model_name: str = Field(
        "stream-learner",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="the model's name in the inference protocol's paths: /v2/models/<model_name>/infer",
    )
    host: str = Field("0.0.0.0", description="address `stream-learner serve` binds")
    # 8080: KServe's port for a custom predictor's HTTP (the learner's own endpoint is http.port)
    port: int = Field(8080, ge=0, le=65535, description="port of `stream-learner serve` (0 = any free port)")
    # one small read of LATEST per poll; an hour is already far past any publish interval in use
    poll_interval_s: float = Field(
        5.0,
        gt=0,
        le=HOUR,
        description="seconds between two reads of LATEST: a new version serves within this plus its load "
        "time",
    )
    max_batch: int = Field(
        32, ge=1, le=4096, description="most texts in one forward pass of the micro-batcher"
    )
    # a request waits this long for others to share its forward pass: a second is far past any use.
    # 0 by default: on the 2-core CPU a 5 ms wait cost a lone request 8 ms and gained 16 concurrent
    # clients nothing (those queued while a batch computes form the next one anyway; docs/serving.md)
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="longest a request waits for others to fill its batch (0 = no wait: a batch takes the "
        "requests that queued while the previous one computed)",
    )
    version: int | None = Field(
        None, ge=1, description="serve this version only, never another (`serve --version N`); empty = LATEST"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' serves on CUDA when present")
    max_request_bytes: int = Field(
        4 * 2**20, ge=1024, le=2**30, description="largest request body accepted (413 above it)"
    )


class DriftSettings(_Section):
    # defaults calibrated on synthetic streams and on the bundled stream's embeddings: docs/drift.md
    enabled: bool = Field(True, description="compute the drift signals (loss, label mix, embedding)")
    check_every: int = Field(
        50, ge=1, description="fresh events between two windowed tests (label mix and embedding)"
    )
    loss_input: Literal["error", "loss"] = Field(
        "error", description="Page-Hinkley input: 0/1 prequential error, or the loss (clipped at ln 100)"
    )
    # the input is at most 1 (error) or ln 100 ≈ 4.6 (loss): a larger δ can never be exceeded
    loss_delta: float = Field(
        0.05, ge=0, le=5, description="Page-Hinkley δ: rise of the mean error tolerated per event"
    )
    # the statistic grows by at most ln 100 per event: 10⁶ is > 200 000 events of full loss before an alarm
    loss_threshold: float = Field(
        15.0, gt=0, le=1e6, description="Page-Hinkley λ: detection threshold (score 1)"
    )
    loss_min_instances: int = Field(
        100, ge=1, description="events after a (re)start before the loss signal may fire"
    )
    label_window: int = Field(300, ge=10, description="recent fresh labels tested against the reference mix")
    label_min_window: int = Field(100, ge=10, description="labels in the recent window before testing")
    label_min_reference: int = Field(100, ge=1, description="reference labels needed before testing")
    label_significance: float = Field(1e-3, gt=0, lt=1, description="level α of each G-test of the label mix")
    embedding_window: int = Field(
        200, ge=10, description="embeddings in the recent and in the reference window of the MMD test"
    )
    embedding_significance: float = Field(
        0.001, gt=0, lt=1, description="level α of each MMD permutation test"
    )
    embedding_permutations: int = Field(
        999, ge=19, description="permutations of the MMD test (at least 1/α − 1)"
    )

    @model_validator(mode="after")
    def _resolvable(self) -> DriftSettings:
        if self.embedding_significance * (self.embedding_permutations + 1) < 1:
            raise ValueError(
                "drift.embedding_permutations must be at least 1/drift.embedding_significance - 1 "
                f"({math.ceil(1 / self.embedding_significance) - 1} for {self.embedding_significance:g})"
            )
        return self


class DistributedSettings(_Section):
    # data-parallel learning is on when torchrun starts the learner (WORLD_SIZE > 1): docs/distributed.md
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="torch.distributed backend of a torchrun group; 'auto' = nccl on CUDA, gloo on CPU",
    )
    # a timeout: a day is far past any collective, and keeps a hung group from hanging for ever
    timeout_s: float = Field(
        300.0,
        gt=0,
        le=DAY,
        description="seconds a collective waits for the other ranks before the group fails",
    )
    check_every_steps: int = Field(
        100, ge=0, description="steps between checks that every rank holds the same weights (0 = never)"
    )


class Settings(BaseSettings):
    """Every setting of a learner. Build with :func:`load_settings` to get one-line errors."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    kafka: KafkaSettings = KafkaSettings()
    events: EventSettings = EventSettings()
    model: ModelSettings = ModelSettings()
    training: TrainingSettings = TrainingSettings()
    replay: ReplaySettings = ReplaySettings()
    publish: PublishSettings = PublishSettings()
    http: HttpSettings = HttpSettings()
    probe: ProbeSettings = ProbeSettings()
    limits: LimitsSettings = LimitsSettings()
    drift: DriftSettings = DriftSettings()
    distributed: DistributedSettings = DistributedSettings()
    serving: ServingSettings = ServingSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.kafka.dead_letter_topic == self.kafka.topic:
            raise ValueError("kafka.dlq_topic must differ from kafka.topic")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = settings_cls.model_config.get("yaml_file")
        if yaml_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def _env_name(loc: tuple[Any, ...]) -> str:
    return ENV_PREFIX + "__".join(str(p).upper() for p in loc)


def _describe(loc: tuple[Any, ...]) -> str:
    """The field's description, which says what to put there."""
    model: Any = Settings
    field = None
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            break
        field = fields[part]
        model = field.annotation
    return field.description if field is not None and field.description else ""


# a value given for these is never repeated in a message (credentials, librdkafka's sasl.password…)
_SECRET_PARTS = ("secret", "password", "access_key", "client_config")


def _shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _printable(name: str) -> str:
    return name if name.isprintable() else _shown(name)


def _suggest(given: str, known: typing.Iterable[str]) -> str:
    """' (did you mean X?)' for the closest of ``known`` (difflib), or ''."""
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def format_validation_error(err: ValidationError) -> str:
    """One line for the first error: the setting, the value given, the problem and what to put there."""
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not isinstance(p, int)) or ("settings",)
    name = ".".join(str(p) for p in loc)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        section = Settings.model_fields.get(str(loc[0])) if len(loc) == 2 else None
        known = section.annotation.model_fields if section is not None else Settings.model_fields
        guess = _suggest(str(loc[-1]), known)
        return f"unknown setting {name}{guess}: check its spelling against the README's settings table"
    given = first.get("input")
    secret = any(part in name.lower() for part in _SECRET_PARTS)
    given_txt = "" if isinstance(given, dict) or secret else f" (got {_shown(given)})"
    hint = _describe(loc)
    where = f"set {_env_name(loc)} or {name} in the config file"
    line = f"invalid setting {name}{given_txt}: {msg}; {where}" + (f" — {hint}" if hint else "")
    more = len(err.errors()) - 1
    return line + (f" [+{more} more]" if more else "")


def _env_names() -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """Every variable name that sets something (→ its location), and the prefixes of dict entries."""
    exact: dict[str, tuple[str, ...]] = {}
    entries: dict[str, tuple[str, ...]] = {}
    for section, section_field in Settings.model_fields.items():
        exact[_env_name((section,))] = (section,)  # the whole section as a JSON object
        for key, field in section_field.annotation.model_fields.items():
            exact[_env_name((section, key))] = (section, key)
            if typing.get_origin(field.annotation) is dict:  # …__CLIENT_CONFIG__sasl.password
                entries[_env_name((section, key)) + "__"] = (section, key)
    return exact, entries


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is one of the variables Kubernetes injects for a Service (_SERVICE_LINKS)."""
    url = re.fullmatch(r"(?:tcp|udp|sctp)://\[?([0-9A-Fa-f:.]+)\]?:[0-9]+", value)
    shape = {
        "ip": _is_ip(value),
        "number": value.isascii() and value.isdigit(),
        "url": url is not None and _is_ip(url[1]),
        "protocol": value in ("tcp", "udp", "sctp"),
    }
    return any(shape[kind] for pattern, kind in _SERVICE_LINKS if pattern.fullmatch(name))


def _check_json(env: str, loc: tuple[str, ...], value: str) -> None:
    """A section or a list/dict setting comes as JSON: refuse one that is not, naming the setting."""
    field = Settings.model_fields[loc[0]]
    if len(loc) == 2:
        field = field.annotation.model_fields[loc[1]]
    origin = typing.get_origin(field.annotation)
    if len(loc) == 2 and origin not in (list, dict):
        return
    if value == "":  # pydantic-settings passes it on as a string: the validation error names it
        return
    try:
        json.loads(value)
    except ValueError as err:
        name = ".".join(loc)
        kind = "list" if origin is list else "object"
        example = json.dumps(field.default) if origin is list else '{"key": "value"}'
        secret = len(loc) == 1 or any(part in name for part in _SECRET_PARTS)
        given = "" if secret else f" (got {_shown(value)})"
        problem = f"{err.msg} at character {err.pos}" if isinstance(err, json.JSONDecodeError) else str(err)
        hint = _describe(loc)
        raise ConfigError(
            f"invalid setting {name}{given}: {env} is not valid JSON ({problem}); give a JSON {kind}, "
            f"e.g. {env}='{example}'" + (f" — {hint}" if hint else "")
        ) from None


def check_environment(environ: typing.Mapping[str, str] | None = None) -> None:
    """Refuse a ``STREAM_LEARNER_`` variable that sets nothing, and a list/dict setting that is not JSON.

    pydantic-settings ignores a variable that names no field, so ``STREAM_LEARNER_TRAINNG__LEARNING_RATE``
    would leave the learning rate at its default without a word. Allowed besides the settings:
    :data:`ENV_ALLOWED`, the prefixes :data:`ENV_EXEMPT_PREFIXES` and Kubernetes service links.
    Names are compared without case, as pydantic-settings reads them.

    >>> try:
    ...     check_environment({"STREAM_LEARNER_TRAINNG__LEARNING_RATE": "0.1", "HOME": "/root"})
    ... except ConfigError as err:
    ...     print(err)  # doctest: +ELLIPSIS
    unknown environment variable STREAM_...(did you mean STREAM_LEARNER_TRAINING__LEARNING_RATE?)...
    >>> check_environment({"STREAM_LEARNER_SERVICE_HOST": "10.0.0.7", "STREAM_LEARNER_TEST_BOOTSTRAP": "x"})
    """
    environ = os.environ if environ is None else environ
    exact, entries = _env_names()
    for env in sorted(environ):
        name, value = env.upper(), environ[env]
        if not name.startswith(ENV_PREFIX) or name in ENV_ALLOWED or name.startswith(ENV_EXEMPT_PREFIXES):
            continue
        if name in exact:
            _check_json(env, exact[name], value)
            continue
        entry_of = next((loc for prefix, loc in entries.items() if name.startswith(prefix)), None)
        if entry_of is not None:
            if name == _env_name(entry_of) + "__":
                raise ConfigError(
                    f"environment variable {env} names no key of {'.'.join(entry_of)}: "
                    f"put the key after the last __, e.g. {env}sasl.mechanism"
                )
            continue
        if _is_service_link(name, value):
            continue
        known = {n.removeprefix(ENV_PREFIX): n for n in (*exact, *ENV_ALLOWED)}
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), list(known), n=1, cutoff=0.6)
        guess = f" (did you mean {known[close[0]]}?)" if close else ""
        raise ConfigError(
            f"unknown environment variable {_printable(env)}: no setting has that name{guess}; "
            f"settings are {ENV_PREFIX}<SECTION>__<NAME>, as in the README's settings table"
        )


def _check_yaml(path: Path) -> None:
    """The config file must be UTF-8 YAML whose top level is a mapping of sections."""
    fix = f"fix it, or --config / {CONFIG_FILE_ENV}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({err.strerror}); {fix}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; {fix}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}; {fix}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} holds a {type(data).__name__}, not a mapping of sections "
            f"(kafka:, model:, training:, …); {fix}"
        )


def _format_settings_error(err: SettingsError) -> str:
    """pydantic-settings could not parse a source's value (the checks above catch the usual ones first)."""
    m = re.search(r'field "(\w+)" from source "(\w+)"', str(err))
    field, source = (m[1], m[2]) if m else ("settings", "a source")
    where = f"the {_env_name((field,))}… variables" if source.startswith("Env") else "the config file"
    cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
    return f"invalid setting {field}: it cannot be parsed from {where}{cause}; fix {where}"


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from overrides, env and an optional YAML file; raise :class:`ConfigError`."""
    check_environment()
    config_file = config_file or os.environ.get(CONFIG_FILE_ENV) or None
    cls: type[Settings] = Settings
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; fix --config or {CONFIG_FILE_ENV}")
        _check_yaml(path)
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": path}})
    try:
        return cls(**overrides)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    except SettingsError as err:
        raise ConfigError(_format_settings_error(err)) from None


def settings_table() -> str:
    """The README's settings table, generated from the fields above (a test keeps the README in sync)."""
    rows = ["| setting | env | default | meaning |", "|---|---|---|---|"]
    for section, section_field in Settings.model_fields.items():
        for name, field in section_field.annotation.model_fields.items():
            default = field.default_factory() if field.default_factory else field.default
            if isinstance(default, list | dict):
                shown = f"`{json.dumps(default)}`" if default else "(empty)"
            elif isinstance(default, str):
                shown = f"`{default}`" if default else "(empty)"
            else:
                shown = "(empty)" if default is None else f"`{default}`"
            env = _env_name((section, name))
            rows.append(f"| `{section}.{name}` | `{env}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m stream_learner.core.config  → the settings table
    print(settings_table())
