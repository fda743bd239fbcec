"""The management API, with TorchServe's paths, parameters, status codes and error shape.

    POST   /models?url=&model_name=&initial_workers=&batch_size=&max_batch_delay=
                  &response_timeout=&synchronous=&preload= register from the model store
                  (preload, dynembed's: read the tables into memory now, true/false)
    GET    /models?limit=&next_page_token=                 list (paginated)
    GET    /models/{model}[/{version}|/all]                describe
    PUT    /models/{model}[/{version}]?min_worker=&max_worker=&synchronous=   scale
    PUT    /models/{model}/{version}/set-default           set the default version
    DELETE /models/{model}[/{version}]                     unregister
"""

from __future__ import annotations

import asyncio
import logging
import re

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dynembed.serving.inference_api import error_response
from dynembed.serving.registry import MAX_WORKERS, ServingError, bad_request

logger = logging.getLogger(__name__)


def _param(request: Request, name: str) -> str | None:
    """A query parameter's one value (None if absent).

    Raises:
        ServingError: 400 if given more than once (Starlette would take the last value,
            TorchServe the first: ``min_worker=1&min_worker=0`` is refused, not guessed).
    """
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise bad_request(f"parameter {name} is given {len(values)} times ({values}); give "
                          "it once")
    return values[0] if values else None


def _int(request: Request, name: str, default=None, *, low: int = 0,
         high: int = 2**31 - 1):
    """An integer query parameter in [low, high] (TorchServe's are Java ints)."""
    raw = _param(request, name)
    if raw is None or raw == "":
        return default
    # ASCII digits only: int() also reads "1_0", " 1" and other scripts' digits
    if not re.fullmatch(r"-?[0-9]+", raw):
        raise bad_request(f"parameter {name} must be an integer, got {raw!r}")
    value = int(raw)
    if not low <= value <= high:
        raise bad_request(f"parameter {name} must be in [{low}, {high}], got {value}")
    return value


def _bool(request: Request, name: str, default: bool) -> bool:
    raw = _param(request, name)
    if raw is None or raw == "":
        return default
    if raw.lower() not in ("true", "false"):
        raise bad_request(f"parameter {name} must be true or false, got {raw!r}")
    return raw.lower() == "true"


def _handles_errors(method):
    async def wrapped(self, request: Request) -> Response:
        try:
            return await method(self, request)
        except ServingError as e:
            return error_response(e)
    return wrapped


class ManagementAPI:
    """Routes of the management API over a registry.

    Args:
        registry: the server's models.
        defaults: registration defaults (``batch_size``, ``max_batch_delay_ms``, ``preload``,
            ``response_timeout_s``, ``initial_workers``).
    """

    def __init__(self, registry, defaults: dict) -> None:
        self.registry, self.defaults = registry, defaults
        self._background: set[asyncio.Task] = set()

    def routes(self) -> list[Route]:
        return [
            Route("/models", self.register, methods=["POST"]),
            Route("/models", self.list_models, methods=["GET"]),
            Route("/models/{model}", self.describe, methods=["GET"]),
            Route("/models/{model}/{version}", self.describe, methods=["GET"]),
            Route("/models/{model}", self.scale, methods=["PUT"]),
            Route("/models/{model}/{version}", self.scale, methods=["PUT"]),
            Route("/models/{model}/{version}/set-default", self.set_default, methods=["PUT"]),
            Route("/models/{model}", self.unregister, methods=["DELETE"]),
            Route("/models/{model}/{version}", self.unregister, methods=["DELETE"]),
        ]

    @_handles_errors
    async def register(self, request: Request) -> Response:
        url = _param(request, "url")
        if not url:
            raise bad_request("Parameter url is required: the package's path in the model "
                              "store")
        options = {
            "name": _param(request, "model_name") or None,
            "initial_workers": _int(request, "initial_workers",
                                    self.defaults["initial_workers"], low=0, high=MAX_WORKERS),
            "batch_size": _int(request, "batch_size", self.defaults["batch_size"], low=1),
            "max_batch_delay_ms": _int(request, "max_batch_delay",
                                       self.defaults["max_batch_delay_ms"]),
            "response_timeout_s": _int(request, "response_timeout",
                                       self.defaults["response_timeout_s"], low=1),
            "preload": _bool(request, "preload", self.defaults["preload"])}
        if not _bool(request, "synchronous", True):
            # 400/404/409 now: what the manifest shows wrong would otherwise only be logged
            reservation = self.registry.reserve(url, options["name"])
            task = asyncio.create_task(self._register_later(url, options, reservation))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return JSONResponse({"status": f"Model registration for {url} accepted; check "
                                           "GET /models for its progress"}, status_code=202)
        entry = await self.registry.register(url, **options)
        return JSONResponse({"status": f'Model "{entry.name}" Version: {entry.version} '
                                       f"registered with {entry.batcher.workers} initial "
                                       "workers"})

    async def _register_later(self, url: str, options: dict, reservation) -> None:
        try:
            await self.registry.register(url, **options, reservation=reservation)
        except ServingError as e:
            logger.error("registration of %s failed: %s", url, e.message)

    @_handles_errors
    async def list_models(self, request: Request) -> Response:
        limit = _int(request, "limit", 100, low=1)
        start = _int(request, "next_page_token", 0)
        names = sorted(self.registry.models)
        page = names[start:start + limit]
        body = {"models": [{"modelName": n,
                            "modelUrl": self.registry.get(n).url} for n in page]}
        if start + limit < len(names):
            body["nextPageToken"] = str(start + limit)
        return JSONResponse(body)

    @_handles_errors
    async def describe(self, request: Request) -> Response:
        name, version = request.path_params["model"], request.path_params.get("version")
        if version == "all":
            self.registry.get(name)
            entries = sorted(self.registry.models[name].values(), key=lambda v: v.version)
        else:
            entries = [self.registry.get(name, version)]
        return JSONResponse([self.registry.describe(e) for e in entries])

    @_handles_errors
    async def scale(self, request: Request) -> Response:
        name, version = request.path_params["model"], request.path_params.get("version")
        min_worker = _int(request, "min_worker", None, low=0, high=MAX_WORKERS)
        max_worker = _int(request, "max_worker", None, low=0, high=MAX_WORKERS)
        synchronous = _bool(request, "synchronous", False)
        if min_worker is not None and max_worker is not None and min_worker > max_worker:
            raise bad_request(f"min_worker ({min_worker}) must be <= max_worker "
                              f"({max_worker})")
        entry = self.registry.get(name, version)
        # checked now: an asynchronous scale's own errors reach nobody (it once answered
        # 202 and dropped a scale that was out of bounds)
        self.registry.worker_bounds(entry, min_worker, max_worker)
        if not synchronous:
            task = asyncio.create_task(self.registry.scale(
                name, entry.version, min_worker=min_worker, max_worker=max_worker))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return JSONResponse({"status": "Processing worker updates..."}, status_code=202)
        entry = await self.registry.scale(name, entry.version, min_worker=min_worker,
                                          max_worker=max_worker)
        return JSONResponse({"status": f"Workers scaled to {entry.batcher.workers} for model: "
                                       f"{name}, version: {entry.version}"})

    @_handles_errors
    async def set_default(self, request: Request) -> Response:
        name, version = request.path_params["model"], request.path_params["version"]
        await self.registry.set_default(name, version)
        return JSONResponse({"status": f'Default version successfully updated for model '
                                       f'"{name}" to "{version}"'})

    @_handles_errors
    async def unregister(self, request: Request) -> Response:
        name, version = request.path_params["model"], request.path_params.get("version")
        await self.registry.unregister(name, version)
        return JSONResponse({"status": f'Model "{name}" unregistered'})
