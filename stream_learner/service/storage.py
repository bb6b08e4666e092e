"""Object storage for published model versions: a local directory or an S3 bucket, behind one interface.

URLs accepted by :func:`open_store`:

* ``file:///abs/dir``, ``file://./rel/dir`` or a plain path → :class:`LocalStore`;
* ``s3://bucket/prefix`` → :class:`S3Store` (boto3; AWS, MinIO, SeaweedFS…).

Keys are ``/``-separated and relative to the store's root or prefix, e.g.
``versions/000001/model.safetensors`` or ``LATEST``. A key component may not be empty, ``.``, ``..``
or start with ``.`` (the local store keeps its lock and temporary files under such names).

Conditional writes are what makes publication safe with more than one writer: ``put(...,
if_none_match=True)`` creates an object only if it does not exist, ``put(..., if_match=etag)`` replaces
it only if it is still the version the writer read; the loser gets :class:`PreconditionFailed`.

:func:`check_reachable` is the start-up check: a store that cannot be used is refused in plain words
before anything heavy is loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from stream_learner.core.config import ENV_PREFIX, ConfigError, Settings

_CHUNK = 1 << 20
_LOCK_NAME = ".lock"
_S3_RETRIES = {"max_attempts": 4, "mode": "standard"}
_TRANSFER = TransferConfig(multipart_threshold=16 * _CHUNK, multipart_chunksize=16 * _CHUNK)


class PreconditionFailed(Exception):
    """A conditional write lost: another writer changed the object."""


def check_key(key: str) -> str:
    """Validate a store key; returns it or raises :class:`ValueError`."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid storage key {key!r}: empty")
    parts = key.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts) or "\\" in key or "\0" in key:
        raise ValueError(
            f"invalid storage key {key!r}: use '/'-separated names, none empty or starting with '.'"
        )
    return key


class ObjectStore(ABC):
    """A flat key → bytes store with ETags and conditional writes (see the module docstring)."""

    url: str

    @abstractmethod
    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Write ``data`` at ``key``; returns its new ETag.

        ``if_none_match``: only if ``key`` does not exist. ``if_match``: only if the current ETag of
        ``key`` equals it. Raises :class:`PreconditionFailed` when the condition does not hold.
        """

    @abstractmethod
    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> str:
        """Upload a local file (streamed; multipart on S3 for big files); returns its ETag.

        ``sha256``: the file's hex SHA-256, when the caller has computed it (the publisher has, for the
        manifest). A store whose ETag is that digest then does not read the file a second time.
        """

    @abstractmethod
    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """The object's content and ETag; :class:`KeyError` if absent."""

    def get(self, key: str) -> bytes:
        """The object's content; :class:`KeyError` if absent."""
        return self.get_with_etag(key)[0]

    @abstractmethod
    def get_to_file(self, key: str, path: Path) -> None:
        """Download to ``path`` (replaced atomically, parents created); :class:`KeyError` if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (a plain string prefix), relative to the store's root, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    @abstractmethod
    def describe(self) -> str:
        """Where this store is, for humans and logs; never contains credentials."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def _check_conditions(if_none_match: bool, if_match: str | None) -> None:
    if if_none_match and if_match is not None:
        raise ValueError("give if_none_match or if_match, not both")


# ------------------------------------------------------------------------------------ local
class LocalStore(ObjectStore):
    """A directory as an object store.

    Every write goes to a temporary file in the target's directory, is fsynced, then renamed over the
    target, so a reader sees the old or the new content, never a part. The ETag is the hex SHA-256 of
    the content. Conditional writes hold an exclusive ``flock`` on ``<root>/.lock`` from the condition
    check to the rename, which makes them atomic across threads and processes on one host (and on
    network filesystems only as far as their ``flock`` is).
    """

    def __init__(self, root: Path, create: bool = True) -> None:
        """``create``: make the directory if it is not there (a reader passes False: a directory that is
        not there is a mistake in its settings, and it never writes)."""
        self.root = Path(root).expanduser().absolute()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise FileNotFoundError(f"no directory {self.root}")
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextlib.contextmanager
    def _temp_name(self, path: Path) -> Iterator[Path]:
        """A temporary name in ``path``'s directory, removed unless the caller renamed it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _temp_beside(self, path: Path) -> Iterator[tuple[IO[bytes], Path]]:
        """A temporary file in ``path``'s directory, removed unless the caller renamed it."""
        with self._temp_name(path) as tmp, tmp.open("xb") as f:
            yield f, tmp

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _etag_of(self, path: Path) -> str | None:
        h = hashlib.sha256()
        try:
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    h.update(chunk)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return h.hexdigest()

    def _commit(self, tmp: Path, path: Path, if_none_match: bool, if_match: str | None) -> None:
        if not if_none_match and if_match is None:
            os.replace(tmp, path)
        else:
            with self._locked():
                current = self._etag_of(path)
                if if_none_match and current is not None:
                    raise PreconditionFailed(f"{self.url}/{path.relative_to(self.root)} already exists")
                if if_match is not None and current != if_match:
                    raise PreconditionFailed(
                        f"{self.url}/{path.relative_to(self.root)} changed: ETag is {current}, not {if_match}"
                    )
                os.replace(tmp, path)
        self._fsync_dir(path.parent)

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        _check_conditions(if_none_match, if_match)
        path = self._path(key)
        with self._temp_beside(path) as (f, tmp):
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._commit(tmp, path, if_none_match, if_match)
        return hashlib.sha256(data).hexdigest()

    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> str:
        """A hard link to ``path`` where it is on the store's filesystem, else a copy; fsynced, then
        renamed into place. A learner's staging directory on the local store's filesystem: a version's
        files (≈ 3 × the model's bytes) are not copied again, which took a core from the trainer."""
        target = self._path(key)
        with self._temp_name(target) as tmp:
            try:
                os.link(path, tmp)
            except OSError:  # another filesystem (EXDEV), or one without hard links
                with tmp.open("xb") as f, Path(path).open("rb") as src:
                    shutil.copyfileobj(src, f, _CHUNK)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            self._commit(tmp, target, False, None)
        return self._etag_of(target) if sha256 is None else sha256

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None
        return data, hashlib.sha256(data).hexdigest()

    def get_to_file(self, key: str, path: Path) -> None:
        path = Path(path)
        try:
            src = self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None
        with src, self._temp_beside(path) as (f, tmp):
            shutil.copyfileobj(src, f, _CHUNK)
            f.close()
            os.replace(tmp, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if ".." in prefix.split("/") or prefix.startswith("/"):
            raise ValueError(f"invalid storage prefix {prefix!r}")
        # walk only the deepest directory the prefix names, not the whole tree
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith("."):  # the lock file and temporary files
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # drop directories left empty, like S3 where "directories" do not exist on their own
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def describe(self) -> str:
        return self.url


# --------------------------------------------------------------------------------------- S3
def _status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _is_missing(err: ClientError) -> bool:
    # a missing bucket is a configuration error, not a missing key (HEAD cannot tell them apart)
    return _code(err) in ("NoSuchKey", "404", "NotFound") or (
        _status(err) == 404 and _code(err) != "NoSuchBucket"
    )


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


class S3Store(ObjectStore):
    """An S3 bucket and prefix as an object store (boto3).

    ETags are S3's, quoted as S3 returns them; pass them back unchanged to ``if_match``. Conditional
    writes use ``If-None-Match: *`` / ``If-Match`` on PutObject (AWS S3 since 2024, MinIO, SeaweedFS):
    HTTP 412, or 409 ``ConditionalRequestConflict`` for a concurrent conditional write, becomes
    :class:`PreconditionFailed`.
    """

    def __init__(self, bucket: str, prefix: str, client: Any, endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{self.prefix}"

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        _check_conditions(if_none_match, if_match)
        kwargs: dict[str, Any] = {}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **kwargs)
        except ClientError as err:
            conditional = bool(kwargs)
            if conditional and (_status(err) in (409, 412) or _code(err) == "PreconditionFailed"):
                raise PreconditionFailed(f"{self.url}{key}: {_code(err)} ({_status(err)})") from err
            if if_match is not None and _is_missing(err):  # If-Match on a deleted object
                raise PreconditionFailed(f"{self.url}{key}: no longer exists") from err
            raise
        return resp["ETag"]

    def put_file(self, key: str, path: Path, *, sha256: str | None = None) -> str:
        full = self._key(key)
        self.client.upload_file(str(path), self.bucket, full, Config=_TRANSFER)
        # upload_file does not return the ETag (and may be multipart, whose ETag is not an MD5)
        return self.client.head_object(Bucket=self.bucket, Key=full)["ETag"]

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if _is_missing(err):
                raise KeyError(key) from None
            raise
        with contextlib.closing(resp["Body"]) as body:
            return body.read(), resp["ETag"]

    def get_to_file(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=_TRANSFER)
            os.replace(tmp, path)
        except ClientError as err:
            if _is_missing(err):
                raise KeyError(key) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if _is_missing(err):
                return False
            raise
        return True

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix
        )
        for page in pages:
            keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def describe(self) -> str:
        if self.endpoint_url:
            return f"{self.url} at {_without_userinfo(self.endpoint_url)}"
        return self.url


# ---------------------------------------------------------------------------------- opening
def _local_root(url: str) -> Path:
    parts = urlsplit(url)
    if not parts.scheme:
        return Path(url)
    if parts.netloc in ("", "localhost"):
        return Path(unquote(parts.path))
    # file://./dir or file://dir: not a host name but the start of a relative path
    return Path(unquote(parts.netloc + parts.path))


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    region: str | None = None,
    create: bool = True,
) -> ObjectStore:
    """Open the store a URL names (see the module docstring).

    The S3 arguments are ignored for ``file://``. Each one left None falls back to boto3's usual
    chain (environment, ``~/.aws``, instance role). ``create=False``: a local directory that is not
    there raises :class:`FileNotFoundError` instead of being made. Raises :class:`ValueError` for an
    unsupported scheme or a malformed URL.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("", "file"):
        if not url.strip() or (scheme == "file" and not (parts.netloc or parts.path)):
            raise ValueError(f"storage URL {url!r}: no directory; use file:///abs/dir or file://./rel/dir")
        return LocalStore(_local_root(url), create=create)
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"storage URL {url!r}: no bucket; use s3://bucket/prefix")
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("give both the S3 access key id and the secret access key, or neither")
        options: dict[str, Any] = {"retries": dict(_S3_RETRIES), "connect_timeout": 10, "read_timeout": 60}
        if endpoint_url:
            # MinIO/SeaweedFS and most S3-compatible servers do not do virtual-hosted buckets
            options["s3"] = {"addressing_style": "path"}
        # a session per store: boto3's default session is not safe to share between threads
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
            config=Config(**options),
        )
        return S3Store(parts.netloc, parts.path, client, endpoint_url=endpoint_url)
    raise ValueError(f"storage URL {url!r}: unsupported scheme {scheme!r}; use file:// or s3://")


# ------------------------------------------------------------------------------- start-up check
#: Longest :func:`check_reachable` waits for the object store to answer. boto3 retries a refused
#: connection within a second; a server that does not answer at all would take 4 attempts × 10 s.
STORE_CHECK_TIMEOUT_S = 15.0

_CREDENTIAL_CODES = (
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
)
_REGION_CODES = ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException")


class StoreUnreachable(RuntimeError):
    """The object store did not answer, or answered with a server error; the message says what to check."""


def _setting(name: str) -> str:
    return f"publish.{name} ({ENV_PREFIX}PUBLISH__{name.upper()})"


def check_reachable(store: ObjectStore, timeout_s: float = STORE_CHECK_TIMEOUT_S) -> None:
    """Check at start-up that ``store`` can be used: list one key under its prefix within ``timeout_s``.

    A mistake in the settings (no such bucket, credentials refused or missing, a wrong region, a local
    directory this process may not write) raises :class:`~stream_learner.core.config.ConfigError` naming the
    setting; a store that does not answer, or answers with a server error, raises :class:`StoreUnreachable`.
    """
    if isinstance(store, LocalStore):
        if not os.access(store.root, os.W_OK | os.X_OK):
            raise ConfigError(
                f"publish.storage_url: this process may not write to {store.root}: fix its permissions "
                f"or set {_setting('storage_url')} to a writable directory"
            )
        return
    if not isinstance(store, S3Store):
        return
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            store.client.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix, MaxKeys=1)
            outcome.append(None)
        except BaseException as err:  # handed over to the caller's thread
            outcome.append(err)

    # boto3 has no overall deadline (connect and read timeouts per attempt, then retries): a thread does
    thread = threading.Thread(target=probe, name="stream-learner-store-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    where = store.describe()
    endpoint = _setting("s3_endpoint_url")
    if not outcome:
        raise StoreUnreachable(
            f"cannot reach the object store {where}: no answer within {timeout_s:g} s; check {endpoint} "
            "and that the server is up and reachable from here"
        )
    err = outcome[0]
    if err is None:
        return
    plain = {
        ConnectTimeoutError: "the connection timed out",
        EndpointConnectionError: "could not connect",
        ReadTimeoutError: "no answer in time",
        ConnectionClosedError: "the connection was closed",
    }
    why = next((text for kind, text in plain.items() if isinstance(err, kind)), None)
    if why is not None:
        raise StoreUnreachable(
            f"cannot reach the object store {where} ({why}): check {endpoint} and that the server is up "
            "and reachable from here"
        ) from None
    if isinstance(err, NoCredentialsError):
        raise ConfigError(
            f"publish.s3_access_key_id / publish.s3_secret_access_key: no S3 credentials for {where}: set "
            f"{ENV_PREFIX}PUBLISH__S3_ACCESS_KEY_ID and {ENV_PREFIX}PUBLISH__S3_SECRET_ACCESS_KEY, or give "
            "the AWS default chain some (environment, ~/.aws, an instance or pod role)"
        ) from None
    if isinstance(err, ParamValidationError):
        raise ConfigError(f"publish.storage_url: {where}: {err}; fix {_setting('storage_url')}") from None
    if not isinstance(err, ClientError):
        raise err
    code, status = _code(err), _status(err)
    if code == "NoSuchBucket":
        raise ConfigError(
            f"publish.storage_url: the bucket {store.bucket!r} does not exist ({where}): create it, or fix "
            f"{_setting('storage_url')}"
        ) from None
    if code in _CREDENTIAL_CODES or status == 403:
        raise ConfigError(
            f"publish.s3_access_key_id / publish.s3_secret_access_key: {where} refused to list "
            f"{store.url} ({code or status}): check the credentials, and that they may list, read and "
            "write under that prefix"
        ) from None
    if code in _REGION_CODES or status == 301:
        raise ConfigError(
            f"publish.s3_region: {where} answered {code or status}: the bucket is in another region; "
            f"set {_setting('s3_region')}"
        ) from None
    raise StoreUnreachable(
        f"the object store {where} answered {code or 'an error'} (HTTP {status}) to a listing of "
        f"{store.url}: check {endpoint} and the server's health"
    ) from None


def open_settings_store(settings: Settings, create: bool = True) -> ObjectStore:
    """The store of ``publish.*`` (its URL, endpoint and secrets); ``create`` as :func:`open_store`."""
    p = settings.publish
    secret = lambda s: s.get_secret_value() if s is not None else None  # noqa: E731
    return open_store(
        p.storage_url,
        endpoint_url=p.s3_endpoint_url,
        access_key_id=secret(p.s3_access_key_id),
        secret_access_key=secret(p.s3_secret_access_key),
        region=p.s3_region,
        create=create,
    )
