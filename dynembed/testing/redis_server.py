"""Start and stop real ``redis-server`` processes on 127.0.0.1 for tests and benchmarks.

Servers keep no data on disk (no RDB snapshots, no AOF), listen on free loopback ports,
and are stopped (then killed) on exit, also those left open when the interpreter exits.
Every wait is bounded.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from typing_extensions import Self


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, cluster_bus: bool = False) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Args:
        cluster_bus: also require ``port + 10000`` free (a Redis Cluster node's bus port),
            which keeps the port below 55536.
    """
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55000)
        if _bindable(port) and (not cluster_bus or _bindable(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found in 1000 tries")


def redis_server_binary() -> str:
    """Path of ``redis-server``.

    Raises:
        FileNotFoundError: it is not installed (the README's test command installs it).
    """
    path = shutil.which("redis-server")
    if path is None:
        raise FileNotFoundError("redis-server is not installed; run scripts/install-redis.sh "
                                "(the README's test command does) or apt-get install "
                                "redis-server")
    return path


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float,
                password: str | None = None) -> None:
    """Waits until the server of ``proc`` answers on ``port``.

    The answer must come from ``proc`` itself (INFO's process_id): when the port was taken
    meanwhile (by another test run's server, say), ``proc`` exits unable to bind while the
    other process answers.

    Raises:
        RuntimeError: ``proc`` exited.
        TimeoutError: it did not answer within ``timeout`` seconds.
    """
    # no client-side retries (redis-py retries with a backoff by default): this loop polls;
    # a read timeout too, for a port held by something that accepts and never answers
    client = redis.Redis(host="127.0.0.1", port=port, password=password,
                         socket_connect_timeout=0.2, socket_timeout=0.5,
                         retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} exited with {proc.returncode}")
            try:
                if int(client.info("server")["process_id"]) == proc.pid:
                    return
            except redis.AuthenticationError:
                return  # it asks for a password it was not given here: it answers
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {port} not ready after {timeout} s")
    finally:
        client.close()


_running: set[RedisServer] = set()
"""Servers started and not yet stopped (held even if their owner dropped them): the
interpreter stops them on exit, since a Popen child outlives its parent otherwise."""


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):  # one that cannot stop must not keep others up
            server.close()


class RedisServer:
    """One standalone ``redis-server`` on 127.0.0.1.

    Args:
        port: port to listen on (a free one by default; if another process takes it before
            the server starts, :meth:`start` picks another one and sets ``port``).
        maxmemory: optional Redis maxmemory (e.g. "2mb"), with the noeviction policy.
        extra: more ``redis-server`` arguments.
    """

    def __init__(self, port: int | None = None, *, maxmemory: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self._chosen = not port  # a port of our choosing may be swapped for another
        self.port = port or free_port(cluster_bus="--cluster-enabled" in extra)
        self.maxmemory, self.extra = maxmemory, extra
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Starts the server and waits (at most ``timeout`` seconds per try) until it answers.

        Raises:
            RuntimeError: it is already running, or it exited (its log's end is quoted).
            TimeoutError: it did not answer in time.
        """
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"redis-server on port {self.port} is already running; stop() "
                               "it first")
        self._dir = self._dir or tempfile.TemporaryDirectory(prefix="dynembed-redis-")
        for attempt in range(3):
            try:
                self._start_once(timeout)
                return self
            except RuntimeError:
                # the port chosen was taken since (a server of another test run on this
                # machine): choose again; a port the caller gave is theirs to fix
                if not self._chosen or attempt == 2 or _bindable(self.port):
                    raise
                self.port = free_port(cluster_bus="--cluster-enabled" in self.extra)
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        log = os.path.join(self._dir.name, "redis.log")
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self._dir.name,
                "--protected-mode", "yes", "--logfile", log, *self.extra]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _running.add(self)
        try:
            _wait_ready(self.port, self.proc, timeout, self._password())
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}; its log ends: {_tail(log)}") from None
        except BaseException:  # never leave a server running that nobody will stop
            self.stop()
            raise

    def _password(self) -> str | None:
        if "--requirepass" in self.extra:
            at = self.extra.index("--requirepass") + 1
            return self.extra[at] if at < len(self.extra) else None
        return None

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None
        _running.discard(self)

    def close(self) -> None:
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:  # __exit__ will not run: remove the directory here
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def _tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"


class RedisCluster:
    """A Redis Cluster of ``nodes`` masters (no replicas) on 127.0.0.1.

    Args:
        nodes: number of master nodes (at least 3, Redis's minimum).
    """

    def __init__(self, nodes: int = 3) -> None:
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 3:
            raise ValueError(f"nodes must be an int >= 3 (Redis Cluster's minimum of masters), "
                             f"got {nodes!r}")
        self.servers = [RedisServer(extra=("--cluster-enabled", "yes", "--cluster-config-file",
                                           f"nodes-{i}.conf", "--cluster-node-timeout", "2000"))
                        for i in range(nodes)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.servers[0].port}/0"

    def start(self, timeout: float = 20.0) -> RedisCluster:
        """Starts the nodes and joins them into a cluster, each step within ``timeout`` s.

        Raises:
            TimeoutError: the cluster did not form in time (every node is stopped again).
            RuntimeError: a node did not start, or ``redis-cli`` refused to create the
                cluster (every node is stopped again).
        """
        try:
            self._start(timeout)
        except BaseException:  # never leave nodes running that nobody will stop
            for server in self.servers:
                server.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        for server in self.servers:
            server.start(timeout)
        cli = shutil.which("redis-cli") or os.path.join(
            os.path.dirname(redis_server_binary()), "redis-cli")
        try:
            subprocess.run([cli, "--cluster", "create",
                            *(f"127.0.0.1:{s.port}" for s in self.servers),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"redis-cli did not create the cluster within {timeout} s") \
                from exc
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"redis-cli could not create the cluster: "
                               f"{(exc.stdout or '')[-500:]} {(exc.stderr or '')[-500:]}") \
                from exc
        deadline = time.monotonic() + timeout
        for server in self.servers:
            client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2.0,
                                 socket_connect_timeout=2.0)
            try:
                while client.cluster("info").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise TimeoutError("the Redis cluster did not reach state ok within "
                                           f"{timeout} s")
                    time.sleep(0.05)
            finally:
                client.close()

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:  # __exit__ will not run: remove the directories here
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()
