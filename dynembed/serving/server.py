"""ModelServer: the inference, management and metrics APIs on three loopback ports.

One uvicorn server listens on the three sockets and hands each request to the app of the
port it arrived on, so there is one event loop, one signal handler and one graceful
shutdown: on SIGTERM or SIGINT the server stops accepting connections, answers every
request sent to it before the signal, then stops the models' workers. Those requests
include the ones on connections the kernel has queued on its sockets but the server has
not accepted yet (it accepts them as it closes the sockets, which would reset them), the
ones that have arrived on a connection but are not read yet
(:mod:`dynembed.serving.http_protocol`), and those that wait for a worker.

A model can follow a training job's checkpoint directory (``follow``): when a newer
checkpoint commits, it is opened lazily into new tables that replace the live ones between
batches, so requests never fail or wait for it.

With ``processes > 1`` replica processes answer the inference port too (see
:mod:`dynembed.serving.replicas`); this process keeps the management and metrics APIs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import math
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dynembed._args import check_bool, check_names, is_real
from dynembed.checkpoint.manager import CheckpointManager, step_of
from dynembed.kernels._threads import get_num_threads, set_num_threads
from dynembed.serving.auth import AuthMiddleware, Tokens
from dynembed.serving.fast_path import FastPredictions
from dynembed.serving.http_protocol import CoalescingHttpProtocol
from dynembed.serving.inference_api import InferenceAPI
from dynembed.serving.management_api import ManagementAPI
from dynembed.serving.metrics import CountResponses, ServingMetrics
from dynembed.serving.package import source_step
from dynembed.serving.registry import Registry, ServingError
from dynembed.serving.replicas import ReplicaCommands, Replicas, merged_metrics

logger = logging.getLogger(__name__)


def parse_address(value: str, arg: str) -> tuple[str, int]:
    """``host:port`` (or ``http://host:port``) -> (host, port).

    Raises:
        ValueError: not host:port with a port in [0, 65535].
    """
    text = value.split("://", 1)[-1].rstrip("/")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{arg} must be host:port (e.g. 127.0.0.1:8080), got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(kw_only=True)
class ServerConfig:
    """What a :class:`ModelServer` serves and how."""

    model_store: str
    """Directory of model packages; models register only from here."""
    models: dict[str, str] = field(default_factory=dict)
    """Models to register at startup: name to serve it under (TorchServe's ``model_name``;
    it need not be the package's own) -> package path in the store."""
    inference_address: str = "127.0.0.1:8080"
    management_address: str = "127.0.0.1:8081"
    metrics_address: str = "127.0.0.1:8082"
    management_auth: bool = True
    """Require the management token (Bearer) on the management API."""
    inference_auth: bool = False
    """Require the inference token on the inference API."""
    key_file: str | None = "key_file.json"
    """Where the tokens are written (mode 0600); removed at shutdown."""
    default_workers: int = 1
    batch_size: int = 1
    preload: bool = False
    """Read models' tables into memory when they register (and when a followed checkpoint
    is applied) instead of opening them lazily; the management API's ``preload`` parameter
    overrides it per registration."""
    max_batch_delay_ms: int = 100
    response_timeout_s: int = 120
    max_request_bytes: int = 6_553_500
    """Request bodies over this are refused (413), as TorchServe's max_request_size."""
    job_queue_size: int = 100
    """Requests that may wait for a worker, per model version and process, as TorchServe's
    job_queue_size; more are answered 503 at once rather than queued behind a backlog."""
    follow: dict[str, str] = field(default_factory=dict)
    """model name -> a training job's checkpoint directory to follow: every version of the
    model, also one registered later, serves the tables of its newest checkpoint."""
    follow_interval_s: float = 5.0
    allow_custom_handlers: tuple[str, ...] = ()
    """Package names (``model.name`` in their manifests) whose packages may run their own
    handler code, whatever name they are served under."""
    graceful_timeout_s: float = 30.0
    """How long shutdown waits for accepted requests."""
    processes: int = 1
    """Processes answering the inference API on its port (Linux; see
    :mod:`dynembed.serving.replicas`): each has its own event loop and a copy of every
    model, so the HTTP and JSON work of requests spreads over more cores."""
    torch_threads: int = 1
    """torch's intra-op threads (and dynembed's kernels'). Serving runs many small batches
    on several workers, where parallel ops only contend for cores (measured: 8x slower
    batches with 2 threads on 2 busy cores); 1 is best unless batches are large and
    workers few. Set for the whole process while the server serves, and set back to the
    previous values when it stops."""

    def __post_init__(self) -> None:
        for name in ("inference_address", "management_address", "metrics_address"):
            parse_address(getattr(self, name), name)
        for name in ("default_workers", "batch_size", "max_request_bytes",
                     "response_timeout_s", "torch_threads", "processes", "job_queue_size"):
            value = getattr(self, name)  # True is an int: max_request_bytes=True is 1 byte
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("management_auth", "inference_auth", "preload"):
            setattr(self, name, check_bool(name, getattr(self, name)))
        self.allow_custom_handlers = check_names("allow_custom_handlers",
                                                 self.allow_custom_handlers)
        delay = self.max_batch_delay_ms
        if not is_real(delay) or not 0 <= delay < math.inf:
            raise ValueError(f"max_batch_delay_ms must be a number >= 0, got {delay!r}")
        for name in ("follow_interval_s", "graceful_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if self.processes > 1 and (sys.platform != "linux"
                                   or not hasattr(socket, "SO_REUSEPORT")):
            raise ValueError(f"processes={self.processes} needs Linux (SO_REUSEPORT); use "
                             "processes=1 here")
        unknown = sorted(set(self.follow) - set(self.models))
        if unknown:
            raise ValueError(f"follow names models not in models: {unknown}")


def _check_free(family: int, host: str, port: int) -> None:
    """Raises OSError if something listens on ``host:port``. A socket with SO_REUSEPORT
    binds beside another such socket of the same user: two servers would then share the
    port silently, each answering part of the requests with its own models. A bind
    without it fails if anything holds the port."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        probe.bind((host, port))


def _behind(serving: str | None, latest: Path) -> bool:
    """Whether a version serving checkpoint ``serving`` (None: its package's tables) should
    move to ``latest``: a newer step (or its compacted copy); an older step only once the
    one served is gone with no compacted copy of it, i.e. the training job started over in
    the directory (the server once served the abandoned run's tables, from deleted files,
    until the new run passed that step). A listing taken while the job compacted once
    named the step before: with the checkpoint served still there, that is no reason."""
    if serving is None:
        return True
    if serving == str(latest):
        return False
    now, new = step_of(serving), step_of(latest)
    if now is None or new is None or new > now:
        return True
    if new == now:
        return latest.name.endswith("-full") and not serving.endswith("-full")
    compacted = serving.removesuffix("-full") + "-full"
    return not Path(serving).exists() and not Path(compacted).exists()


def _moves_to(entry, latest: Path) -> bool:
    """Whether a version should serve ``latest`` of the directory it follows: as
    :func:`_behind`, and a version still serving its package's tables only for a step after
    the one they were exported from (a package exported at step 80 took step 25 at once)."""
    package = getattr(entry.handler, "package", None)  # a custom handler may have none
    exported = (source_step(package.manifest)
                if entry.checkpoint is None and package is not None else None)
    new = step_of(latest)
    if exported is not None and new is not None and new <= exported:
        return False
    return _behind(entry.checkpoint, latest)


_ABANDON_WAIT_S = 0.1
"""When the graceful timeout has run out, how long the workers get to finish a batch they
have just started before it is abandoned."""
_BACKSTOP_S = 1.0
"""How long after the graceful timeout uvicorn itself cancels the requests still running
(a backstop: by then the abandoned batches' requests have been answered)."""


class _Server(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown loses no queued connection and answers
    stuck requests in time.

    It accepts the connections waiting on its listening sockets as it closes them (see
    :meth:`shutdown`), so they are answered, not reset.

    uvicorn waits ``timeout_graceful_shutdown`` for the accepted requests, then cancels
    them (each answered with a plain-text 500) and only then sends the lifespan shutdown,
    which stops the models' workers and would wait the graceful timeout again for a batch
    stuck in a handler. So when the graceful timeout runs out, ``give_up`` abandons what is
    still in the handlers first: those requests are answered as stopped (503) and uvicorn's
    own timeout is only a backstop.

    Args:
        config: uvicorn's config (its ``timeout_graceful_shutdown`` the backstop).
        give_up: coroutine function abandoning the batches still running.
        grace_s: the graceful timeout.
    """

    def __init__(self, config: uvicorn.Config, give_up, grace_s: float) -> None:
        super().__init__(config)
        self._give_up, self._grace_s = give_up, grace_s

    async def shutdown(self, sockets=None) -> None:
        # Closing a listening socket resets the connections queued on it (handshake done,
        # request maybe sent, not accepted yet), and with SO_REUSEPORT every process has a
        # queue of its own. So they are accepted first, and the sockets closed in the same
        # step of the loop (nothing queues in between; uvicorn's shutdown finds them
        # closed), then served as the connections accepted before.
        logger.info("shutting down: no new connections; answering the %d accepted "
                    "request(s) (at most %s s)", len(self.server_state.tasks), self._grace_s)
        queued = _accept_queued(sockets or [])
        for server in self.servers:
            server.close()
        await self._serve_accepted(queued)
        loop = asyncio.get_running_loop()
        giving_up: list[asyncio.Task] = []

        def overdue() -> None:
            if self.server_state.tasks:  # requests unanswered (not a slow lifespan shutdown)
                giving_up.append(loop.create_task(self._give_up()))

        timer = loop.call_later(self._grace_s, overdue)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
            await asyncio.gather(*giving_up, return_exceptions=True)

    async def _serve_accepted(self, connections: list[socket.socket]) -> None:
        """Serves connections accepted outside uvicorn as uvicorn serves its own."""
        if not connections:
            return
        loop = asyncio.get_running_loop()
        config = self.config

        def protocol():  # uvicorn's own factory (Server.startup)
            return config.http_protocol_class(config=config, server_state=self.server_state,
                                              app_state=self.lifespan.state)

        results = await asyncio.gather(
            *(loop.connect_accepted_socket(protocol, conn) for conn in connections),
            return_exceptions=True)
        for conn, result in zip(connections, results):
            if isinstance(result, BaseException):  # e.g. reset by its client meanwhile
                conn.close()


def _accept_queued(sockets: list[socket.socket]) -> list[socket.socket]:
    """The connections waiting in the accept queues of listening ``sockets``, accepted."""
    accepted = []
    for sock in sockets:
        sock.setblocking(False)  # as the loop set it: take what waits, never wait
        while True:
            try:
                accepted.append(sock.accept()[0])
            except ConnectionAbortedError:  # its client gave up while it waited
                continue
            except BlockingIOError:  # none left
                break
            except OSError as e:  # e.g. out of file descriptors: those left are reset
                logger.error("cannot accept the connections waiting on %s at shutdown: %s",
                             sock.getsockname(), e)
                break
    return accepted


async def _not_found(request: Request, exc) -> Response:
    return JSONResponse({"code": 404, "type": "ResourceNotFoundException",
                         "message": f"Requested resource is not found: {request.url.path}"},
                        status_code=404)


async def _bad_method(request: Request, exc) -> Response:
    return JSONResponse({"code": 405, "type": "MethodNotAllowedException",
                         "message": f"{request.method} is not allowed on {request.url.path}"},
                        status_code=405)


async def _internal_error(request: Request, exc) -> Response:
    # Starlette's own answer is plain text, which a TorchServe client cannot read; the
    # traceback is logged by the server (Starlette raises the error on after answering)
    return JSONResponse({"code": 500, "type": "InternalServerException",
                         "message": f"{request.method} {request.url.path} failed: "
                                    f"{type(exc).__name__}; see the server's log"},
                        status_code=500)


@contextlib.contextmanager
def _serving_threads(threads: int):
    """torch's intra-op threads and dynembed's kernel threads set to ``threads`` (dynembed's
    at most its current count) for the block, and the previous settings given back after.

    Both settings are the whole process's: kept after serving, they slowed down the
    training or evaluation that a process runs on after a server it started has stopped.
    """
    before = torch.get_num_threads(), get_num_threads()
    torch.set_num_threads(threads)
    set_num_threads(min(threads, before[1]))
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        set_num_threads(before[1])


class ModelServer:
    """The model server.

    Constructing one changes nothing in the process. While it serves (:meth:`run` or
    :meth:`serve`, until they return after :meth:`shutdown` or a signal) torch's intra-op
    threads and dynembed's kernel threads are ``config.torch_threads`` (see
    :attr:`ServerConfig.torch_threads`); both are process-wide (torch's for the thread that
    serves and every thread that runs its first torch op meanwhile, as the handlers'
    workers do), so other work in the process may run on them while the server serves.
    They are set back to what they were when serving ends.

    Args:
        config: the :class:`ServerConfig`.
        replica: this is a replica process of a server with several (inference API only,
            models given by the first process; :mod:`dynembed.serving.replicas`).
    """

    def __init__(self, config: ServerConfig, *, replica: bool = False) -> None:
        self.config, self.replica = config, replica
        self.replicas: Replicas | None = None
        self._followed: set[str] = set()  # models warned of serving tables-only follows
        self.registry = Registry(config.model_store,
                                 allow_custom_handlers=config.allow_custom_handlers,
                                 job_queue_size=config.job_queue_size)
        self.metrics = ServingMetrics(self.registry)
        self.registry.on_batch = self.metrics.on_batch
        self.registry.on_unregister = self._forget
        self.tokens = Tokens(management=config.management_auth,
                             inference=config.inference_auth, key_file=config.key_file)
        defaults = {"initial_workers": config.default_workers, "batch_size": config.batch_size,
                    "max_batch_delay_ms": config.max_batch_delay_ms,
                    "response_timeout_s": config.response_timeout_s,
                    "preload": config.preload}
        errors = {404: _not_found, 405: _bad_method, 500: _internal_error}
        api = InferenceAPI(self.registry, self.metrics, config.max_request_bytes)
        inference = FastPredictions(Starlette(routes=api.routes(), exception_handlers=errors),
                                    api)
        management = Starlette(routes=ManagementAPI(self.registry, defaults).routes(),
                               exception_handlers=errors)
        metrics = Starlette(routes=[Route("/metrics", self._metrics, methods=["GET"])],
                            exception_handlers=errors)
        counts = self.metrics.responses.counts
        self.apps = {api: CountResponses(app, counts, api) for api, app in (
            ("inference", AuthMiddleware(inference, self.tokens, "inference")),
            ("management", AuthMiddleware(management, self.tokens, "management")),
            ("metrics", metrics))}
        self.sockets: dict[str, socket.socket] = {}
        self._by_port: dict[int, object] = {}
        self._followers: list[asyncio.Task] = []
        self._server: uvicorn.Server | None = None

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app = self._by_port.get(scope.get("server", (None, None))[1])
        if app is None:  # one socket only (e.g. a test client): inference
            app = self.apps["inference"]
        path = scope.get("path", "")
        if len(path) > 1 and path.endswith("/"):
            # TorchServe reads /predictions/m/ as /predictions/m; Starlette would answer a
            # 307 redirect, which curl and many clients do not follow with a POST body
            scope = {**scope, "path": path.rstrip("/") or "/"}
        await app(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start_models()
                except Exception as e:  # reported to uvicorn, which exits
                    logger.exception("startup failed")
                    await self.stop_models()  # workers started so far, the key file
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                # What startup loaded (torch, models) lives as long as the server: keep it
                # out of the garbage collector's full passes, which stall every request.
                gc.collect()
                gc.freeze()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop_models()
                gc.unfreeze()  # the process may go on (a server started in a notebook, a test)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _metrics(self, request: Request) -> Response:
        body = generate_latest(self.metrics.registry)
        if self.replicas is not None:
            body = merged_metrics({0: body, **await self.replicas.metrics()})
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ models
    async def start_models(self) -> None:
        """Registers the configured models and starts following checkpoint directories.

        Raises:
            ServingError: a configured model does not load.
        """
        for name, url in self.config.models.items():
            try:
                entry = await self.registry.register(
                    url, name=name, initial_workers=self.config.default_workers,
                    batch_size=self.config.batch_size,
                    max_batch_delay_ms=self.config.max_batch_delay_ms,
                    response_timeout_s=self.config.response_timeout_s,
                    preload=self.config.preload, loaded_at_startup=True)
            except ServingError as e:
                raise ServingError(e.status, e.kind, f"model {name}={url}: {e.message}") \
                    from None
            logger.info("serving %s %s from %s", entry.name, entry.version, url)
        if self.config.processes > 1 and not self.replica:
            host, port = self.sockets["inference"].getsockname()[:2]
            bound = dataclasses.replace(self.config, inference_address=f"[{host}]:{port}"
                                        if ":" in host else f"{host}:{port}")
            self.replicas = Replicas(bound, self.tokens.keys, self.config.processes - 1,
                                     replica_main)
            await self.replicas.start(self.registry)
            self.registry.mirror = self.replicas.mirror
            self.registry.replica_pids = self.replicas.serving_pids
        for name, directory in self.config.follow.items():
            self._followers.append(asyncio.create_task(self._follow(name, Path(directory))))

    async def stop_models(self) -> None:
        """Stops following, finishes accepted requests, stops the workers and replicas."""
        for task in self._followers:
            task.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)
        if self.replicas is not None:
            await self.replicas.stop()
        await self.registry.close(self.config.graceful_timeout_s)
        self.tokens.remove_file()

    async def refresh(self, name: str, checkpoint: str | Path,
                      versions: list[str] | None = None) -> None:
        """Serves ``checkpoint`` in model ``name``'s versions (all by default), here and in
        the replicas, each version on its own: one that the checkpoint does not fit (its
        package's dense part is of another shape) keeps what it served, and the others
        move on (they once all waited for it, or one re-applied the checkpoint for ever).

        Raises:
            Exception: the first version's failure, after the others were refreshed.
        """
        loop = asyncio.get_running_loop()
        entries = [e for e in list(self.registry.models.get(name, {}).values())
                   if versions is None or e.version in versions]
        done, failure = [], None
        for entry in entries:
            try:
                await loop.run_in_executor(None, entry.handler.refresh, checkpoint)
            except Exception as e:  # noqa: BLE001 - raised below, after the other versions
                logger.debug("version %s of %s: %r", entry.version, name, e)
                failure = failure or e
                continue
            if entry.version not in self.registry.models.get(name, ()):
                continue  # unregistered meanwhile: nothing to count or to mirror
            self.metrics.refreshes.labels(entry.name, entry.version).inc()
            done.append(entry)
        try:
            if self.replicas is not None and done:
                await self.replicas.refresh(name, [e.version for e in done], str(checkpoint))
        finally:  # this process serves it either way (replicas started later take it too)
            for entry in done:
                entry.checkpoint = str(checkpoint)
        if failure is not None:
            raise failure

    def _forget(self, name: str, version: str) -> None:
        """What the server kept of an unregistered version: its metrics, the checkpoint its
        replicas are given when started again."""
        self.metrics.forget(name, version)
        if self.replicas is not None:
            self.replicas.forget(name, version)

    def _warn_tables_only(self, name: str, versions: list[str]) -> None:
        """Warns once per model of versions that serve a followed checkpoint's tables under
        the package's dense layers (exported without the training model), a pairing no
        training step had."""
        entries = self.registry.models.get(name, {})
        stale = [v for v in versions if v in entries
                 and not getattr(entries[v].handler, "follows_dense", False)]
        if stale and name not in self._followed:
            self._followed.add(name)
            logger.warning("model %s %s serves the followed checkpoint's tables under the "
                           "package's dense part: the package does not record where its "
                           "dense weights are in the training model; export it with "
                           "`dynembed export` (or export_package(model=...)) to follow the "
                           "dense part too", name, stale)

    async def _follow(self, name: str, directory: Path) -> None:
        """Applies each newer checkpoint of ``directory`` to model ``name``'s tables, and
        the newest one to versions registered since (again, or new)."""
        loop = asyncio.get_running_loop()
        reported = None  # the failure logged last: a checkpoint that cannot be applied is
        # retried every interval, but its traceback is logged once, not every interval
        manager = None  # one for the loop: it warns of a damaged checkpoint once
        while True:
            latest = None
            try:
                if directory.is_dir():
                    manager = manager or await loop.run_in_executor(
                        None, CheckpointManager, directory)
                    latest = await loop.run_in_executor(None, manager.latest)
                    behind = [] if latest is None else [
                        e.version for e in list(self.registry.models.get(name, {}).values())
                        if _moves_to(e, latest)]
                    if behind:
                        try:
                            await self.refresh(name, latest, behind)
                        finally:  # also the versions that moved when another failed
                            moved = [e.version for e in list(
                                         self.registry.models.get(name, {}).values())
                                     if e.version in behind and e.checkpoint == str(latest)]
                            if moved:
                                logger.info("model %s %s now serves %s", name, moved, latest)
                                self._warn_tables_only(name, moved)
                reported = None
            except Exception as e:
                if latest is not None and not latest.exists():
                    # deleted while it was opened (a compaction or cleanup of the training
                    # job): not a failure; the next interval takes the newer one
                    logger.debug("checkpoint %s went away while it was applied", latest)
                    await asyncio.sleep(self.config.follow_interval_s)
                    continue
                self.metrics.refresh_failures.labels(name).inc()
                failure = f"{type(e).__name__}: {e}"
                if failure != reported:
                    logger.exception("could not apply the newest checkpoint of %s (retried "
                                     "every %s s; logged again only if the error changes)",
                                     directory, self.config.follow_interval_s)
                reported = failure
            await asyncio.sleep(self.config.follow_interval_s)

    # ------------------------------------------------------------------ running
    def bind(self, apis=("inference", "management", "metrics")) -> dict[str, tuple[str, int]]:
        """Opens the APIs' listening sockets (port 0 picks a free one); returns the
        addresses by API. With several processes the inference socket is opened with
        ``SO_REUSEPORT``, which the replicas' sockets join."""
        out = {}
        for api in apis:
            host, port = parse_address(getattr(self.config, f"{api}_address"), api)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted connections
            # only then; without it Nagle + delayed ACKs add ~40 ms to every response
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if api == "inference" and (self.config.processes > 1 or self.replica):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                if api == "inference" and self.config.processes > 1 and not self.replica \
                        and port != 0:
                    _check_free(family, host, port)
                sock.bind((host, port))
            except OSError as e:
                sock.close()
                for opened in self.sockets.values():
                    opened.close()
                self.sockets.clear()
                raise OSError(e.errno, f"cannot listen on {host}:{port} for the {api} API: "
                                       f"{e.strerror} (another server there? pick another "
                                       f"--{api}-address)") from None
            sock.listen(2048)
            sock.set_inheritable(True)
            self.sockets[api] = sock
            bound = sock.getsockname()[:2]
            self._by_port[bound[1]] = self.apps[api]
            out[api] = (bound[0], bound[1])
        self.tokens.publish()
        return out

    async def serve(self) -> None:
        """Serves until SIGTERM/SIGINT (or :meth:`shutdown`), then shuts down gracefully."""
        if not self.sockets:
            self.bind()
        grace = self.config.graceful_timeout_s
        config = uvicorn.Config(self, http=CoalescingHttpProtocol, lifespan="on",
                                log_level="warning",
                                timeout_graceful_shutdown=grace + _BACKSTOP_S,
                                limit_concurrency=None, backlog=2048, access_log=False,
                                proxy_headers=False, server_header=False, date_header=False)
        self._server = _Server(config, self._give_up, grace)
        with _serving_threads(self.config.torch_threads):
            await self._server.serve(sockets=list(self.sockets.values()))
        logger.info("stopped")

    async def _give_up(self) -> None:
        """Abandons the batches still in the handlers when the graceful timeout ran out:
        their requests, and those queued behind them, are answered as stopped (503)."""
        logger.warning("the graceful timeout (%s s) ran out with requests unanswered; "
                       "abandoning the batches still in the handlers",
                       self.config.graceful_timeout_s)
        await self.registry.close(_ABANDON_WAIT_S)

    def shutdown(self) -> None:
        """Asks a running :meth:`serve` to stop (graceful). It returns once the accepted
        requests are answered and the workers stopped, with the process's thread settings
        as they were before it started."""
        if self._server is not None:
            self._server.should_exit = True

    def run(self, main=None) -> None:
        """Blocking :meth:`serve` (or ``main()``), on uvloop where it is installed (its
        transports write in C: measured 10-20% more requests/s than asyncio's loop under
        load)."""
        try:
            import uvloop
        except ImportError:
            uvloop = None
        # the serving threads from the start: a replica's main loads its models before
        # it serves, and those loads run on the server's settings too
        with _serving_threads(self.config.torch_threads):
            coroutine = self.serve() if main is None else main()
            if uvloop is None:
                asyncio.run(coroutine)
            else:
                uvloop.run(coroutine)


def replica_main(config: ServerConfig, keys: dict, pipe, number: int) -> None:
    """A replica process's main (spawned by :class:`~dynembed.serving.replicas.Replicas`):
    applies the first process's commands, then serves the inference API on the shared port
    until SIGTERM or until the first process is gone."""
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s replica {number} %(levelname)s %(message)s")
    os.setpgrp()  # a terminal's Ctrl-C goes to the first process, which stops replicas
    config = dataclasses.replace(config, models={}, follow={}, processes=1, key_file=None)
    server = ModelServer(config, replica=True)
    server.tokens.keys = dict(keys)
    server.run(ReplicaCommands(server, pipe).main)
