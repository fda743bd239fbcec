"""Replica processes: more inference event loops on one port, for more cores.

One Python process answers requests on one event loop, which holds the GIL for each
request's HTTP and JSON work; on a busy server that loop is the limit, not the model.
With ``processes=N`` the server starts N-1 replica processes. Each is a server of its own
with the same models, answering the inference API on the same port: the port's socket is
opened with ``SO_REUSEPORT`` in every process, and the kernel spreads connections over
them. The first process (the one started by ``dynembed serve``) keeps the management and
metrics APIs:

- every change made through the management API (register, scale, set default,
  unregister) and every checkpoint a follower applies is made in the replicas too, over a
  pipe to each, before the API answers (a registration that fails in a replica is undone);
- ``/metrics`` shows every process's series, labelled ``process="0"`` .. ``"N-1"``;
- a replica that dies is started again with the current models (and the checkpoints
  applied to them); changes made while it is down reach it through that replay, so
  management calls never fail on a replica that is down (those made while it loads the
  models wait for it); a replica whose first process is
  gone (the pipe closes) shuts itself down gracefully; replicas run in their own process
  group, so a terminal's Ctrl-C reaches only the first process, which stops them.

On SIGTERM the first process stops accepting connections on the port while the replicas go
on, answers the requests sent to it, then stops the replicas, which do the same. Each
process's socket has an accept queue of its own, whose connections the kernel resets when
the socket closes: every process accepts what waits there as it closes it (see
:mod:`dynembed.serving.server`), so the requests sent before the SIGTERM are answered,
not reset.

A replica starts empty, receives the current models over its pipe, and only then opens
the port, so it never answers "model not found" for a model the server has.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from dynembed.serving.registry import ServingError

logger = logging.getLogger(__name__)

_CALL_TIMEOUT_S = 600.0
"""Longest a replica may take for one command (a preloaded registration reads tables)."""


class _Gone(ServingError):
    """A replica did not answer: it died, or is stuck."""


class Replicas:
    """The replica processes of a server (parent side).

    Args:
        config: the server's :class:`~dynembed.serving.server.ServerConfig`, with the
            inference address bound (its real port).
        keys: the server's tokens (``Tokens.keys``), so replicas accept the same ones.
        count: replica processes to run.
        target: the replica processes' main function, called as
            ``target(config, keys, pipe, number)`` (module-level, for spawning).
    """

    def __init__(self, config, keys: dict, count: int, target) -> None:
        self.config, self.keys, self.count, self.target = config, keys, count, target
        self._context = multiprocessing.get_context("spawn")
        self._procs: list = [None] * count
        self._pipes: list = [None] * count
        self._locks = [asyncio.Lock() for _ in range(count)]
        self._serving = [False] * count
        self._replayed = [0] * count  # the registry's changes each replica got by replay
        self._changes = asyncio.Lock()  # a change reaches a replica by mirror or by replay
        self._checkpoints: dict[tuple[str, str], str] = {}  # applied per (model, version)
        self._registry = None
        self._watcher: asyncio.Task | None = None
        self._stopping = False

    @property
    def processes(self) -> list:
        """The replicas' current ``multiprocessing.Process`` objects (None: not started)."""
        return list(self._procs)

    def serving_pids(self) -> list[int]:
        """Process ids of the replicas that serve now (started, given the models, alive)."""
        return [proc.pid for proc, serving in zip(self._procs, self._serving)
                if serving and proc is not None and proc.is_alive()]

    async def start(self, registry) -> None:
        """Starts every replica with ``registry``'s models and keeps them running.

        Raises:
            ServingError: a replica could not load a model.
        """
        self._registry = registry
        await asyncio.gather(*(self._start(i) for i in range(self.count)))
        self._watcher = asyncio.create_task(self._watch())

    async def _start(self, i: int) -> None:
        parent_end, child_end = self._context.Pipe()
        proc = self._context.Process(target=self.target, name=f"dynembed-replica-{i + 1}",
                                     args=(self.config, self.keys, child_end, i + 1))
        proc.start()
        child_end.close()
        self._procs[i], self._pipes[i] = proc, parent_end
        registry = self._registry
        async with self._changes:  # the models as they are now; later changes: mirror
            # One snapshot, taken at once: the registry may change during the awaits below
            # (a change is made here first, then mirrored), and the replica must get one
            # consistent state (it once got the default of a model registered meanwhile,
            # which it did not have, and never served again).
            changes = registry.changes
            entries = [(e.url, e.options(), e.name, e.version) for e in registry.all_versions()]
            defaults = dict(registry.defaults)
            for url, options, name, version in entries:
                await self._call(i, "register", url, options)
                checkpoint = self._checkpoints.get((name, version))
                if checkpoint is not None:
                    await self._call(i, "refresh", name, checkpoint, version)
            for name, version in defaults.items():
                await self._call(i, "set_default", name, version)
            await self._call(i, "serve")
            self._replayed[i], self._serving[i] = changes, True
        logger.info("replica %d (pid %d) serves %d model versions", i + 1, proc.pid,
                    len(entries))

    async def _watch(self) -> None:
        """Starts again a replica that died."""
        while not self._stopping:
            await asyncio.sleep(1.0)
            for i, proc in enumerate(self._procs):
                if self._stopping or proc is None or proc.is_alive():
                    continue
                logger.error("replica %d (pid %d) exited with code %s; starting it again",
                             i + 1, proc.pid, proc.exitcode)
                self._serving[i] = False
                async with self._locks[i]:
                    self._pipes[i].close()
                try:
                    await self._start(i)
                except Exception:
                    logger.exception("replica %d did not start; trying again", i + 1)
                    if self._procs[i].is_alive():  # so the next round starts it again
                        self._procs[i].kill()

    async def _call(self, i: int, *command):
        """Sends one command to replica ``i`` and returns its result.

        Raises:
            ServingError: the replica failed the command.
            _Gone: the replica did not answer (500).
        """
        pipe = self._pipes[i]

        def exchange():
            pipe.send(command)
            if not pipe.poll(_CALL_TIMEOUT_S):
                raise TimeoutError(f"no answer in {_CALL_TIMEOUT_S} s")
            return pipe.recv()

        async with self._locks[i]:
            try:
                ok, result = await asyncio.get_running_loop().run_in_executor(None, exchange)
            except (OSError, EOFError, TimeoutError) as e:
                raise _Gone(500, "InternalServerException",
                            f"replica process {i + 1} did not answer {command[0]}: "
                            f"{e}") from None
        if not ok:
            status, kind, message = result
            raise ServingError(status, kind, f"replica process {i + 1}: {message}")
        return result

    async def mirror(self, operation: str, *args, change: int | None = None) -> None:
        """Makes a registry change in every serving replica (the registry's ``mirror``
        hook); a registration is undone in the replicas that made it if another one failed.
        A replica that is down gets the change when it is started again, and one started
        again after the change (``change``: its number in the registry) already has it."""
        async with self._changes:
            await self._mirror(operation, *args, change=change)

    async def _mirror(self, operation: str, *args, change: int | None = None) -> None:
        serving = [i for i in range(self.count) if self._serving[i]
                   and (change is None or change > self._replayed[i])]
        results = await asyncio.gather(*(self._call(i, operation, *args) for i in serving),
                                       return_exceptions=True)
        for i, result in zip(serving, results):
            if isinstance(result, _Gone):  # died: the watcher replays the current state
                logger.error("%s; it will get the current models when it starts again",
                             result.message)
                self._serving[i] = False
        failed = [r for r in results if isinstance(r, BaseException)
                  and not isinstance(r, _Gone)]
        if not failed:
            return
        if operation == "register":
            entry = args[1]
            for i, result in zip(serving, results):
                if not isinstance(result, BaseException):
                    await self._call(i, "unregister", entry["name"], result)
        raise failed[0]

    async def refresh(self, name: str, versions: list[str], checkpoint: str) -> None:
        """Applies a newer checkpoint to these versions of model ``name`` in every
        replica (and in replicas started later)."""
        async with self._changes:
            for version in versions:
                self._checkpoints[(name, version)] = checkpoint
                await self._mirror("refresh", name, checkpoint, version)

    def forget(self, name: str, version: str) -> None:
        """Drops the checkpoint applied to an unregistered version (a replica started again
        would be given it if the version came back)."""
        self._checkpoints.pop((name, version), None)

    async def metrics(self) -> dict[int, bytes]:
        """The serving replicas' metrics in the text format, by process number (1..)."""
        serving = [i for i in range(self.count) if self._serving[i]]
        results = await asyncio.gather(*(self._call(i, "metrics") for i in serving),
                                       return_exceptions=True)
        return {i + 1: r for i, r in zip(serving, results) if not isinstance(r, BaseException)}

    async def stop(self) -> None:
        """Stops the replicas gracefully (each finishes the requests it accepted)."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        for proc in self._procs:
            if proc is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        timeout = self.config.graceful_timeout_s + 10
        for proc, pipe in zip(self._procs, self._pipes):
            if proc is None:
                continue
            await loop.run_in_executor(None, proc.join, timeout)
            if proc.is_alive():
                logger.error("replica pid %d did not stop in %.0f s; killing it", proc.pid,
                             timeout)
                proc.kill()
                await loop.run_in_executor(None, proc.join, 10)
            pipe.close()


def merged_metrics(texts: dict[int, bytes]) -> bytes:
    """One exposition of several processes' metrics (text format, by process number), each
    series labelled with its process (``process="0"``, ...)."""
    families: dict[str, object] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = _copy_family(family)
            merged.samples.extend(
                Sample(s.name, {**s.labels, "process": str(index)}, s.value, s.timestamp,
                       s.exemplar) for s in family.samples)
    registry = CollectorRegistry()
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


def _copy_family(family):
    copy = type(family)(family.name, family.documentation, family.type, family.unit)
    copy.samples = []
    return copy


class _Families(Collector):
    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


# ---------------------------------------------------------------------- replica side
class ReplicaCommands:
    """Runs the first process's commands in a replica's event loop (replica side).

    Args:
        server: the replica's :class:`~dynembed.serving.server.ModelServer`.
        pipe: its end of the pipe to the first process.
    """

    def __init__(self, server, pipe) -> None:
        self.server, self.pipe = server, pipe
        self._queue: asyncio.Queue = asyncio.Queue()

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._readable)
        while True:  # the models first; the port opens only once they are all loaded
            command = await self._queue.get()
            if command is None:
                return
            if command[0] == "serve":
                break
            await self._apply(command)
        self.server.bind(apis=("inference",))
        self.pipe.send((True, None))
        commands = asyncio.create_task(self._serve_commands())
        try:
            await self.server.serve()
        finally:
            commands.cancel()
            loop.remove_reader(self.pipe.fileno())

    def _readable(self) -> None:
        try:
            while self.pipe.poll():
                self._queue.put_nowait(self.pipe.recv())
        except (EOFError, OSError):  # the first process is gone: stop, gracefully
            asyncio.get_running_loop().remove_reader(self.pipe.fileno())
            self._queue.put_nowait(None)
            self.server.shutdown()

    async def _serve_commands(self) -> None:
        while (command := await self._queue.get()) is not None:
            await self._apply(command)

    async def _apply(self, command) -> None:
        operation, *args = command
        registry = self.server.registry
        try:
            if operation == "register":
                url, options = args
                result = (await registry.register(url, **options)).version
            elif operation == "scale":
                name, version, low, high = args
                await registry.scale(name, version, min_worker=low, max_worker=high)
                result = None
            elif operation == "set_default":
                result = await registry.set_default(*args)
            elif operation == "unregister":
                await registry.unregister(*args)
                result = None
            elif operation == "refresh":
                name, checkpoint, version = args
                await self.server.refresh(name, checkpoint, versions=[version])
                result = None
            elif operation == "metrics":
                result = generate_latest(self.server.metrics.registry)
            else:
                raise ServingError(500, "InternalServerException",
                                   f"unknown replica command {operation!r}")
            reply = (True, result)
        except ServingError as e:
            reply = (False, (e.status, e.kind, e.message))
        except Exception as e:
            logger.exception("replica command %s failed", operation)
            reply = (False, (500, "InternalServerException", f"{type(e).__name__}: {e}"))
        try:
            self.pipe.send(reply)
        except OSError:
            pass

