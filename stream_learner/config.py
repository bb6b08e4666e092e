"""Settings: one definition of every knob, from env (``STREAM_LEARNER_…``, nested with ``__``) or a YAML file.

Precedence, highest first: explicit arguments, environment variables, the YAML file, the defaults below.
The defaults run the demo: a local broker, the bundled model, a local directory for versions.

    STREAM_LEARNER_KAFKA__BOOTSTRAP_SERVERS=broker:9092
    STREAM_LEARNER_TRAINING__L2SP_LAMBDA=0.01
    STREAM_LEARNER_MODEL__LABELS='["neg","pos"]'

A bad value stops start-up with :class:`ConfigError`, whose message is one line naming the setting,
what was given and what to put there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

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
    YamlConfigSettingsSource,
)

ENV_PREFIX = "STREAM_LEARNER_"
CONFIG_FILE_ENV = "STREAM_LEARNER_CONFIG_FILE"
BUNDLED_MODEL = "bundled"
STORAGE_SCHEMES = ("file", "s3")


class ConfigError(Exception):
    """A setting is invalid; the message is one line that says what to fix."""


class _Section(BaseModel):
    # a misspelt key in a YAML file must fail, not be silently ignored
    model_config = ConfigDict(extra="forbid")


class KafkaSettings(_Section):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="host:port[,host:port] of the Kafka brokers")
    topic: str = Field("stream-learner-events", min_length=1, description="input topic of labeled events")
    dlq_topic: str | None = Field(None, description="dead-letter topic; empty means '<topic>.dlq'")
    group_id: str = Field("stream-learner", min_length=1, description="consumer group id")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="where to start in a partition no published version covers"
    )
    session_timeout_ms: int = Field(10_000, ge=1_000, description="consumer session timeout in ms")
    poll_max_messages: int = Field(256, ge=1, le=100_000, description="messages taken per consume() call")
    poll_timeout_s: float = Field(0.2, gt=0, description="seconds one consume() call may wait")
    queue_max_batches: int = Field(
        8, ge=1, description="consumed batches queued for the trainer before the consumer pauses"
    )
    create_topics: bool = Field(True, description="create the input and dead-letter topics at start")
    topic_partitions: int = Field(1, ge=1, description="partitions of the topics created at start")
    client_config: dict[str, str] = Field(
        default_factory=dict,
        description="extra librdkafka settings (security.protocol, sasl.*, ssl.*), passed through",
    )

    @property
    def dead_letter_topic(self) -> str:
        return self.dlq_topic or f"{self.topic}.dlq"

    def librdkafka(self) -> dict[str, str]:
        """The common librdkafka configuration for every client of this learner."""
        return {"bootstrap.servers": self.bootstrap_servers, **self.client_config}


class EventSettings(_Section):
    max_text_bytes: int = Field(16_384, ge=1, description="largest accepted UTF-8 size of text + text_pair")


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
        if v != BUNDLED_MODEL and looks_local and not Path(v).expanduser().is_dir():
            raise ValueError(
                f"no model directory at {v!r}; give 'bundled', a local model directory or a hub id"
            )
        return v


class TrainingSettings(_Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when present")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto' = bf16 autocast on CUDA, fp32 on CPU"
    )
    learning_rate: float = Field(
        5e-5, gt=0, le=1, description="AdamW learning rate of the pretrained weights"
    )
    head_learning_rate: float | None = Field(
        1e-3, gt=0, le=1, description="learning rate of the newly initialised head; empty = learning_rate"
    )
    l2sp_lambda: float = Field(0.01, ge=0, description="λ of the L2-SP term λ‖θ−θ0‖² (0 disables it)")
    head_weight_decay: float = Field(0.01, ge=0, description="plain weight decay of the new head")
    fresh_per_step: int = Field(16, ge=1, description="fresh events per micro-batch")
    replay_per_step: int = Field(16, ge=0, description="replayed events per micro-batch (0 disables replay)")
    bucket_window: int = Field(
        8,
        ge=1,
        le=8,
        description="micro-batches gathered, sorted by length and re-split together (1 = no bucketing); "
        "a fresh event is learned within this many steps of being taken",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    compile: bool = Field(
        False,
        description="run the forward pass through torch.compile (dynamic shapes; needs a C++ compiler): on "
        "a 2-core CPU 4–5 % more examples/s after ≈ 100 s of compiling at start, so it pays in runs "
        "longer than ≈ 40 min (docs/performance.md)",
    )
    max_wait_s: float = Field(
        0.5,
        ge=0,
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
                "install one (Debian: apt-get install g++) or set it to false"
            )
        return v


class ReplaySettings(_Section):
    capacity: int = Field(10_000, ge=1, description="events kept in the reservoir")
    class_balanced: bool = Field(False, description="class-balanced reservoir (CBRS) instead of Algorithm R")


class PublishSettings(_Section):
    storage_url: str = Field(
        "file://./stream-learner-models", description="where versions go: file:///dir or s3://bucket/prefix"
    )
    every_steps: int = Field(500, ge=1, description="publish after this many steps")
    every_seconds: float = Field(300.0, gt=0, description="or after this many seconds, whichever comes first")
    on_stop: bool = Field(True, description="publish a final version when stopping")
    stop_timeout_s: float = Field(
        120.0, gt=0, description="longest a graceful stop may take (final publish and commit included)"
    )
    keep_versions: int = Field(20, ge=0, description="versions kept in storage (0 = keep all); LATEST always")
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
        if v and not Path(v).is_file():
            raise ValueError(f"no file {v!r}: give a JSONL file of labeled events, or leave it empty")
        return v or None


class LimitsSettings(_Section):
    memory_mib: int = Field(
        0,
        ge=0,
        description="fail at start when the memory bound of these settings (stream_learner.limits) exceeds "
        "this many MiB; 0 = no check",
    )


class HttpSettings(_Section):
    enabled: bool = Field(True, description="serve /metrics, /healthz and /readyz")
    host: str = Field("0.0.0.0", description="address the HTTP endpoint binds")
    port: int = Field(9108, ge=0, le=65535, description="port of the HTTP endpoint (0 = any free port)")


class DriftSettings(_Section):
    # defaults calibrated on synthetic streams and on the bundled stream's embeddings: docs/drift.md
    enabled: bool = Field(True, description="compute the drift signals (loss, label mix, embedding)")
    check_every: int = Field(
        50, ge=1, description="fresh events between two windowed tests (label mix and embedding)"
    )
    loss_input: Literal["error", "loss"] = Field(
        "error", description="Page-Hinkley input: 0/1 prequential error, or the loss (clipped at ln 100)"
    )
    loss_delta: float = Field(
        0.05, ge=0, description="Page-Hinkley δ: rise of the mean error tolerated per event"
    )
    loss_threshold: float = Field(15.0, gt=0, description="Page-Hinkley λ: detection threshold (score 1)")
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
            raise ValueError("embedding_permutations must be at least 1/embedding_significance - 1")
        return self


class DistributedSettings(_Section):
    # data-parallel learning is on when torchrun starts the learner (WORLD_SIZE > 1): docs/distributed.md
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="torch.distributed backend of a torchrun group; 'auto' = nccl on CUDA, gloo on CPU",
    )
    timeout_s: float = Field(
        300.0, gt=0, description="seconds a collective waits for the other ranks before the group fails"
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


def format_validation_error(err: ValidationError) -> str:
    """One line for the first error: the setting, the value given, the problem and what to put there."""
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not isinstance(p, int)) or ("settings",)
    name = ".".join(str(p) for p in loc)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        name = ".".join(str(p) for p in loc)
        return f"unknown setting {name}: check its spelling against the README's settings table"
    given = first.get("input")
    given_txt = "" if isinstance(given, dict) else f" (got {given!r})"
    hint = _describe(loc)
    where = f"set {_env_name(loc)} or {name} in the config file"
    line = f"invalid setting {name}{given_txt}: {msg}; {where}" + (f" — {hint}" if hint else "")
    more = len(err.errors()) - 1
    return line + (f" [+{more} more]" if more else "")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from overrides, env and an optional YAML file; raise :class:`ConfigError`."""
    config_file = config_file or os.environ.get(CONFIG_FILE_ENV) or None
    cls: type[Settings] = Settings
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; fix --config or {CONFIG_FILE_ENV}")
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": path}})
    try:
        return cls(**overrides)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


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


if __name__ == "__main__":  # python -m stream_learner.config  → the settings table
    print(settings_table())
