"""One contract for every object store: a local directory and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_learner.service.storage import LocalStore, ObjectStore, PreconditionFailed, S3Store, open_store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return open_store((tmp_path / "store").as_uri())
    # resolved here, not as an argument, so that `-k local` never starts the S3 server
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/models/run-1", **server.store_options())


def test_put_get_exists_list_delete(store: ObjectStore) -> None:
    assert store.list() == []
    assert not store.exists("LATEST")
    with pytest.raises(KeyError):
        store.get("LATEST")
    with pytest.raises(KeyError):
        store.get_with_etag("versions/000001/manifest.json")

    etag = store.put("versions/000001/manifest.json", b'{"version": 1}')
    store.put("versions/000002/manifest.json", b'{"version": 2}')
    store.put("versions/000002/trainer_state/state.json", b"{}")
    store.put("LATEST", b"versions/000002\n")

    assert store.get("versions/000001/manifest.json") == b'{"version": 1}'
    assert store.get_with_etag("versions/000001/manifest.json") == (b'{"version": 1}', etag)
    assert store.exists("LATEST")
    assert not store.exists("versions/000001")  # a "directory" is not an object
    assert store.list() == [
        "LATEST",
        "versions/000001/manifest.json",
        "versions/000002/manifest.json",
        "versions/000002/trainer_state/state.json",
    ]
    assert store.list("versions/000002/") == [
        "versions/000002/manifest.json",
        "versions/000002/trainer_state/state.json",
    ]
    assert store.list("versions/00000") == store.list()[1:]  # a plain string prefix, not a directory
    assert store.list("nothing/") == []

    store.put("LATEST", b"versions/000001\n")  # unconditional overwrite
    assert store.get("LATEST") == b"versions/000001\n"

    store.delete("versions/000002/trainer_state/state.json")
    store.delete("versions/000002/trainer_state/state.json")  # missing is fine
    store.delete("never-written")
    assert store.list("versions/000002/") == ["versions/000002/manifest.json"]


def test_put_file_and_get_to_file_round_trip_a_multi_megabyte_file(
    store: ObjectStore, tmp_path: Path
) -> None:
    src = tmp_path / "model.safetensors"
    data = os.urandom(20 * 1024 * 1024 + 123)  # above the multipart threshold on S3
    src.write_bytes(data)

    etag = store.put_file("versions/000001/model.safetensors", src)
    assert etag
    dst = tmp_path / "restored" / "model.safetensors"
    store.get_to_file("versions/000001/model.safetensors", dst)
    assert dst.read_bytes() == data
    assert store.get("versions/000001/model.safetensors") == data
    assert [p.name for p in dst.parent.iterdir()] == ["model.safetensors"]  # no temporary left behind

    with pytest.raises(KeyError):
        store.get_to_file("versions/000009/model.safetensors", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_if_none_match_creates_once(store: ObjectStore) -> None:
    store.put("LATEST", b"versions/000001\n", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("LATEST", b"versions/000002\n", if_none_match=True)
    assert store.get("LATEST") == b"versions/000001\n"


def test_if_match_replaces_only_the_version_read(store: ObjectStore) -> None:
    first = store.put("LATEST", b"versions/000001\n", if_none_match=True)
    data, etag = store.get_with_etag("LATEST")
    assert (data, etag) == (b"versions/000001\n", first)

    second = store.put("LATEST", b"versions/000002\n", if_match=etag)
    assert second != first
    assert store.get_with_etag("LATEST") == (b"versions/000002\n", second)

    with pytest.raises(PreconditionFailed):
        store.put("LATEST", b"versions/000003\n", if_match=first)  # stale
    assert store.get("LATEST") == b"versions/000002\n"

    store.delete("LATEST")
    with pytest.raises(PreconditionFailed):
        store.put("LATEST", b"versions/000003\n", if_match=second)  # gone
    with pytest.raises(ValueError):
        store.put("LATEST", b"x", if_none_match=True, if_match=second)


def _race(store: ObjectStore, writers: int, **condition: object) -> list[bool]:
    """``writers`` threads put LATEST with ``condition`` at the same moment; who won."""
    barrier = threading.Barrier(writers)
    won: list[bool] = []

    def publish(i: int) -> None:
        barrier.wait()
        try:
            store.put("LATEST", f"writer {i}\n".encode(), **condition)
            won.append(True)
        except PreconditionFailed:
            won.append(False)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return won


def test_racing_conditional_writes_have_exactly_one_winner(store: ObjectStore) -> None:
    assert sorted(_race(store, 4, if_none_match=True)) == [False, False, False, True]
    for round_ in range(5):
        etag = store.put("LATEST", f"versions/{round_:06d}\n".encode())
        assert sorted(_race(store, 2, if_match=etag)) == [False, True], f"round {round_}"
        assert store.get("LATEST") in (b"writer 0\n", b"writer 1\n")


def _put_if_match_in_process(root: str, etag: str, body: bytes, start_at: float) -> bool:
    store = open_store(root)
    time.sleep(max(start_at - time.time(), 0))
    try:
        store.put("LATEST", body, if_match=etag)
    except PreconditionFailed:
        return False
    return True


def test_local_conditional_writes_are_atomic_across_processes(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    etag = store.put("LATEST", b"versions/000001\n")
    # spawned, not forked: the test process may hold torch's threads
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(int).result()  # workers up before the clock starts
        start_at = time.time() + 1.0
        futures = [
            pool.submit(_put_if_match_in_process, str(tmp_path), etag, f"p{i}".encode(), start_at)
            for i in range(4)
        ]
        won = [f.result(timeout=60) for f in futures]
    assert sorted(won) == [False, False, False, True]


def test_invalid_keys_are_rejected(store: ObjectStore) -> None:
    for key in ("", "/abs", "a//b", "../escape", "versions/../LATEST", ".lock", "a/.hidden"):
        with pytest.raises(ValueError):
            store.put(key, b"x")


def test_describe_never_shows_credentials(s3_server, s3_bucket: str) -> None:
    opts = s3_server.store_options()
    store = open_store(f"s3://{s3_bucket}/p", **opts)
    assert isinstance(store, S3Store)
    for text in (store.describe(), repr(store), store.url):
        assert opts["secret_access_key"] not in text
        assert opts["access_key_id"] not in text
    assert store.describe().startswith(f"s3://{s3_bucket}/p/")

    with_userinfo = S3Store("b", "p", client=None, endpoint_url="http://user:hunter2@minio:9000")
    assert "hunter2" not in with_userinfo.describe()
    assert "minio:9000" in with_userinfo.describe()


def test_local_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cases = {
        (tmp_path / "abs dir").as_uri(): tmp_path / "abs dir",
        "file://./rel": tmp_path / "rel",
        "file://rel2/sub": tmp_path / "rel2" / "sub",
        "plain/dir": tmp_path / "plain" / "dir",
        str(tmp_path / "abs2"): tmp_path / "abs2",
    }
    for url, root in cases.items():
        store = open_store(url)
        assert isinstance(store, LocalStore)
        assert store.root == root
        store.put("LATEST", b"x")
        assert (root / "LATEST").read_bytes() == b"x"
        assert store.list() == ["LATEST"]  # the lock file is not an object


def test_local_etag_is_the_sha256_of_the_content(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    assert store.put("a", b"hello") == hashlib.sha256(b"hello").hexdigest()


SHM = Path("/dev/shm")  # tmpfs: another filesystem than the store's


@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=3 * 1024 * 1024 // 2), digest_given=st.booleans(), elsewhere=st.booleans())
def test_local_put_file_stores_exactly_the_file_linked_or_copied(
    data: bytes, digest_given: bool, elsewhere: bool
) -> None:
    """Whatever the bytes: a file from the store's filesystem is linked, from another one (or where links
    fail) copied; either way the key holds exactly those bytes and its ETag is their sha256 — the one the
    caller gave or one computed — and no temporary is left beside it."""
    if elsewhere and not SHM.is_dir():
        pytest.skip("no /dev/shm")
    with (
        tempfile.TemporaryDirectory() as where,
        tempfile.TemporaryDirectory(dir=SHM if elsewhere else None) as src_dir,
    ):
        store = LocalStore(Path(where) / "store")
        src = Path(src_dir) / "weights.safetensors"
        src.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        etag = store.put_file(
            "versions/000001/weights.safetensors", src, sha256=digest if digest_given else None
        )
        stored = store.root / "versions/000001/weights.safetensors"
        same_fs = os.stat(src).st_dev == os.stat(store.root).st_dev
        assert os.path.samefile(src, stored) == same_fs  # linked exactly when it can be
        assert etag == digest == store.get_with_etag("versions/000001/weights.safetensors")[1]
        assert stored.read_bytes() == data
        assert sorted(p.name for p in stored.parent.iterdir()) == ["weights.safetensors"]
        src.unlink()  # the staging directory goes; the stored object stays
        assert stored.read_bytes() == data


def test_bad_urls() -> None:
    with pytest.raises(ValueError, match="unsupported scheme 'ftp'; use file:// or s3://"):
        open_store("ftp://x")
    with pytest.raises(ValueError, match="no bucket"):
        open_store("s3:///prefix")
    with pytest.raises(ValueError, match="both"):
        open_store("s3://bucket/p", access_key_id="AK")
    with pytest.raises(ValueError):
        open_store("")
