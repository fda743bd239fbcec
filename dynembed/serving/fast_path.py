"""The prediction endpoints as plain ASGI, ahead of the router.

``POST /predictions/{model}[/{version}]`` and ``POST /v1/models/{model}:predict`` carry
nearly all of a server's traffic. Under load the event loop's time per request, not the
model, limits throughput; so these two skip the framework (route matching, request
objects, exception middleware: about half of the loop's time per request, measured with
py-spy) and parse and write JSON with orjson. They share the validate-and-run step, the
error shape and the metrics of :mod:`dynembed.serving.inference_api`, whose routes answer
every other path (and other methods on these ones: 405).
"""

from __future__ import annotations

import logging
import time

import orjson

from dynembed.serving.handler import InputError
from dynembed.serving.inference_api import (
    check_json_body,
    exact_input_error,
    parse_json,
    read_within,
)
from dynembed.serving.registry import ServingError, bad_request

logger = logging.getLogger(__name__)

_JSON = [(b"content-type", b"application/json")]


def _route(path: str) -> tuple[str, str, str | None] | None:
    """(kind, model, version) for a prediction path, else None."""
    parts = path.split("/")
    if len(parts) in (3, 4) and parts[1] == "predictions" and all(parts[2:]):
        return "torchserve", parts[2], parts[3] if len(parts) == 4 else None
    if len(parts) == 4 and parts[1] == "v1" and parts[2] == "models" and \
            parts[3].endswith(":predict") and len(parts[3]) > 8:
        return "kserve", parts[3][:-8], None
    return None


class FastPredictions:
    """ASGI app: the prediction endpoints, falling back to ``app`` for everything else.

    Args:
        app: the inference API's full app.
        api: its :class:`~dynembed.serving.inference_api.InferenceAPI` (registry, metrics,
            limits, and the shared validate-and-run step).
    """

    def __init__(self, app, api) -> None:
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        route = _route(scope["path"])
        if route is None or (route[0] == "kserve" and scope["method"] != "POST"):
            return await self.app(scope, receive, send)
        await self._predict(route, scope, receive, send)

    async def _predict(self, route, scope, receive, send) -> None:
        kind, name, version = route
        started = time.perf_counter()
        entry, status, body, raw = None, 500, None, b""
        try:
            entry = self.api.registry.get(name, version)
            raw, form = await read_within(self._read(scope, receive), entry.response_timeout_s)
            data = parse_json(raw, form)
            examples = _examples(kind, data)
            if kind == "kserve" and not examples:  # no instances: no predictions (KServe)
                results = []
            else:
                entry, results = await self.api._run(entry, examples, version)
            if kind == "kserve":
                body = orjson.dumps({"predictions": results})
            else:
                body = orjson.dumps(results[0] if isinstance(data, dict) else results)
            status = 200
        except InputError as e:
            refused = entry  # the version that validated it (_run leaves entry as it was)
            exact = exact_input_error(e, raw, lambda data: refused.handler.validate(
                _examples(kind, data)))
            status, body = 400, _error(400, "BadRequestException", str(exact))
        except ServingError as e:
            status, body = e.status, _error(e.status, e.kind, e.message)
        except Exception:
            logger.exception("prediction failed")
            # the cause is the server's to log: its text may name server files (a damaged
            # checkpoint's path), which clients must not learn
            body = _error(500, "InternalServerException", "prediction failed; see the server "
                          "log")
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        if entry is not None:
            self.api.metrics.on_request(entry.name, entry.version, status,
                                        time.perf_counter() - started)

    async def _read(self, scope, receive) -> tuple[bytes, bool]:
        """The request body, and whether it is labelled URL-encoded (for
        :func:`~dynembed.serving.inference_api.parse_json`)."""
        limit, form = self.api.max_request_bytes, False
        for key, value in scope["headers"]:
            if key == b"content-type":
                form = check_json_body(value.decode("latin-1"))
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                raise ServingError(413, "RequestEntityTooLargeException",
                                   f"request body of {int(value)} bytes is over the limit of "
                                   f"{limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise bad_request("the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ServingError(413, "RequestEntityTooLargeException",
                                   f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), form


def _examples(kind: str, data):
    """The examples of a request's JSON: a KServe v1 body's instances, else the body (one
    example or a list; the handler's validation refuses anything else).

    Raises:
        ServingError: 400 for a KServe v1 body without a list of instances.
    """
    if kind == "kserve":
        if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
            raise bad_request('KServe v1 requests are {"instances": [example, ...]}')
        return data["instances"]
    return [data] if isinstance(data, dict) else data


def _error(status: int, kind: str, message: str) -> bytes:
    return orjson.dumps({"code": status, "type": kind, "message": message})
