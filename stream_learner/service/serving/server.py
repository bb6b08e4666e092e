"""The inference server's wiring and lifecycle: three threads joined by one queue and two events.

::

    follower thread ──Swap──┐                                     (follower.py: LATEST, load, verify)
                            ▼
    HTTP (uvicorn thread) ──Infer──▶ inbox ──▶ batcher thread ──▶ answers via call_soon_threadsafe
    (http.py, protocol.py)                     (batcher.py: micro-batches, the one model in use)

Start (:meth:`InferenceServer.start`): settings checked, the store opened (a local directory must
exist: a server never creates nor writes anything there; an S3 store is listed once, so that a missing
bucket or refused credentials fail at once — an unreachable one does not: the server starts unready
and polls until it answers), the port bound (in use: a one-line error naming ``serving.port``), then
the threads. Stop (:meth:`InferenceServer.stop`): the HTTP server stops taking requests and answers
those in flight, then the follower and the batcher end.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable

import uvicorn

from stream_learner.core.config import ConfigError, Settings
from stream_learner.service.metrics import ServingMetrics
from stream_learner.service.serving.batcher import Message, MicroBatcher, Stop
from stream_learner.service.serving.follower import VersionFollower
from stream_learner.service.serving.http import InferenceApp
from stream_learner.service.serving.loader import VersionLoader
from stream_learner.service.staging import remove_stale_staging_dirs
from stream_learner.service.storage import (
    ObjectStore,
    S3Store,
    StoreUnreachable,
    check_reachable,
    open_settings_store,
)
from stream_learner.training.engine import pick_device
from stream_learner.training.threads import hand_over_threads

log = logging.getLogger(__name__)

GRACEFUL_S = 10.0  # longest the HTTP server waits for requests in flight at stop


def open_serving_store(settings: Settings) -> ObjectStore:
    """The store of ``publish.*``, opened to read: :class:`ConfigError` naming the setting when it
    cannot be what was meant (no such directory, no such bucket, credentials refused)."""
    try:
        store = open_settings_store(settings, create=False)
    except FileNotFoundError as err:
        raise ConfigError(
            f"publish.storage_url: {err}: a server reads the versions a learner publishes there; give the "
            "learner's publish.storage_url"
        ) from None
    except ValueError as err:
        raise ConfigError(f"publish.storage_url: {err}") from None
    if isinstance(store, S3Store):
        try:
            check_reachable(store)
        except StoreUnreachable as err:  # an outage, not a mistake: start unready and keep polling
            log.warning("%s; starting anyway, not ready until a version loads", err)
    return store


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; :class:`ConfigError` naming ``serving.port`` if none."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every response (headers, then body: two writes) waited 40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ConfigError(
            f"serving: cannot listen on {host}:{port}: {err.strerror}; set serving.port to a free port "
            "(0: any) or serving.host to an address of this machine, or stop what listens there"
        ) from None
    return sock


class InferenceServer:
    """``stream-learner serve``: construct, :meth:`start`, then :meth:`stop` (or :meth:`wait`)."""

    def __init__(self, settings: Settings, metrics: ServingMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ServingMetrics()
        self.port: int | None = None
        self._threads: dict[str, threading.Thread] = {}
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._follower_stop = threading.Event()
        self.error: BaseException | None = None

    def start(self) -> InferenceServer:
        s, serving = self.settings, self.settings.serving
        store = open_serving_store(s)
        sock = bind(serving.host, serving.port)
        threads = hand_over_threads()  # this thread computes nothing: the batcher takes the cores
        remove_stale_staging_dirs()  # a killed server's half-downloaded version
        self.port = sock.getsockname()[1]
        inbox: queue.Queue[Message] = queue.Queue()
        self.inbox = inbox
        self.batcher = MicroBatcher(
            inbox, serving.max_batch, serving.max_wait_ms / 1000, self.metrics, threads
        )
        device = pick_device(serving.device)
        loader = VersionLoader(store, device, s.model.max_length, serving.max_batch, self.metrics)
        self.follower = VersionFollower(
            store, loader, inbox, self.metrics, self._follower_stop, serving.poll_interval_s, serving.version
        )
        app = InferenceApp(
            serving.model_name, inbox, self.batcher, self.metrics, serving.max_request_bytes, self.alive
        )
        config = uvicorn.Config(
            app.app,
            log_config=None,  # the process's logging, as configured by the CLI
            access_log=False,  # requests are counted in metrics, not logged one line each
            lifespan="off",
            timeout_graceful_shutdown=int(GRACEFUL_S),
        )
        self._http = uvicorn.Server(config)
        self._spawn("batcher", self.batcher.run)
        self._spawn("follower", self.follower.run)
        self._spawn("http", lambda: self._http.run(sockets=[sock]))
        what = f"version {serving.version} (pinned)" if serving.version else "LATEST"
        log.info(
            "serving %s of %s as %r on %s:%d (device %s)",
            what,
            store.describe(),
            serving.model_name,
            serving.host,
            self.port,
            device,
        )
        return self

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except BaseException as err:
                log.exception("the %s thread failed", name)
                self.error = self.error or err

        thread = threading.Thread(target=guarded, name=f"stream-learner-serve-{name}", daemon=True)
        self._threads[name] = thread
        thread.start()

    def alive(self) -> bool:
        """The batcher and the follower run (liveness)."""
        return all(self._threads[n].is_alive() for n in ("batcher", "follower") if n in self._threads)

    @property
    def ready(self) -> bool:
        return self.batcher.ready.is_set()

    def stop(self, timeout: float = GRACEFUL_S + 5) -> bool:
        """Stop taking requests, answer those in flight, end the threads; True if all ended in time.
        Safe from any thread, more than once."""
        with self._stop_lock:
            if self._stopped.is_set() or not self._threads:
                self._stopped.set()
                return True
            self._http.should_exit = True
            self._threads["http"].join(timeout)
            self._follower_stop.set()
            self.inbox.put(Stop())
            for name in ("batcher", "follower"):
                self._threads[name].join(timeout)
            clean = not any(t.is_alive() for t in self._threads.values())
            self._stopped.set()
            log.info("stopped%s", "" if clean else " (a thread did not end in time)")
            return clean

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; True if it did within ``timeout``."""
        return self._stopped.wait(timeout)
