"""The HTTP endpoints of the inference server: the Open Inference Protocol's REST paths and /metrics.

=====================================  =============================================================
``GET /v2/health/live``                200 while the batcher and follower threads run, else 503
``GET /v2/health/ready``               200 once a version is loaded, 503 before (an outage of the
                                       store changes nothing: the loaded version still answers)
``GET /v2``                            the server's metadata (name, version, extensions)
``GET /v2/models/<name>``              the model's metadata: inputs, outputs, served version, labels
``GET /v2/models/<name>/ready``        as ``/v2/health/ready``, for that model
``POST /v2/models/<name>/infer``       inference (``protocol.py``), batched with others (``batcher.py``)
``GET /metrics``                       Prometheus (``metrics.ServingMetrics``)
=====================================  =============================================================

Errors are the protocol's ``{"error": "…"}``: 400 for a request that breaks the protocol (the message
says what is wrong), 404 for another model name or path, 405 for another method, 413 for a body over
``serving.max_request_bytes``, 503 before a version is loaded, 500 if a batch fails.

The request is parsed on the event loop; its rows go to the batcher's inbox, and the answer comes back
through ``loop.call_soon_threadsafe`` to the future the handler awaits: no thread shares anything else.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import stream_learner
from stream_learner.service.metrics import ServingMetrics
from stream_learner.service.serving.batcher import Answer, Infer, Message, MicroBatcher
from stream_learner.service.serving.protocol import (
    BadRequest,
    error_body,
    infer_response,
    model_metadata,
    parse_infer_request,
)

log = logging.getLogger(__name__)

JSON = "application/json"


class BodyTooLarge(Exception):
    """A request body over ``serving.max_request_bytes``."""


class InferenceApp:
    """The Starlette application (:attr:`app`) over a batcher's inbox; see the module docstring."""

    def __init__(
        self,
        model_name: str,
        inbox: queue.Queue[Message],
        batcher: MicroBatcher,
        metrics: ServingMetrics,
        max_request_bytes: int,
        alive: Callable[[], bool],
    ) -> None:
        self.model_name, self.inbox, self.batcher, self.metrics = model_name, inbox, batcher, metrics
        self.max_request_bytes, self.alive = max_request_bytes, alive
        self.app = Starlette(
            routes=[
                Route("/v2/health/live", self.live, methods=["GET"]),
                Route("/v2/health/ready", self.ready, methods=["GET"]),
                Route("/v2", self.server_metadata, methods=["GET"]),
                Route("/v2/models/{name}", self.metadata, methods=["GET"]),
                Route("/v2/models/{name}/ready", self.model_ready, methods=["GET"]),
                Route("/v2/models/{name}/infer", self.infer, methods=["POST"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error, Exception: self._unexpected},
        )

    # ------------------------------------------------------------------------------------ replies
    def _reply(self, endpoint: str, code: int, body: bytes, media_type: str = JSON) -> Response:
        self.metrics.requests.labels(endpoint, str(code)).inc()
        return Response(body, status_code=code, media_type=media_type)

    def _error(self, endpoint: str, code: int, message: str) -> Response:
        return self._reply(endpoint, code, error_body(message))

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's own 404 (no such path) and 405 (another method), in the protocol's form."""
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        why = {404: f"no such path {request.url.path!r}", 405: f"{request.method} is not allowed here"}
        return self._error("other", code, why.get(code, str(getattr(exc, "detail", exc))))

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return self._error("other", 500, f"internal error: {type(exc).__name__}")

    def _unknown_model(self, endpoint: str, name: str) -> Response | None:
        if name == self.model_name:
            return None
        return self._error(
            endpoint, 404, f"unknown model {name[:100]!r}: this server serves {self.model_name!r}"
        )

    # ------------------------------------------------------------------------------------- health
    async def live(self, request: Request) -> Response:
        alive = self.alive()
        return self._reply("live", 200 if alive else 503, b'{"live": true}' if alive else b'{"live": false}')

    async def ready(self, request: Request) -> Response:
        ready = self.batcher.ready.is_set()
        return self._reply(
            "ready", 200 if ready else 503, b'{"ready": true}' if ready else b'{"ready": false}'
        )

    async def model_ready(self, request: Request) -> Response:
        return self._unknown_model("ready", request.path_params["name"]) or await self.ready(request)

    # ----------------------------------------------------------------------------------- metadata
    async def server_metadata(self, request: Request) -> Response:
        body = {"name": "stream-learner", "version": stream_learner.__version__, "extensions": []}
        return self._reply("metadata", 200, orjson.dumps(body))

    async def metadata(self, request: Request) -> Response:
        unknown = self._unknown_model("metadata", request.path_params["name"])
        if unknown is not None:
            return unknown
        served = self.batcher.served
        if served is None:
            return self._error("metadata", 503, "no version loaded yet: see /v2/health/ready")
        return self._reply(
            "metadata", 200, model_metadata(self.model_name, served.version, served.labels, served.manifest)
        )

    async def prometheus(self, request: Request) -> Response:
        return self._reply("metrics", 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)

    # -------------------------------------------------------------------------------------- infer
    async def infer(self, request: Request) -> Response:
        """Method: check the model name, read the body (bounded), parse it (400 saying why), queue its
        rows for the batcher and await the answer, which names the version that computed it."""
        started = time.perf_counter()
        unknown = self._unknown_model("infer", request.path_params["name"])
        if unknown is not None:
            return unknown
        try:
            parsed = parse_infer_request(await self._body(request))
        except BodyTooLarge:
            return self._error("infer", 413, f"the body is over {self.max_request_bytes} bytes")
        except BadRequest as err:
            return self._error("infer", 400, str(err))
        if not self.batcher.ready.is_set():
            return self._error("infer", 503, "no version loaded yet: see /v2/health/ready")
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[Answer] = loop.create_future()

        def reply(answer: Answer) -> None:  # called on the batcher's thread
            loop.call_soon_threadsafe(_resolve, answered, answer)

        self.inbox.put(Infer(parsed.texts, parsed.pairs, reply))
        answer = await answered
        if answer.error is not None or answer.version is None or answer.probabilities is None:
            return self._error("infer", answer.code, answer.error or "no answer")
        body = infer_response(self.model_name, answer.version, parsed, answer.labels, answer.probabilities)
        response = self._reply("infer", 200, body)
        self.metrics.request_seconds.observe(time.perf_counter() - started)
        return response

    async def _body(self, request: Request) -> bytes:
        """The request's body, refused as soon as it is known to be over the limit."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            raise BodyTooLarge
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_request_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)


def _resolve(future: asyncio.Future[Answer], answer: Answer) -> None:
    if not future.done():  # the client may have gone, and its handler been cancelled
        future.set_result(answer)
