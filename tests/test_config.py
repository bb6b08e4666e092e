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


def test_probe_file_must_exist():
    with pytest.raises(ConfigError, match=r"probe\.file.*no file '/no/probe.jsonl'"):
        load_settings(probe={"file": "/no/probe.jsonl"})


def test_buffers_over_the_memory_limit_fail_at_start_with_the_numbers():
    from stream_learner.app import check_memory
    from stream_learner.limits import MiB, memory_budget
    from stream_learner.model import load_model
    from tests.factories import small_settings

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
    from stream_learner.app import load_probe
    from tests.factories import small_settings, tokenizer

    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"text": "fine", "label": "pos"}\n{"text": "no label"}\n')
    with pytest.raises(ConfigError, match=r"probe\.file: line 2 .*missing_label"):
        load_probe(small_settings(probe={"file": str(probe)}), tokenizer())
    probe.write_text('{"text": "fine", "label": "pos"}\n{"text": "awful", "label": 0}\n')
    events = load_probe(small_settings(probe={"file": str(probe), "max_events": 1}), tokenizer())
    assert [e.label for e in events] == [1]


def test_a_lineage_of_another_model_or_label_set_is_not_resumed():
    from stream_learner.app import check_lineage_matches
    from tests.factories import small_settings

    s = small_settings()
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

    from stream_learner.app import Learner
    from tests.factories import small_settings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        learner = Learner(small_settings(http={"enabled": True, "host": "127.0.0.1", "port": port}))
        fix = rf"http: cannot listen on 127\.0\.0\.1:{port}: .*set http\.port"
        with pytest.raises(ConfigError, match=fix):
            learner.start()
