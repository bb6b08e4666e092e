"""``stream-learner serve`` on real parts (issue 19, first phase): versions of the tiny model published by
the learner's own publisher, a real store (a local directory, the SeaweedFS S3 server), the server on
127.0.0.1 (in this process; the CLI as a child process), plain HTTP.

Checked: the protocol's answers (labels, probabilities, the version that computed them, equal to plain
transformers loading that version's directory); micro-batching answering each request with its own
rows; a new version served once LATEST names it; a corrupt, a rejected version never served; a storage
outage riding through; a pinned version; errors in the protocol's form, never a 500.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from stream_learner.cli import app as cli
from stream_learner.service.publisher import rollback
from stream_learner.service.serving.server import InferenceServer
from stream_learner.service.storage import LocalStore, open_store
from stream_learner.service.versions import WEIGHTS, read_latest, version_dir
from tests.support import zygote
from tests.support.services import SeaweedS3, free_port
from tests.support.serving import (
    TEXTS,
    Client,
    VersionSource,
    outputs,
    plain_transformers,
    probabilities,
    serving_settings,
    start_server,
    wait_for,
)
from tests.support.tiny_model import tiny_model_dir

PAIRS = ["the plot", "the acting", "the music", "the ending"]
METRIC = "stream_learner_serving_"


def served_version(client: Client, texts: list[str] = TEXTS) -> str:
    status, body = client.infer(texts)
    assert status == 200, body
    return body["model_version"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A server on a store holding version 1 (max_batch 4, so that requests get cut and joined)."""
    root = tmp_path_factory.mktemp("served")
    VersionSource(LocalStore(root)).publish()
    server = start_server(
        serving_settings(root.as_uri(), max_batch=4, max_wait_ms=20, max_request_bytes=4096)
    )
    wait_for(lambda: server.ready)
    yield server, Client(server.port), root
    server.stop()


# ---------------------------------------------------------------------------------------- protocol
def test_infer_answers_labels_and_probabilities_of_the_version_as_plain_transformers_does(served) -> None:
    _, client, root = served
    assert client.get("/v2/health/live") == (200, {"live": True})
    assert client.get("/v2/health/ready") == (200, {"ready": True})
    assert client.get("/v2/models/stream-learner/ready") == (200, {"ready": True})
    status, response = client.infer(TEXTS, id="request-7")
    assert status == 200, response
    assert response["model_name"] == "stream-learner" and response["model_version"] == "1"
    assert response["id"] == "request-7"
    label, probs = outputs(response)["label"], probabilities(response)
    assert label["datatype"] == "BYTES" and label["shape"] == [4]
    assert outputs(response)["probabilities"]["datatype"] == "FP32" and probs.shape == (4, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert label["data"] == [["neg", "pos"][i] for i in probs.argmax(axis=1)]
    version_dir_ = root / version_dir(1)
    np.testing.assert_allclose(probs, plain_transformers(version_dir_, TEXTS), atol=1e-5)
    # the second segment of each row, as the learner's events have it
    status, response = client.infer(TEXTS, PAIRS)
    assert status == 200, response
    np.testing.assert_allclose(
        probabilities(response), plain_transformers(version_dir_, TEXTS, PAIRS), atol=1e-5
    )
    # outputs asked for: only those, in that order
    status, response = client.infer(TEXTS[:1], outputs=[{"name": "probabilities"}])
    assert [o["name"] for o in response["outputs"]] == ["probabilities"]


def test_metadata_names_the_served_version_its_labels_and_the_protocol(served) -> None:
    _, client, _ = served
    status, meta = client.get("/v2/models/stream-learner")
    assert status == 200
    assert meta["name"] == "stream-learner" and meta["versions"] == ["1"]
    assert [i["name"] for i in meta["inputs"]] == ["text", "text_pair"]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ]
    assert meta["parameters"]["version"] == 1 and meta["parameters"]["labels"] == ["neg", "pos"]
    assert client.get("/v2")[1]["name"] == "stream-learner"
    assert client.infer(TEXTS[:1])[0] == 200  # the module's tests run in any order (xdist)
    metrics = client.metrics()
    assert (
        f"{METRIC}version 1.0" in metrics
        and f'{METRIC}requests_total{{code="200",endpoint="infer"}}' in metrics
    )


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(served) -> None:
    server, client, root = served
    texts = [f"{word} review number {i}" for i, word in enumerate(["great", "awful", "odd"] * 8)]
    expected = plain_transformers(root / version_dir(1), texts)
    batches_before = server.metrics.value(f"{METRIC}batch_size_count")
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(texts))

    def one(i: int) -> None:
        barrier.wait()
        status, response = client.infer([texts[i]])
        assert status == 200 and response["model_version"] == "1"
        results[i] = probabilities(response)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(len(texts)))
    np.testing.assert_allclose(np.stack([results[i] for i in range(len(texts))]), expected, atol=1e-5)
    batches = server.metrics.value(f"{METRIC}batch_size_count") - batches_before
    assert batches < len(texts), "no two requests shared a forward pass"
    # one request larger than max_batch (4): cut into passes, its rows back in its order
    many = texts[:10]
    status, response = client.infer(many, [f"pair {i}" for i in range(10)])
    assert status == 200
    np.testing.assert_allclose(
        probabilities(response),
        plain_transformers(root / version_dir(1), many, [f"pair {i}" for i in range(10)]),
        atol=1e-5,
    )


BAD_REQUESTS = [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b"{}", "no 'inputs'"),
    (b'{"inputs": []}', "empty"),
    (b'{"inputs": [{"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}', "'texts'"),
    (b'{"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}', "BYTES"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["x"]}]}', "shape [2] but 1"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [7]}]}', "not a string"),
    (b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["  "]}]}', "empty"),
    (
        b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},'
        b' {"name": "text_pair", "datatype": "BYTES", "shape": [1], "data": ["c"]}]}',
        "one pair per text",
    ),
    (b'{"inputs": [{"name": "text_pair", "datatype": "BYTES", "shape": [1], "data": ["c"]}]}', "no input"),
    (
        b'{"id": 3, "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}',
        "'id' must be a string",
    ),
]


@pytest.mark.parametrize(("body", "says"), BAD_REQUESTS)
def test_a_bad_request_gets_400_saying_what_is_wrong(served, body: bytes, says: str) -> None:
    _, client, _ = served
    status, answer = client.request("POST", "/v2/models/stream-learner/infer", body)
    assert status == 400 and says in answer["error"], answer


def test_other_errors_are_in_the_protocols_form(served) -> None:
    _, client, _ = served
    status, answer = client.request("POST", "/v2/models/another/infer", b"{}")
    assert status == 404 and "unknown model 'another'" in answer["error"]
    assert client.get("/v2/models/another")[0] == 404
    status, answer = client.get("/v2/nowhere")
    assert status == 404 and "no such path" in answer["error"]
    status, answer = client.get("/v2/models/stream-learner/infer")
    assert status == 405 and "GET" in answer["error"]
    status, answer = client.infer(["x" * 5000])  # max_request_bytes 4096
    assert status == 413 and "4096" in answer["error"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
TENSOR = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["text", "text_pair", "other"]) | JSON,
        "datatype": st.sampled_from(["BYTES", "FP32"]) | JSON,
        "shape": st.lists(st.integers(-1, 3), max_size=3) | JSON,
        "data": st.lists(st.text(max_size=10) | st.lists(st.text(max_size=5), max_size=2), max_size=3) | JSON,
    },
)
REQUEST = st.fixed_dictionaries(
    {"inputs": st.lists(TENSOR, max_size=3) | JSON},
    optional={"id": JSON, "outputs": JSON, "parameters": JSON},
)


VALID = st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=5).map(
    lambda texts: {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=VALID | REQUEST | JSON)
def test_any_json_body_gets_an_answer_or_a_400_never_a_500(served, body: object) -> None:
    _, client, _ = served
    status, answer = client.request("POST", "/v2/models/stream-learner/infer", json.dumps(body).encode())
    assert status in (200, 400, 413), answer
    assert ("outputs" in answer) if status == 200 else answer["error"]


# ----------------------------------------------------------------------------------------- hot swap
def test_a_new_version_is_served_once_latest_names_it(tmp_path: Path) -> None:
    """Served within the poll interval plus its load time: measured and printed, not bounded."""
    source = VersionSource(LocalStore(tmp_path))
    source.publish()
    server = start_server(serving_settings(tmp_path.as_uri()))
    try:
        client = Client(server.port)
        wait_for(lambda: server.ready)
        assert served_version(client) == "1"
        assert client.get("/v2/models/stream-learner")[1]["versions"] == ["1"]
        source.publish()
        published = time.monotonic()
        seconds = wait_for(lambda: served_version(client) == "2")
        print(f"version 2 served {seconds:.2f} s after LATEST named it (poll every 0.2 s, then load)")
        assert time.monotonic() - published >= seconds
        # the response that says 2 holds version 2's predictions, not 1's
        status, response = client.infer(TEXTS)
        assert status == 200 and response["model_version"] == "2"
        np.testing.assert_allclose(
            probabilities(response), plain_transformers(tmp_path / version_dir(2), TEXTS), atol=1e-5
        )
        assert not np.allclose(
            plain_transformers(tmp_path / version_dir(1), TEXTS),
            plain_transformers(tmp_path / version_dir(2), TEXTS),
            atol=1e-7,
        ), "the two versions predict alike: the check above would prove nothing"
        m = server.metrics
        assert m.value(f"{METRIC}version") == 2 and m.value(f"{METRIC}swaps_total") == 2
        assert m.value(f"{METRIC}latest_version") == 2 and m.value(f"{METRIC}load_seconds_count") == 2
        assert 0 < m.value(f"{METRIC}version_age_seconds") < 600
    finally:
        server.stop()


class DamagingStore(LocalStore):
    """A local store whose disk damages every weights file uploaded (one byte flipped after the write):
    the version's manifest records the sha256 of what was meant, storage holds something else."""

    def put_file(self, key: str, path: Path, **kwargs) -> str:
        etag = super().put_file(key, path, **kwargs)
        if key.endswith(WEIGHTS):
            stored = self._path(key)
            data = bytearray(stored.read_bytes())
            data[len(data) // 2] ^= 0xFF
            stored.write_bytes(bytes(data))
        return etag


def test_a_corrupt_version_under_latest_is_never_served(tmp_path: Path, caplog) -> None:
    source = VersionSource(LocalStore(tmp_path))
    source.publish()
    server = start_server(serving_settings(tmp_path.as_uri()))
    second: InferenceServer | None = None
    try:
        client = Client(server.port)
        wait_for(lambda: server.ready)
        source.publisher.store = DamagingStore(tmp_path)
        assert source.publish() == 2 and read_latest(source.store)[0] == 2  # LATEST names the damaged one
        source.publisher.store = source.store
        refused = f"{METRIC}versions_refused_total"
        wait_for(lambda: server.metrics.value(refused, {"status": "corrupt"}) == 1)
        for _ in range(5):  # polls go on: it stays refused, counted once, never served
            assert served_version(client) == "1"
            time.sleep(0.1)
        assert server.metrics.value(refused, {"status": "corrupt"}) == 1
        assert server.metrics.value(f"{METRIC}swaps_total") == 1
        assert client.get("/v2/health/ready")[0] == 200
        assert (
            sum("model.safetensors does not match the sha256" in r.getMessage() for r in caplog.records) == 1
        )
        # a server starting now finds LATEST corrupt: it serves the newest intact version of its chain
        second = start_server(serving_settings(tmp_path.as_uri()))
        wait_for(lambda: second.ready)
        assert served_version(Client(second.port)) == "1"
        # the next intact version is served
        assert source.publish() == 3
        wait_for(lambda: served_version(client) == "3")
    finally:
        server.stop()
        if second is not None:
            second.stop()


def test_a_rejected_version_is_skipped_even_when_latest_names_it(tmp_path: Path) -> None:
    source = VersionSource(LocalStore(tmp_path))
    source.publish()
    assert source.publish_rejected() == 2 and read_latest(source.store)[0] == 1  # the gate kept LATEST
    rollback(source.store, 2, force=True)  # an operator forces LATEST onto it
    assert read_latest(source.store)[0] == 2
    server = start_server(serving_settings(tmp_path.as_uri()))
    try:
        client = Client(server.port)
        wait_for(lambda: server.ready)
        # nothing served yet and LATEST refused: the chain's newest servable version
        assert served_version(client) == "1"
        assert server.metrics.value(f"{METRIC}versions_refused_total", {"status": "rejected"}) == 1
    finally:
        server.stop()


def test_nothing_is_served_before_a_version_exists(tmp_path: Path) -> None:
    server = start_server(serving_settings(tmp_path.as_uri()))
    try:
        client = Client(server.port)
        assert client.get("/v2/health/live")[0] == 200
        status, answer = client.infer(TEXTS)
        assert status == 503 and "no version loaded" in answer["error"]
        assert client.get("/v2/health/ready")[0] == 503
        assert client.get("/v2/models/stream-learner")[0] == 503
        VersionSource(LocalStore(tmp_path)).publish()
        wait_for(lambda: client.get("/v2/health/ready")[0] == 200)
        assert served_version(client) == "1"
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ outage
def test_a_storage_outage_keeps_the_served_version_answering(
    s3_server: SeaweedS3, s3_bucket: str, caplog
) -> None:
    url = f"s3://{s3_bucket}/sentiment"
    store = open_store(url, **s3_server.store_options())
    VersionSource(store).publish()
    s3 = {
        "s3_endpoint_url": s3_server.endpoint_url,
        "s3_region": s3_server.region,
        "s3_access_key_id": s3_server.access_key_id,
        "s3_secret_access_key": s3_server.secret_access_key,
    }
    server = start_server(serving_settings(url, publish=s3))
    try:
        client = Client(server.port)
        wait_for(lambda: server.ready, timeout=60)
        caplog.set_level(logging.WARNING, logger="stream_learner.service.serving.follower")
        s3_server.stop()
        failed = f"{METRIC}failed_polls_total"
        outage = wait_for(lambda: server.metrics.value(failed) >= 2, timeout=120)
        print(f"two failed polls {outage:.1f} s into the outage")
        assert served_version(client) == "1"
        assert client.get("/v2/health/ready") == (200, {"ready": True})
        assert server.metrics.value(f"{METRIC}storage_degraded") == 1
        assert f"{METRIC}failed_polls_total" in client.metrics()
        warnings = [r for r in caplog.records if "failed" in r.getMessage() and r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one line, not one per poll
        s3_server.start()
        wait_for(lambda: server.metrics.value(f"{METRIC}storage_degraded") == 0, timeout=120)
        assert served_version(client) == "1"
    finally:
        s3_server.start()
        server.stop()


# --------------------------------------------------------------------------------------------- CLI
def test_a_pinned_version_is_the_only_one_served(tmp_path: Path) -> None:
    """`stream-learner serve --version 1`, a child process: LATEST moves on, version 1 stays; SIGTERM
    stops it cleanly."""
    store = tmp_path / "store"
    source = VersionSource(LocalStore(store))
    source.publish()
    source.publish()
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": tiny_model_dir(), "max_length": 64},
                "publish": {"storage_url": store.as_uri()},
                "serving": {"host": "127.0.0.1", "port": port, "poll_interval_s": 0.2},
            }
        )
    )
    exe = Path(sys.executable).parent / "stream-learner"
    log = (tmp_path / "serve.log").open("wb")
    proc = zygote.spawn(
        [str(exe), "serve", "-c", str(config), "--version", "1"],
        stdout=log.fileno(),
        stderr=log.fileno(),
        env=dict(os.environ),
    )
    try:
        client = Client(port)

        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return client.get("/v2/health/ready")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout=120)
        assert served_version(client) == "1" and read_latest(source.store)[0] == 2
        source.publish()
        time.sleep(1.0)  # five polls' worth
        assert served_version(client) == "1"
        assert client.get("/v2/models/stream-learner")[1]["versions"] == ["1"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize(
    ("args", "config", "says"),
    [
        ([], {"serving": {"max_batch": 0}}, "invalid setting serving.max_batch"),
        (["--version", "0"], {}, "invalid setting serving.version"),
        ([], {"serving": {"model_name": "a/b"}}, "invalid setting serving.model_name"),
        (
            [],
            {"publish": {"storage_url": "file:///nonexistent/versions"}},
            "publish.storage_url: no directory",
        ),
    ],
)
def test_a_bad_setting_fails_at_start_with_exit_2(
    tmp_path: Path, args: list, config: dict, says: str
) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(cli, ["serve", "-c", str(path), *args])
    assert result.exit_code == 2, result.output
    assert says in result.output


def test_a_port_in_use_fails_at_start_with_exit_2(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = {
            "publish": {"storage_url": tmp_path.as_uri()},
            "serving": {"host": "127.0.0.1", "port": taken.getsockname()[1]},
        }
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        result = CliRunner().invoke(cli, ["serve", "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert "cannot listen on 127.0.0.1" in result.output and "serving.port" in result.output
