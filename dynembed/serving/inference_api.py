"""The inference API: TorchServe's, KServe v1's and the Open Inference Protocol v2's paths.

    GET  /ping                                   {"status": "Healthy"}
    POST /predictions/{model}[/{version}]        body: one example or a list of examples
    POST /v1/models/{model}:predict              {"instances": [...]} -> {"predictions": [...]}
    GET  /v1/models/{model}                      {"name": ..., "ready": true}
    GET  /v2, /v2/health/live, /v2/health/ready
    GET  /v2/models/{model}[/versions/{v}]       metadata: inputs, outputs
    GET  /v2/models/{model}[/versions/{v}]/ready
    POST /v2/models/{model}[/versions/{v}]/infer tensors in, tensors out

TorchServe-style errors are ``{"code", "type", "message"}``; v2 errors are ``{"error"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

import numpy as np
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dynembed._version import __version__
from dynembed.serving.batching import BatcherStopped, NoWorkers, QueueFull
from dynembed.serving.handler import InputError
from dynembed.serving.registry import ServingError, bad_request

logger = logging.getLogger(__name__)


def error_response(e: ServingError, *, v2: bool = False) -> JSONResponse:
    if v2:
        return JSONResponse({"error": e.message}, status_code=e.status)
    return JSONResponse({"code": e.status, "type": e.kind, "message": e.message},
                        status_code=e.status)


async def read_within(read, seconds: float):
    """Awaits the coroutine ``read`` (a request body's reading) for at most ``seconds``.

    A client that sends its headers and then too little of its body would otherwise hold
    a connection and a task for good.

    Raises:
        ServingError: 408 when the body did not arrive in time.
    """
    try:
        return await asyncio.wait_for(read, seconds)
    except asyncio.TimeoutError:
        raise ServingError(408, "RequestTimeoutException",
                           f"the request body did not arrive within {seconds:g} s (the "
                           "model version's response timeout)") from None


_FORM = "application/x-www-form-urlencoded"


def _unsupported(kind: str) -> ServingError:
    return ServingError(415, "UnsupportedMediaTypeException",
                        f"{kind} bodies are not supported: send the examples as a JSON body "
                        "(Content-Type: application/json)")


def check_json_body(content_type: str | None) -> bool:
    """Refuses a multipart form upload, which would otherwise fail as JSON that does not
    parse. A URL-encoded body may still be JSON: ``curl -d '{...}'`` labels its JSON so,
    and TorchServe takes it; see :func:`parse_json`.

    Returns:
        Whether the body is labelled URL-encoded.

    Raises:
        ServingError: 415 for a ``multipart/form-data`` body.
    """
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        raise _unsupported(kind)
    return kind == _FORM


def parse_json(body: bytes, form: bool):
    """The JSON in a request body (labelled URL-encoded if ``form``).

    Raises:
        ServingError: 415 for a URL-encoded body that is a real form (``a=1&b=2``), 400 for
            other bodies that are not JSON (nesting past 1024 levels included, as orjson
            refuses it), also broken JSON sent as ``curl -d '{...'``.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        if form and body.lstrip()[:1] not in (b"{", b"["):
            raise _unsupported(_FORM) from None
        raise bad_request(f"the request body is not valid JSON: {e}") from None


_LONG_INTEGER = re.compile(rb"\d{19}")
"""Digits of an integer orjson may have read as a float (it reads one outside
[-2**63, 2**64) as the nearest float; the shortest such one has 19 digits)."""


def exact_input_error(error: InputError, body: bytes, validate) -> InputError:
    """The error that ``validate(data)`` raises for ``body`` read with every integer exact.

    orjson reads an integer outside [-2**63, 2**64) as the nearest float, so a key of 2**70
    was refused as ``1.1805916207174113e+21``, a number the client never sent. Only here,
    for a request refused anyway, is the body read again by the standard library (which
    keeps integers exact) and validated again, for a message that shows what was sent:
    requests that pass validation keep orjson's speed.

    Args:
        error: what validating orjson's reading of ``body`` raised.
        body: the request body (valid JSON: orjson read it).
        validate: validates parsed request JSON as the request's path does.

    Returns:
        The exact reading's InputError, or ``error`` where the body holds no integer
        orjson may have changed or the exact reading raises no InputError.
    """
    if not _LONG_INTEGER.search(body):
        return error
    try:
        validate(json.loads(body))
    except InputError as exact:
        return exact
    except Exception:  # noqa: BLE001 - e.g. RecursionError at a nesting orjson takes
        return error
    return error


async def read_json(request: Request, limit: int) -> tuple[bytes, object]:
    """The request's body and its JSON.

    Raises:
        ServingError: 413 over ``limit`` bytes, 400 not JSON.
    """
    form = check_json_body(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServingError(413, "RequestEntityTooLargeException",
                           f"request body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ServingError(413, "RequestEntityTooLargeException",
                                   f"request body is over the limit of {limit} bytes")
    except ClientDisconnect:  # the client's doing, as on the fast path: not a 500
        raise bad_request("the client went away before sending the whole body") from None
    body = bytes(body)
    return body, parse_json(body, form)


async def _submit(entry, examples: list) -> list:
    try:
        return await entry.batcher.submit(examples, timeout=entry.response_timeout_s)
    # the scaling hints name the version: /models/{name} alone scales the default one
    except NoWorkers:  # TorchServe's answer for a model scaled to 0 workers
        raise ServingError(503, "ServiceUnavailableException",
                           f"No worker is available to serve request for model: "
                           f"{entry.name} {entry.version}; scale it up, e.g. PUT "
                           f"/models/{entry.name}/{entry.version}?min_worker=1") from None
    except QueueFull as e:
        raise ServingError(503, "ServiceUnavailableException",
                           f"model {entry.name} {entry.version} is overloaded: {e} "
                           f"(job_queue_size); retry later, add workers (PUT "
                           f"/models/{entry.name}/{entry.version}?min_worker=N) or raise "
                           "--job-queue-size") from None
    except asyncio.TimeoutError:
        raise ServingError(503, "ServiceUnavailableException",
                           f"model {entry.name} {entry.version} did not answer within "
                           f"{entry.response_timeout_s} s") from None


def _ready(entry) -> bool:
    """Whether a version can answer now: scaled to 0 workers it answers 503, so a readiness
    probe must not send it traffic."""
    return entry.batcher.workers > 0


def _readiness(body: dict, ready: bool) -> JSONResponse:
    """An Open Inference Protocol readiness answer: 200 when ready, else 503 (the status
    code is the answer; the body says it too)."""
    return JSONResponse(body, status_code=200 if ready else 503)


class InferenceAPI:
    """Routes of the inference API over a registry."""

    def __init__(self, registry, metrics, max_request_bytes: int) -> None:
        self.registry, self.metrics = registry, metrics
        self.max_request_bytes = max_request_bytes

    def _entry(self, request: Request):
        """The model version a request's path names (its default version without one).

        Raises:
            ServingError: 404 for an unknown model or version.
        """
        return self.registry.get(request.path_params["model"],
                                 request.path_params.get("version"))

    def routes(self) -> list[Route]:
        return [
            Route("/ping", self.ping, methods=["GET"]),
            Route("/predictions/{model}", self._fast_path_only, methods=["POST", "PUT"]),
            Route("/predictions/{model}/{version}", self._fast_path_only,
                  methods=["POST", "PUT"]),
            Route("/v1/models/{model}:predict", self._fast_path_only, methods=["POST"]),
            Route("/v1/models/{model}", self.kserve_status, methods=["GET"]),
            Route("/v2", self.v2_server, methods=["GET"]),
            Route("/v2/health/live", self.v2_live, methods=["GET"]),
            Route("/v2/health/ready", self.v2_ready, methods=["GET"]),
            Route("/v2/models/{model}", self.v2_metadata, methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}", self.v2_metadata, methods=["GET"]),
            Route("/v2/models/{model}/ready", self.v2_model_ready, methods=["GET"]),
            Route("/v2/models/{model}/versions/{version}/ready", self.v2_model_ready,
                  methods=["GET"]),
            Route("/v2/models/{model}/infer", self.v2_infer, methods=["POST"]),
            Route("/v2/models/{model}/versions/{version}/infer", self.v2_infer,
                  methods=["POST"]),
        ]

    async def ping(self, request: Request) -> Response:
        return JSONResponse({"status": "Healthy"})

    async def _run(self, entry, examples: list, requested: str | None) -> tuple[object, list]:
        """Validates and runs examples on a model version's batcher.

        Args:
            entry: the version the request was routed to.
            examples: the request's examples.
            requested: the version the request named (None: the model's default).

        Returns:
            The version that answered (``entry``, or the default the request followed when
            ``entry`` was unregistered meanwhile; replies and metrics name this one) and
            the results.

        Raises:
            ServingError: 503 when the model does not answer in time; 404 when the version
                was unregistered while the request's body arrived.
        """
        try:
            return entry, await _submit(entry, entry.handler.validate(examples))
        except BatcherStopped:
            # Unregistered after the request found it: run it on what the request named now
            # (the current default if it named none), if any (404 if none).
            current = self.registry.get(entry.name, requested)
            if current is entry:
                raise ServingError(503, "ServiceUnavailableException",
                                   f"model {entry.name} {entry.version} is stopping") from None
            return current, await _submit(current, current.handler.validate(examples))

    async def _fast_path_only(self, request: Request) -> Response:
        # POST/PUT to these paths are answered by fast_path.FastPredictions before the
        # router; the routes exist so that other methods get TorchServe's 405.
        raise AssertionError(f"{request.url.path} is served by FastPredictions")

    async def kserve_status(self, request: Request) -> Response:
        try:
            entry = self._entry(request)
        except ServingError as e:
            return error_response(e)
        # as KServe's own v1 server: 503 for a model not ready (its body says so too), so a
        # readiness probe on the status code is not told a model scaled to 0 is ready
        ready = _ready(entry)
        return _readiness({"name": entry.name, "ready": ready}, ready)

    async def v2_server(self, request: Request) -> Response:
        return JSONResponse({"name": "dynembed", "version": __version__,
                             "extensions": []})

    async def v2_live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def v2_ready(self, request: Request) -> Response:
        # Open Inference Protocol: the server is ready when every model is (here, the
        # default version of each, which unversioned requests reach); the status code
        # carries the answer, so that an HTTP readiness probe reads it. It once answered
        # 200 {"ready": true} with a model scaled to 0 workers, answering 503s.
        ready = all(_ready(self.registry.get(name)) for name in list(self.registry.defaults))
        return _readiness({"ready": ready}, ready)

    async def v2_metadata(self, request: Request) -> Response:
        try:
            entry = self._entry(request)
        except ServingError as e:
            return error_response(e, v2=True)
        manifest = entry.handler.package.manifest
        inputs = [{"name": f, "datatype": "INT64" if spec["type"] == "int64" else "BYTES",
                   "shape": [-1] if spec["pooling"] is None else [-1, -1]}
                  for f, spec in manifest["features"].items()]
        inputs += [{"name": name, "datatype": "FP32", "shape": [-1, -1]}
                   for name in _weight_inputs(manifest["features"])]
        return JSONResponse({
            "name": entry.name,
            "versions": sorted(self.registry.models.get(entry.name, {})),
            "platform": "dynembed",
            "inputs": inputs,
            "outputs": [{"name": "output", "datatype": "FP32",
                         "shape": [-1, *manifest["dense"]["output_shape"]]}]})

    async def v2_model_ready(self, request: Request) -> Response:
        try:
            entry = self._entry(request)
        except ServingError as e:
            return error_response(e, v2=True)
        ready = _ready(entry)
        return _readiness({"name": entry.name, "ready": ready}, ready)

    async def v2_infer(self, request: Request) -> Response:
        """Open Inference Protocol predictions (the TorchServe-style paths are answered by
        :class:`~dynembed.serving.fast_path.FastPredictions`)."""
        started = time.perf_counter()
        entry, status, body = None, 500, b""
        try:
            entry = self._entry(request)
            body, data = await read_within(read_json(request, self.max_request_bytes),
                                           entry.response_timeout_s)
            entry, results = await self._run(entry, _v2_examples(data, entry),
                                             request.path_params.get("version"))
            status = 200
            return _v2_response(results, entry, data)
        except InputError as e:
            status = 400
            refused = entry  # the version that validated it (_run leaves entry as it was)
            exact = exact_input_error(e, body, lambda data: refused.handler.validate(
                _v2_examples(data, refused)))
            return error_response(bad_request(str(exact)), v2=True)
        except ServingError as e:
            status = e.status
            return error_response(e, v2=True)
        except Exception:  # a JSON 500 (as the fast path's), not Starlette's text one
            logger.exception("v2 prediction failed")
            return error_response(ServingError(500, "InternalServerException",
                                               "prediction failed; see the server log"),
                                  v2=True)
        finally:
            if entry is not None:
                self.metrics.on_request(entry.name, entry.version, status,
                                        time.perf_counter() - started)


MAX_EMPTY_BAGS = 4096
"""Most examples a v2 pooled input of shape ``[batch, 0]`` (no data) may describe."""

_RAGGED = ("; for bags of different lengths give shape [batch] and one list of keys per "
           "example in data")

_V2_INTS = frozenset(("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
                      "UINT64"))


def _v2_rows(tensor: dict, pooled: bool | None, where: str) -> list:
    """One entry per example from a v2 input tensor: a key (unpooled) or a list of keys
    (pooled). ``data`` may be flat (row-major, ``shape`` gives the rows) or nested, one row
    per example; a pooled feature's nested rows may differ in length when ``shape`` is
    ``[batch]``."""
    shape, data = tensor["shape"], tensor["data"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad_request(f"{where}: shape must be [batch] or [batch, n] of non-negative "
                          f"integers, got {shape!r}{_RAGGED}")
    if not isinstance(data, list):
        raise bad_request(f"{where}: data must be a list, got {type(data).__name__}")
    types = set(map(type, data))  # JSON gives plain lists; in C, not a loop per key
    nested = list in types
    if pooled is None:  # not an input of the model: validation names it
        pooled = nested
    if nested:  # one row per example
        if len(data) != shape[0]:
            raise bad_request(f"{where}: shape[0] is {shape[0]} but data holds {len(data)} "
                              "rows (one row per example)")
        if types != {list}:
            raise bad_request(f"{where}: data mixes lists and keys")
        if len(shape) == 2 and any(len(v) != shape[1] for v in data):
            raise bad_request(f"{where}: shape is {shape} but not every row holds {shape[1]} "
                              f"keys{_RAGGED}")
        if pooled:
            return data
        if len(shape) != 2 or shape[1] != 1:
            raise bad_request(f"{where} is not pooled: one key per example, shape [batch] "
                              f"or [batch, 1], got shape {shape} with nested data")
        return [v[0] for v in data]
    size = shape[0] * (shape[1] if len(shape) == 2 else 1)
    if len(data) != size:
        raise bad_request(f"{where}: shape {shape} holds {size} values but data has "
                          f"{len(data)}")
    if not pooled:
        if len(shape) == 2 and shape[1] != 1:
            raise bad_request(f"{where} is not pooled: one key per example, shape [batch] "
                              f"or [batch, 1], got {shape}")
        return data
    if len(shape) != 2:
        raise bad_request(f"{where} is pooled: give shape [batch, keys] with flat data, or "
                          "one list of keys per example")
    if shape[1] == 0 and shape[0] > MAX_EMPTY_BAGS:
        # any batch size fits no data: [2**40, 0] once built that many empty bags on the
        # event loop, from a 78-byte body
        raise bad_request(f"{where}: shape {shape} with flat data describes {shape[0]} "
                          f"examples without keys or data (at most {MAX_EMPTY_BAGS} that way); "
                          "give empty bags as one empty list per example, with shape [batch]")
    return [data[k * shape[1]:(k + 1) * shape[1]] for k in range(shape[0])]


WEIGHTS_SUFFIX = ".weights"
"""A v2 request gives a weighted feature's weights as the input named like the feature with
this suffix, shaped like its keys."""


def _weight_inputs(features: dict) -> list[str]:
    """The v2 inputs of the weighted features' weights, in feature order."""
    return [f + WEIGHTS_SUFFIX for f, spec in features.items() if spec.get("weighted")]


def _v2_examples(data, entry) -> list[dict]:
    """Open Inference Protocol tensors (one per feature, first dimension = examples; and one
    per weighted feature's weights, named ``<feature>.weights``) -> examples."""
    if not isinstance(data, dict) or not isinstance(data.get("inputs"), list) or \
            not data["inputs"]:
        raise bad_request('v2 requests are {"inputs": [{"name", "shape", "datatype", '
                          '"data"}, ...]} with at least one input')
    _check_v2_outputs(data.get("outputs"))
    features = getattr(entry.handler, "features", None) or {}
    columns, n = {}, None
    for i, tensor in enumerate(data["inputs"]):
        if not isinstance(tensor, dict) or not {"name", "shape", "datatype", "data"} <= \
                set(tensor):
            raise bad_request(f"inputs[{i}] must have name, shape, datatype and data")
        name = tensor["name"]
        where = f"input {name!r}"
        if not isinstance(name, str) or name in columns:
            raise bad_request(f"inputs[{i}]: {where} is not a string or given twice")
        spec = features.get(name)
        weights_of = features.get(name[:-len(WEIGHTS_SUFFIX)]) \
            if name.endswith(WEIGHTS_SUFFIX) else None
        if weights_of is not None and weights_of.get("weighted"):
            spec = {"pooling": "sum"}  # a list per example; the handler checks the numbers
            if tensor["datatype"] not in ("FP16", "FP32", "FP64"):
                raise bad_request(f"{where}: datatype {tensor['datatype']!r}: weights take "
                                  "FP32 (or FP16, FP64)")
        elif spec is not None:
            want = "INT64" if spec["type"] == "int64" else "BYTES"
            if not isinstance(tensor["datatype"], str) or \
                    tensor["datatype"] not in (_V2_INTS if want == "INT64" else {"BYTES"}):
                raise bad_request(f"{where}: datatype {tensor['datatype']!r} does not fit the "
                                  f"feature, which takes {want}")
        values = _v2_rows(tensor, None if spec is None else spec["pooling"] is not None,
                          where)
        if n is not None and len(values) != n:
            raise bad_request(f"{where} has {len(values)} examples, other inputs {n}")
        n = len(values)
        columns[name] = values
    if features:
        takes = list(features) + _weight_inputs(features)
        missing = [f for f in takes if f not in columns]
        unknown = [f for f in columns if f not in takes]
        if missing or unknown:
            raise bad_request(f"missing inputs {missing}, unknown inputs {unknown}; the model "
                              f"takes {takes}")
        for f in takes[len(features):]:  # each weighted feature's keys and weights together
            name = f[:-len(WEIGHTS_SUFFIX)]
            columns[name] = [{"keys": keys, "weights": weights}
                             for keys, weights in zip(columns[name], columns.pop(f))]
    return [{name: values[k] for name, values in columns.items()} for k in range(n)]


def _check_v2_outputs(outputs) -> None:
    """Refuses requested outputs the model does not have (its one output is ``output``):
    an unknown name was ignored, and the client got an output it had not asked for."""
    if outputs is None:
        return
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise bad_request('outputs must be a list of {"name": ...} objects, e.g. '
                          '[{"name": "output"}]')
    unknown = [o.get("name") for o in outputs if o.get("name") != "output"]
    if unknown:
        raise bad_request(f"unknown outputs {unknown}; the model has one output, 'output'")


def _v2_response(results, entry, data) -> Response:
    array = np.asarray(results, dtype=np.float32)
    return JSONResponse({"model_name": entry.name, "model_version": entry.version,
                         "id": str(data.get("id") or uuid.uuid4()),
                         "outputs": [{"name": "output", "datatype": "FP32",
                                      "shape": list(array.shape),
                                      "data": array.ravel().tolist()}]})
