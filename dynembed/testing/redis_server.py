"""Start and stop real ``redis-server`` processes on 127.0.0.1 for tests and benchmarks.

Servers keep no data on disk (no RDB snapshots, no AOF), listen on free loopback ports,
and are stopped (then killed) on exit. Every wait is bounded.
"""

from __future__ import annotations

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


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> None:
    # no client-side retries (redis-py retries with a backoff by default): this loop polls
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2,
                         retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} exited with {proc.returncode}")
            try:
                client.ping()
                return
            except (redis.AuthenticationError, redis.ResponseError):
                return  # it answers, asking for a password (--requirepass)
            except redis.ConnectionError:
                time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {port} not ready after {timeout} s")
    finally:
        client.close()


class RedisServer:
    """One standalone ``redis-server`` on 127.0.0.1.

    Args:
        port: port to listen on (a free one by default).
        maxmemory: optional Redis maxmemory (e.g. "2mb"), with the noeviction policy.
        extra: more ``redis-server`` arguments.
    """

    def __init__(self, port: int | None = None, *, maxmemory: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.port = port or free_port(cluster_bus="--cluster-enabled" in extra)
        self.maxmemory, self.extra = maxmemory, extra
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self._dir = self._dir or tempfile.TemporaryDirectory(prefix="dynembed-redis-")
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self._dir.name,
                "--protected-mode", "yes", *self.extra]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_ready(self.port, self.proc, timeout)
        except BaseException:  # never leave a server running that nobody will stop
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class RedisCluster:
    """A Redis Cluster of ``nodes`` masters (no replicas) on 127.0.0.1.

    Args:
        nodes: number of master nodes (at least 3, Redis's minimum).
    """

    def __init__(self, nodes: int = 3) -> None:
        self.servers = [RedisServer(extra=("--cluster-enabled", "yes", "--cluster-config-file",
                                           f"nodes-{i}.conf", "--cluster-node-timeout", "2000"))
                        for i in range(nodes)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.servers[0].port}/0"

    def start(self, timeout: float = 20.0) -> RedisCluster:
        for server in self.servers:
            server.start()
        cli = shutil.which("redis-cli") or os.path.join(
            os.path.dirname(redis_server_binary()), "redis-cli")
        subprocess.run([cli, "--cluster", "create",
                        *(f"127.0.0.1:{s.port}" for s in self.servers),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        for server in self.servers:
            client = redis.Redis(host="127.0.0.1", port=server.port)
            try:
                while client.cluster("info").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise TimeoutError("the Redis cluster did not reach state ok")
                    time.sleep(0.05)
            finally:
                client.close()
        return self

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
