"""Settings: env nesting, YAML, and one-line errors that name the setting (acceptance 4.7)."""

import subprocess
import sys

import pytest

from stream_learner.config import ConfigError, load_settings


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
