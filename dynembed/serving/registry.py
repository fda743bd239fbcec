"""The models a server holds: versions, the default version, workers, batching settings.

Models register only from packages inside the model store directory: a ``url`` is a path
relative to the store (a package directory), resolved and checked to stay inside it, so a
registration can never download anything or read elsewhere on the machine.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from dynembed._args import check_names
from dynembed.errors import CheckpointError, DynembedError
from dynembed.serving.batching import MAX_WORKERS, Batcher
from dynembed.serving.handler import check_input_dim, make_handler
from dynembed.serving.package import (
    BUILTIN_HANDLER,
    PackageError,
    check_name,
    open_package,
    read_manifest,
)


class ServingError(DynembedError):
    """An API error: an HTTP status, TorchServe's error type and a message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def not_found(message: str) -> ServingError:
    return ServingError(404, "ModelNotFoundException", message)


def bad_request(message: str) -> ServingError:
    return ServingError(400, "BadRequestException", message)


@dataclass
class ModelVersion:
    """One registered version of a model."""

    name: str
    version: str
    url: str
    handler: object
    batcher: Batcher
    batch_size: int
    max_batch_delay_ms: float
    min_workers: int
    max_workers: int
    response_timeout_s: float
    loaded_at_startup: bool
    preload: bool = False
    registered: float = field(default_factory=time.time)
    checkpoint: str | None = None
    """The checkpoint whose tables it serves (None: its package's)."""

    def options(self) -> dict:
        """The :meth:`Registry.register` arguments that made this version (with its
        current worker count)."""
        return {"name": self.name, "initial_workers": self.min_workers,
                "batch_size": self.batch_size, "max_batch_delay_ms": self.max_batch_delay_ms,
                "response_timeout_s": self.response_timeout_s, "preload": self.preload,
                "loaded_at_startup": self.loaded_at_startup}

    def describe(self, pids: list[int]) -> dict:
        """TorchServe's describe-model entry.

        Args:
            pids: the processes serving this version (the first process, then its
                replicas); each runs this version's workers, so each worker is listed with
                its process's id and resident memory.
        """
        workers = [{"id": f"{self.name}-{self.version}-{k * self.batcher.workers + i}",
                    "startTime": self.registered, "status": "READY",
                    "memoryUsage": resident_bytes(pid), "pid": pid, "gpu": False,
                    "gpuUsage": "N/A"}
                   for k, pid in enumerate(pids) for i in range(self.batcher.workers)]
        return {"modelName": self.name, "modelVersion": self.version, "modelUrl": self.url,
                "runtime": "python", "minWorkers": self.min_workers,
                "maxWorkers": self.max_workers, "batchSize": self.batch_size,
                "maxBatchDelay": self.max_batch_delay_ms, "responseTimeout":
                self.response_timeout_s, "loadedAtStartup": self.loaded_at_startup,
                "workers": workers,
                "jobQueueStatus": {"remainingCapacity": self.batcher.remaining_capacity,
                                   "pendingRequests": self.batcher.pending},
                # dynembed's: which tables answer (a followed checkpoint's, under the
                # package's dense part; None: the package's own)
                "tablesCheckpoint": self.checkpoint}


def resident_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (Linux ``/proc``), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Reservation:
    """A version being registered: :meth:`Registry.reserve` checked it and holds its
    (name, version) until :meth:`release`, so a second registration of it is refused at
    once (409) rather than failing after loading its package."""

    path: Path
    name: str
    """The name it is served under: the caller's ``model_name``, else the package's."""
    version: str
    package_name: str
    """The name in the package's manifest when it was reserved."""
    _pending: set = field(repr=False)

    def release(self) -> None:
        self._pending.discard((self.name, self.version))


class Registry:
    """Registered models by name and version.

    A model is served under the ``name`` given at registration (TorchServe's
    ``model_name``), else its package's name; one package registered under two names is two
    independent models (each with its own handler, tables, workers and metrics).

    Args:
        model_store: the directory packages are registered from.
        allow_custom_handlers: package names (the ``model.name`` of their manifests) whose
            packages may run their own handler code, whatever name they are served under.
        on_batch: metrics callback ``(model, version, BatchStats)``.

    ``mirror``, when set (a server with several processes), is awaited as
    ``mirror(operation, *args)`` after each change (``register``, ``scale``,
    ``set_default``, ``unregister``) so the other processes make it too; a registration
    it fails is undone here.
    """

    def __init__(self, model_store: str | Path, *, allow_custom_handlers=(),
                 on_batch=None, job_queue_size: int | None = None) -> None:
        self.model_store = Path(model_store).resolve()
        if not self.model_store.is_dir():
            raise ValueError(f"model_store {model_store} is not a directory")
        self.allow_custom = set(check_names("allow_custom_handlers", allow_custom_handlers))
        self.on_batch = on_batch
        self.on_unregister = None
        """Called with (name, version) once a version is unregistered (metrics drop its
        series)."""
        self.job_queue_size = job_queue_size
        self.models: dict[str, dict[str, ModelVersion]] = {}
        self.defaults: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._pending: set[tuple[str, str]] = set()
        self._scaling: dict[tuple[str, str], asyncio.Lock] = {}  # one per version
        self.mirror = None
        self.changes = 0
        """Changes made so far (a count); each change's number goes to ``mirror`` as
        ``change=``, so a replica started again from the registry as it was after change c
        skips the mirrored changes up to c."""
        self.replica_pids = list
        """Returns the pids of the replica processes serving now (a server with several
        processes sets it); describe lists their workers too."""

    def describe(self, entry: ModelVersion) -> dict:
        """TorchServe's describe-model entry of ``entry``, with the workers of every
        serving process."""
        return entry.describe([os.getpid(), *self.replica_pids()])

    def resolve_url(self, url: str) -> Path:
        """The package directory ``url`` names inside the model store.

        Raises:
            ServingError: 400 for a URL with a scheme or outside the store, 404 if missing.
        """
        if not url or "://" in url:
            raise bad_request(f"url must name a package in the model store (a relative "
                              f"path), got {url!r}; downloads are not supported")
        try:
            path = (self.model_store / url).resolve()
            if path != self.model_store and self.model_store not in path.parents:
                raise bad_request(f"url {url!r} is outside the model store; register only "
                                  "packages inside it")
            found = path.is_dir()
        except (ValueError, OSError) as e:  # a NUL byte, a name too long for the system
            raise bad_request(f"url {url!r} is not a usable path: {e}") from None
        if not found:
            raise not_found(f"Model not found in model store: {url}")
        return path

    def reserve(self, url: str, name: str | None = None) -> Reservation:
        """Checks that the package at ``url`` can be registered, from its manifest alone
        (the tables are not opened), and holds its version until the registration ends.

        An asynchronous registration calls this before it answers 202, so a duplicate
        version, a malformed ``model_name`` or, for the built-in handler, a
        ``dense.input_dim`` that is not its features' total width is refused to the caller
        instead of only logged. (Whether the dense program runs needs it loaded: that is
        checked when the handler is made.)

        Args:
            url: the package's path in the model store.
            name: the ``model_name`` the caller gave (the name to serve the package under,
                as in TorchServe), or None for the package's own name.

        Raises:
            ServingError: 400 bad url, manifest or name, 404 no such package, 409 the
                version is registered already or being registered.
        """
        path = self.resolve_url(url)
        try:
            manifest = read_manifest(path)
            model = manifest["model"]
            if name is not None:
                check_name(name, "model_name")
            if model["handler"] == BUILTIN_HANDLER:  # a custom handler feeds its own input
                check_input_dim(manifest)
        except (PackageError, ValueError) as e:
            raise bad_request(str(e)) from None
        key = (name or model["name"], model["version"])
        if key in self._pending or key[1] in self.models.get(key[0], {}):
            raise ServingError(409, "ConflictStatusException",
                               f"Model version {key[1]} is already registered for model "
                               f"{key[0]}" + (" (its registration is in progress)"
                                              if key in self._pending else ""))
        self._pending.add(key)
        return Reservation(path, key[0], key[1], model["name"], self._pending)

    async def register(self, url: str, *, name: str | None = None, initial_workers: int = 1,
                       batch_size: int = 1, max_batch_delay_ms: float = 100.0,
                       response_timeout_s: float = 120.0, preload: bool = False,
                       loaded_at_startup: bool = False,
                       reservation: Reservation | None = None) -> ModelVersion:
        """Loads the package at ``url`` (with ``preload``, its tables' rows into memory; see
        :func:`~dynembed.serving.package.open_package`) and starts its workers.

        Args:
            name: the name to serve it under (TorchServe's ``model_name``); None: the
                package's name.
            reservation: from :meth:`reserve` for this ``url`` and ``name`` (an
                asynchronous registration); released here, whatever the outcome. Without it
                the registration reserves its version itself.

        Raises:
            ServingError: 400 bad arguments or package, 404 no such package, 409 the
                version is registered already.
        """
        try:
            for arg, value, low, high in (("initial_workers", initial_workers, 0, MAX_WORKERS),
                                          ("batch_size", batch_size, 1, 2**31 - 1)):
                if not isinstance(value, int) or not low <= value <= high:
                    raise bad_request(f"{arg} must be an integer in [{low}, {high}], got "
                                      f"{value!r}")
            for arg, value, low in (("max_batch_delay", max_batch_delay_ms, 0),
                                    ("response_timeout", response_timeout_s, 1e-3)):
                if not low <= value <= 2**31 - 1:  # also refuses NaN
                    raise bad_request(f"{arg} must be in [{low:g}, {2**31 - 1}], got "
                                      f"{value!r}")
            if reservation is None:
                reservation = self.reserve(url, name)
            entry, change = await self._load(reservation, url, initial_workers, batch_size,
                                             max_batch_delay_ms, response_timeout_s, preload,
                                             loaded_at_startup)
        finally:
            if reservation is not None:
                reservation.release()
        if self.mirror is not None:
            try:
                await self.mirror("register", url, entry.options(), change=change)
            except ServingError:
                await self._remove(entry)
                raise
        return entry

    async def _load(self, reservation: Reservation, url: str, initial_workers: int,
                    batch_size: int, max_batch_delay_ms: float, response_timeout_s: float,
                    preload: bool, loaded_at_startup: bool) -> tuple[ModelVersion, int]:
        """Opens a reserved package and adds it with its workers started; returns the
        version and the change's number."""
        loop = asyncio.get_running_loop()
        try:
            package = await loop.run_in_executor(
                None, functools.partial(open_package, reservation.path, preload=preload))
            if (package.name, package.version) != (reservation.package_name,
                                                   reservation.version):
                # its manifest was rewritten while it loaded
                raise PackageError(f"the package at {url!r} changed while it was registered")
            # the allowance names the package (the code that would run), not the name it is
            # served under: a model_name must not let a caller run another package's code
            handler = make_handler(package, allow_custom=package.name in self.allow_custom)
        except (PackageError, CheckpointError, ValueError) as e:
            raise bad_request(str(e)) from None
        except OSError as e:  # a package file the server cannot read: say which
            raise bad_request(f"package {url!r} could not be read: {e}; make its files "
                              "readable by the server's user") from None
        name, version = reservation.name, reservation.version
        async with self._lock:
            versions = self.models.setdefault(name, {})
            if version in versions:
                raise ServingError(409, "ConflictStatusException",
                                   f"Model version {version} is already registered for "
                                   f"model {name}")
            batcher = Batcher(handler.predict, batch_size=batch_size,
                              max_batch_delay_ms=max_batch_delay_ms, workers=initial_workers,
                              on_batch=self._batch_callback(name, version),
                              max_queued=self.job_queue_size)
            await batcher.start()
            entry = ModelVersion(name, version, url, handler, batcher, batch_size,
                                 max_batch_delay_ms, initial_workers, initial_workers,
                                 response_timeout_s, loaded_at_startup, preload)
            versions[version] = entry
            self.defaults.setdefault(name, version)
            return entry, self._changed()

    def _batch_callback(self, name: str, version: str):
        if self.on_batch is None:
            return None
        return lambda stats: self.on_batch(name, version, stats)

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """A registered version (the default one without ``version``).

        Raises:
            ServingError: 404 unknown model or version.
        """
        versions = self.models.get(name)
        if not versions:
            raise not_found(f"Model not found: {name}")
        version = version or self.defaults[name]
        if version not in versions:
            raise ServingError(404, "ModelVersionNotFoundException",
                               f"Model version: {version} does not exist for model: {name}")
        return versions[version]

    async def scale(self, name: str, version: str | None, *, min_worker: int | None,
                    max_worker: int | None) -> ModelVersion:
        """Sets a version's workers to ``min_worker`` (bounded by ``max_worker``, which
        defaults to ``min_worker`` as in TorchServe).

        Raises:
            ServingError: 404 unknown version; 400 bad bounds (see :meth:`worker_bounds`).
        """
        # one scale of a version at a time: a scale-down waits for busy workers, and a
        # scale that overtook it was mirrored first, leaving the replicas at the older count
        key = (name, self.get(name, version).version)
        async with self._scaling.setdefault(key, asyncio.Lock()):
            entry = self.get(name, version)
            low, high = self.worker_bounds(entry, min_worker, max_worker)
            entry.min_workers, entry.max_workers = low, high
            change = self._changed()
            await entry.batcher.scale(low)
            if self.mirror is not None:
                await self.mirror("scale", entry.name, entry.version, low, high,
                                  change=change)
        return entry

    @staticmethod
    def worker_bounds(entry: ModelVersion, min_worker: int | None,
                      max_worker: int | None) -> tuple[int, int]:
        """The (min, max) workers a scale of ``entry`` would set (unset bounds: its current
        minimum, and the minimum).

        Raises:
            ServingError: 400 unless 0 <= min <= max <= MAX_WORKERS.
        """
        low = entry.min_workers if min_worker is None else min_worker
        high = low if max_worker is None else max_worker
        if not isinstance(low, int) or not 0 <= low <= high <= MAX_WORKERS:
            raise bad_request(f"min_worker must be an integer in [0, max_worker] and "
                              f"max_worker at most {MAX_WORKERS}, got min_worker="
                              f"{min_worker!r}, max_worker={max_worker!r} (min_worker is "
                              f"{entry.min_workers} now)")
        return low, high

    async def set_default(self, name: str, version: str) -> None:
        self.get(name, version)
        self.defaults[name] = version
        change = self._changed()
        if self.mirror is not None:
            await self.mirror("set_default", name, version, change=change)

    async def unregister(self, name: str, version: str | None) -> ModelVersion:
        """Removes a version after its accepted requests finish.

        Raises:
            ServingError: 404 unknown; 403 removing the default version while others exist
                (set another default first; TorchServe's code and message).
        """
        async with self._lock:
            entry = self.get(name, version)
            versions = self.models[name]
            if entry.version == self.defaults[name] and len(versions) > 1:
                raise ServingError(403, "InvalidModelVersionException",
                                   f"Cannot remove default version for model {name}; set "
                                   "another default version before unregistering "
                                   f"{entry.version}")
            del versions[entry.version]
            if not versions:
                del self.models[name]
                del self.defaults[name]
            change = self._changed()
        # its accepted requests wait at most response_timeout_s anyway
        await entry.batcher.stop(timeout=entry.response_timeout_s)
        if self.mirror is not None:
            await self.mirror("unregister", entry.name, entry.version, change=change)
        if entry.version not in self.models.get(entry.name, ()):  # not registered again
            self._scaling.pop((entry.name, entry.version), None)
            if self.on_unregister is not None:
                self.on_unregister(entry.name, entry.version)
        return entry

    def _changed(self) -> int:
        self.changes += 1
        return self.changes

    async def _remove(self, entry: ModelVersion) -> None:
        """Takes out a version whose registration failed elsewhere."""
        async with self._lock:
            versions = self.models.get(entry.name, {})
            if versions.get(entry.version) is entry:
                del versions[entry.version]
                if not versions:
                    del self.models[entry.name]
                    del self.defaults[entry.name]
                elif self.defaults[entry.name] == entry.version:
                    self.defaults[entry.name] = next(iter(versions))
            self._changed()
        await entry.batcher.stop()

    def all_versions(self) -> list[ModelVersion]:
        return [v for versions in self.models.values() for v in versions.values()]

    async def close(self, timeout: float | None = None) -> None:
        """Finishes accepted requests of every model (waiting at most ``timeout`` seconds,
        see :meth:`Batcher.stop`) and stops their workers."""
        await asyncio.gather(*(v.batcher.stop(timeout) for v in self.all_versions()))
