"""Settings: env nesting, YAML, and one-line errors that name the setting (acceptance 4.7)."""

import json
import math
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from unittest import mock

import pytest
from annotated_types import Le
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_learner.core.config import (
    ENV_PREFIX,
    ConfigError,
    Settings,
    check_bootstrap_servers,
    check_environment,
    load_settings,
)


def test_defaults_work():
    s = load_settings()
    assert s.kafka.dead_letter_topic == "stream-learner-events.dlq"
    assert s.model.labels == ["neg", "pos"]
    assert s.publish.storage_url.startswith("file://")


def test_env_nested_and_yaml_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kafka:\n  topic: from-yaml\ntraining:\n  learning_rate: 0.001\n")
    s = load_settings(cfg)
    assert (s.kafka.topic, s.training.learning_rate) == ("from-yaml", 0.001)
    monkeypatch.setenv("STREAM_LEARNER_KAFKA__TOPIC", "from-env")
    monkeypatch.setenv("STREAM_LEARNER_MODEL__LABELS", '["a", "b", "c"]')
    s = load_settings(cfg)
    assert s.kafka.topic == "from-env"  # env beats the file
    assert s.kafka.dead_letter_topic == "from-env.dlq"
    assert s.model.labels == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("env", "value", "setting"),
    [
        ("STREAM_LEARNER_TRAINING__L2SP_LAMBDA", "-1", "training.l2sp_lambda"),
        ("STREAM_LEARNER_PUBLISH__STORAGE_URL", "ftp://host/x", "publish.storage_url"),
        ("STREAM_LEARNER_MODEL__LABELS", "[]", "model.labels"),
        ("STREAM_LEARNER_MODEL__LABELS", '["pos", "pos"]', "model.labels"),
        ("STREAM_LEARNER_MODEL__NAME_OR_PATH", "/no/such/model", "model.name_or_path"),
        ("STREAM_LEARNER_KAFKA__POLL_MAX_MESSAGES", "lots", "kafka.poll_max_messages"),
        ("STREAM_LEARNER_TRAINING__LEARNING_RATE", "0", "training.learning_rate"),
    ],
)
def test_bad_value_is_one_line_naming_the_setting(monkeypatch, env, value, setting):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "\n" not in msg
    assert setting in msg and env in msg


def test_misspelt_yaml_key_fails(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  learnin_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown setting training\.learnin_rate"):
        load_settings(cfg)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_settings("/no/such/file.yaml")


def test_cli_exits_nonzero_with_one_line(tmp_path):
    env = {"STREAM_LEARNER_TRAINING__L2SP_LAMBDA": "-0.5", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "stream_learner.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "training.l2sp_lambda" in lines[0] and "STREAM_LEARNER_TRAINING__L2SP_LAMBDA" in lines[0]


def test_probe_file_must_exist():
    with pytest.raises(ConfigError, match=r"probe\.file.*no file '/no/probe.jsonl'"):
        load_settings(probe={"file": "/no/probe.jsonl"})


def test_buffers_over_the_memory_limit_fail_at_start_with_the_numbers():
    from stream_learner.core.model import load_model
    from stream_learner.service.app import check_memory
    from stream_learner.service.limits import MiB, memory_budget
    from tests.support.factories import small_settings

    s = small_settings(limits={"memory_mib": 1000}, replay={"capacity": 2_000_000})
    model = load_model(s.model).model
    budget = memory_budget(s, model)
    assert budget.replay == 2_000_000 * (64 * 2 + 16) and budget.total > 1000 * MiB
    with pytest.raises(ConfigError) as info:
        check_memory(s, model)
    msg = str(info.value)
    assert "\n" not in msg and "limits.memory_mib" in msg and "replay" in msg and "1,000 MiB" in msg
    check_memory(
        small_settings(limits={"memory_mib": budget.total // MiB + 1}, replay={"capacity": 2_000_000}), model
    )


def test_probe_lines_are_validated_like_events(tmp_path):
    from stream_learner.service.app import load_probe
    from tests.support.factories import small_settings, tokenizer

    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"text": "fine", "label": "pos"}\n{"text": "no label"}\n')
    with pytest.raises(ConfigError, match=r"probe\.file: line 2 .*missing_label"):
        load_probe(small_settings(probe={"file": str(probe)}), tokenizer())
    probe.write_text('{"text": "fine", "label": "pos"}\n{"text": "awful", "label": 0}\n')
    events = load_probe(small_settings(probe={"file": str(probe), "max_events": 1}), tokenizer())
    assert [e.label for e in events] == [1]


def test_a_lineage_of_another_model_or_label_set_is_not_resumed():
    from stream_learner.service.app import check_lineage_matches
    from tests.support.factories import pretrained_settings

    s = pretrained_settings()  # model.name_or_path "bundled", as the manifests below (no model is loaded)
    check_lineage_matches(s, {"base_model": "bundled", "labels": ["neg", "pos"]}, "file:///m")
    with pytest.raises(ConfigError, match=r"model\.name_or_path / model\.labels: file:///m holds versions"):
        check_lineage_matches(s, {"base_model": "bundled", "labels": ["neg", "neu", "pos"]}, "file:///m")


def test_compile_without_a_compiler_fails_at_start_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAM_LEARNER_TRAINING__COMPILE", "true")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    fix = r"training\.compile.*needs a C\+\+ compiler.*apt-get install g\+\+"
    with pytest.raises(ConfigError, match=fix):
        load_settings()
    monkeypatch.setenv("CXX", "/usr/bin/g++")  # a compiler named by $CXX is enough
    assert load_settings().training.compile


def test_an_http_port_in_use_fails_at_start_with_the_fix():
    import socket

    from stream_learner.service.app import Learner
    from tests.support.factories import small_settings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        learner = Learner(small_settings(http={"enabled": True, "host": "127.0.0.1", "port": port}))
        fix = rf"http: cannot listen on 127\.0\.0\.1:{port}: .*set http\.port"
        with pytest.raises(ConfigError, match=fix):
            learner.start()


# ------------------------------------------------------------------ start-up refusals (issue 15)
def _fields() -> dict[str, typing.Any]:
    """Every setting: 'section.key' → its pydantic field."""
    return {
        f"{section}.{key}": field
        for section, section_field in Settings.model_fields.items()
        for key, field in section_field.annotation.model_fields.items()
    }


def _env(dotted: str) -> str:
    return ENV_PREFIX + dotted.upper().replace(".", "__")


def _base(annotation: typing.Any) -> typing.Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


FLOATS = sorted(name for name, field in _fields().items() if _base(field.annotation) is float)
DURATIONS = sorted(name for name in _fields() if name.endswith(("_s", "_seconds", "_ms")))


@pytest.fixture
def clean_env(monkeypatch):
    """No STREAM_LEARNER_* variable of the developer's shell (the test suite's own may stay)."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX) and not name.upper().startswith("STREAM_LEARNER_TEST_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
def test_no_float_setting_takes_a_non_finite_value(clean_env, name, value):
    clean_env.setenv(_env(name), value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "\n" not in msg and name in msg and _env(name) in msg


def test_every_duration_has_an_upper_bound_of_at_most_a_week():
    assert {"publish.stop_timeout_s", "kafka.poll_timeout_s", "distributed.timeout_s"} <= set(DURATIONS)
    for name in DURATIONS:
        bounds = [m.le for m in _fields()[name].metadata if isinstance(m, Le)]
        week = 7 * 24 * 3600 * (1000 if name.endswith("_ms") else 1)
        assert bounds and bounds[0] <= week, name
        with pytest.raises(ConfigError, match=re.escape(name)):
            section, key = name.split(".")
            load_settings(**{section: {key: bounds[0] * 2}})  # a forgotten unit, say


def test_a_year_of_stop_timeout_is_refused(clean_env):
    clean_env.setenv("STREAM_LEARNER_PUBLISH__STOP_TIMEOUT_S", str(365 * 86400))
    with pytest.raises(ConfigError, match=r"publish\.stop_timeout_s.*less than or equal to 86400"):
        load_settings()


@pytest.mark.parametrize(
    ("env", "value", "setting"),
    [
        ("STREAM_LEARNER_MODEL__LABELS", '["a",', "model.labels"),
        ("STREAM_LEARNER_MODEL__LABELS", "neg,pos", "model.labels"),
        ("STREAM_LEARNER_KAFKA__CLIENT_CONFIG", '{"sasl.password": "hunter2",', "kafka.client_config"),
        ("STREAM_LEARNER_KAFKA", '{"topic": "x",', "kafka"),
    ],
)
def test_malformed_json_is_one_line_naming_the_setting(clean_env, env, value, setting):
    clean_env.setenv(env, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "\n" not in msg and f"invalid setting {setting}" in msg and env in msg and "not valid JSON" in msg
    assert "hunter2" not in msg  # a dict or a section may hold credentials: never repeated


@pytest.mark.parametrize(
    ("env", "suggestion"),
    [
        ("STREAM_LEARNER_TRAINNG__LEARNING_RATE", "STREAM_LEARNER_TRAINING__LEARNING_RATE"),
        ("STREAM_LEARNER_KAFKA_BOOTSTRAP_SERVERS", "STREAM_LEARNER_KAFKA__BOOTSTRAP_SERVERS"),
        ("STREAM_LEARNER_TRAINING__LEARNIG_RATE", "STREAM_LEARNER_TRAINING__LEARNING_RATE"),
        ("stream_learner_publish__storage_ur", "STREAM_LEARNER_PUBLISH__STORAGE_URL"),
        ("STREAM_LEARNER_CONFIG", "STREAM_LEARNER_CONFIG_FILE"),
        ("STREAM_LEARNER_KAFKA__TOPIC__X", "STREAM_LEARNER_KAFKA__TOPIC"),
    ],
)
def test_unknown_variable_fails_with_the_closest_name(clean_env, env, suggestion):
    clean_env.setenv(env, "0.1")
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"unknown environment variable {env}:") and f"did you mean {suggestion}?" in msg


@pytest.mark.parametrize(
    "env",
    [
        {"STREAM_LEARNER_TEST_BOOTSTRAP": "127.0.0.1:1", "STREAM_LEARNER_TEST_ANYTHING": "x"},
        {"STREAM_LEARNER_KAFKA__CLIENT_CONFIG__sasl.password": "p", "stream_learner_kafka__topic": "t"},
        {"STREAM_LEARNER_KAFKA": '{"topic": "t"}', "STREAM_LEARNER_HTTP__PORT": "9200"},
        # what Kubernetes injects for Services named stream-learner and stream-learner-ranks
        {
            "STREAM_LEARNER_SERVICE_HOST": "10.0.0.7",
            "STREAM_LEARNER_SERVICE_PORT": "9108",
            "STREAM_LEARNER_SERVICE_PORT_HTTP": "9108",
            "STREAM_LEARNER_PORT": "tcp://10.0.0.7:9108",
            "STREAM_LEARNER_PORT_9108_TCP": "tcp://10.0.0.7:9108",
            "STREAM_LEARNER_PORT_9108_TCP_ADDR": "10.0.0.7",
            "STREAM_LEARNER_PORT_9108_TCP_PORT": "9108",
            "STREAM_LEARNER_PORT_9108_TCP_PROTO": "tcp",
            "STREAM_LEARNER_RANKS_SERVICE_HOST": "fd00::7",
            "STREAM_LEARNER_RANKS_PORT_29400_TCP": "tcp://[fd00::7]:29400",
        },
    ],
)
def test_allowed_variables_pass(clean_env, tmp_path, env):
    for name, value in env.items():
        clean_env.setenv(name, value)
    config = tmp_path / "c.yaml"
    config.write_text("kafka:\n  group_id: g\n")
    clean_env.setenv("STREAM_LEARNER_CONFIG_FILE", str(config))
    assert load_settings().kafka.group_id == "g"


@pytest.mark.parametrize(
    "env",
    [
        {"STREAM_LEARNER_HTTP_PORT": "9200"},  # a typo, not a service link: that one is tcp://…
        {"STREAM_LEARNER_SERVICE_HOST": "broker-1"},  # service links carry IP addresses
        {"STREAM_LEARNER_KAFKA__CLIENT_CONFIG__": "x"},  # no key
        {"STREAM_LEARNER_": "x"},
    ],
)
def test_look_alikes_of_allowed_variables_fail(clean_env, env):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert next(iter(env)) in str(info.value)


# names the docs show as operator mistakes, on purpose
DOCUMENTED_MISTAKES = {"STREAM_LEARNER_TRAINNG__LEARNING_RATE", "STREAM_LEARNER_KAFKA_BOOTSTRAP_SERVERS"}


def test_every_variable_the_project_itself_uses_is_allowed():
    """Every STREAM_LEARNER_ name in the docs, the chart, the scripts and the code is a setting or allowed."""
    root = Path(__file__).resolve().parents[3]
    # not the checker itself (its comments show service links) nor the tests of mistakes
    mine = {Path(__file__).resolve(), root / "tests" / "integration" / "test_startup_errors.py"}
    mine.add(root / "stream_learner" / "core" / "config.py")
    patterns = (
        "*.md",
        "docs/**/*.md",
        "helm/**/*",
        "tests/**/*.py",
        "stream_learner/**/*.py",
        "scripts/**/*",
    )
    patterns += (".ci/**/*", "Dockerfile*", "Makefile", "pyproject.toml")
    # a name, and the value shown with it if any (service links are recognised by name and value)
    variable = re.compile(r"\b(STREAM_LEARNER_[A-Z0-9_]*[A-Z0-9](?:__[a-z][a-z.]*[a-z])?)(?:=([^\s`'\"|]+))?")
    used: set[tuple[str, str]] = set()
    for path in {p for pattern in patterns for p in root.glob(pattern) if p.is_file() and p not in mine}:
        text = path.read_text(errors="replace")
        for m in variable.finditer(text):
            if text[m.end() : m.end() + 1] != "_":  # not a pattern such as STREAM_LEARNER_TEST_*
                used.add((m[1], m[2] or "1"))
    names = {name for name, _ in used}
    assert {"STREAM_LEARNER_CONFIG_FILE", "STREAM_LEARNER_TEST_BOOTSTRAP"} <= names
    assert "STREAM_LEARNER_KAFKA__CLIENT_CONFIG__sasl.password" in names  # the chart's Secret → env
    for name, value in sorted(used):
        if name not in DOCUMENTED_MISTAKES:
            check_environment({name: value})  # "1" where no value is shown: valid JSON for any setting


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        ",",
        "a:9092,,b:9092",
        "a:9092,",
        "host:port",
        "host:0",
        "host:70000",
        "a b:9092",
        "::1:9092",
        "host:",
        ":9092",
        "http://",
    ],
)
def test_malformed_bootstrap_servers_are_refused(clean_env, value):
    clean_env.setenv("STREAM_LEARNER_KAFKA__BOOTSTRAP_SERVERS", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "\n" not in msg and "kafka.bootstrap_servers" in msg and "host:port" in msg


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("broker:9092", "broker:9092"),
        (
            "kafka-0.kafka.svc.cluster.local:9093, kafka-1.kafka.svc.cluster.local:9093",
            "kafka-0.kafka.svc.cluster.local:9093,kafka-1.kafka.svc.cluster.local:9093",
        ),
        ("[::1]:9092", "[::1]:9092"),
        ("SSL://10.0.0.1:9093", "SSL://10.0.0.1:9093"),
        ("broker", "broker"),  # librdkafka's default port, 9092
    ],
)
def test_wellformed_bootstrap_servers_pass(value, normalized):
    assert check_bootstrap_servers(value) == normalized


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("kafka: [1\n", r"not valid YAML at line 2, column 1"),
        ("- kafka\n", r"holds a list, not a mapping of sections"),
        ("just words\n", r"holds a str, not a mapping"),
        (b"\xff\xfe", r"is not UTF-8 text"),
    ],
)
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_line(tmp_path, content, problem):
    config = tmp_path / "c.yaml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    with pytest.raises(ConfigError, match=problem) as info:
        load_settings(config)
    assert "\n" not in str(info.value) and "--config" in str(info.value)


def test_misspelt_yaml_key_suggests_the_closest(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("trainig:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"unknown setting trainig \(did you mean training\?\)"):
        load_settings(config)


# ------------------------------------------------------------------------------- properties
_ENV_SAFE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_KNOWN = sorted(
    {_env(name) for name in _fields()}
    | {ENV_PREFIX + section.upper() for section in Settings.model_fields}
    | {"STREAM_LEARNER_KAFKA__CLIENT_CONFIG__sasl.password", "STREAM_LEARNER_KAFKA__CLIENT_CONFIG__"}
)


def _dotted(env: str) -> str | None:
    """The setting (or section) an env name sets, if any."""
    rest = env.upper().removeprefix(ENV_PREFIX).split("__")
    names = [*_fields(), *Settings.model_fields]
    for n in range(len(rest), 0, -1):
        dotted = ".".join(rest[:n]).lower()
        if dotted in names:
            return dotted
    return None


def _load_with(env: dict[str, str]) -> None:
    """load_settings with exactly these STREAM_LEARNER_ variables; the property every outcome must have."""
    with mock.patch.dict(os.environ):
        for name in list(os.environ):
            if name.upper().startswith(ENV_PREFIX):
                del os.environ[name]
        os.environ.update(env)
        try:
            result = load_settings()
        except ConfigError as err:
            msg = str(err)
        else:
            assert isinstance(result, Settings)
            return
    assert len(msg.splitlines()) == 1 and msg.strip(), repr(msg)
    (name,) = env
    dotted = _dotted(name)
    named = [name, repr(name)[:40]] + ([dotted] if dotted else [])
    assert any(n in msg for n in named) or "kafka.dlq_topic" in msg, (env, msg)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(_KNOWN), value=st.text(_ENV_SAFE, max_size=300))
def test_any_value_of_a_setting_is_settings_or_one_line_naming_it(name, value):
    _load_with({name: value})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(_KNOWN),
    value=st.one_of(
        st.sampled_from(
            ["inf", "-inf", "nan", "1e308", "-0", "0x10", "1_000", " 1 ", "true", "null", "[]", "{}"]
        ),
        st.floats().map(repr),
        st.integers().map(str),
        st.lists(st.text(_ENV_SAFE, max_size=5), max_size=4).map(json.dumps),
        st.dictionaries(st.text(_ENV_SAFE, max_size=5), st.text(_ENV_SAFE, max_size=5), max_size=3).map(
            json.dumps
        ),
    ),
)
def test_any_number_or_json_for_a_setting_is_settings_or_one_line_naming_it(name, value):
    _load_with({name: value})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    suffix=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00="), max_size=40),
    value=st.text(_ENV_SAFE, max_size=40),
)
def test_any_variable_under_the_prefix_is_settings_or_one_line_naming_it(suffix, value):
    _load_with({ENV_PREFIX + suffix: value})


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(_fields())),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=50),
        st.lists(st.text(max_size=5), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    ),
)
def test_any_override_is_settings_or_one_line_naming_it(name, value):
    section, key = name.split(".")
    with mock.patch.dict(os.environ):
        for env in list(os.environ):
            if env.upper().startswith(ENV_PREFIX):
                del os.environ[env]
        try:
            load_settings(**{section: {key: value}})
        except ConfigError as err:
            msg = str(err)
            assert len(msg.splitlines()) == 1, repr(msg)
            assert name in msg or "kafka.dlq_topic" in msg, (name, value, msg)
    if isinstance(value, float) and not math.isfinite(value) and _base(_fields()[name].annotation) is float:
        with pytest.raises(ConfigError):
            load_settings(**{section: {key: value}})
